"""Paired statistics for training experiments (benchmarks/fusion.py).

Every arm of one seed starts from the same weights and sees the same windows in the same order,
so the seed-to-seed noise that all arms share cancels in a per-seed difference. An arm is
compared with the baseline by those differences: their mean and a 95% Student-t interval over
the seeds. An interval that contains 0 is reported as no measurable difference.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 95% quantiles of Student's t (0.975 point) by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the table's value at the
    largest tabulated df not above it, so never narrower than the exact interval; 1.96 past 120)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 paired values")
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


@dataclass(frozen=True)
class PairedDiff:
    diffs: list[float]  # arm − baseline, one per seed
    mean: float
    ci95: tuple[float, float]

    @property
    def verdict(self) -> str:
        """'lower' / 'higher' when the interval excludes 0, else 'no measurable difference'."""
        lo, hi = self.ci95
        if hi < 0:
            return "lower"
        if lo > 0:
            return "higher"
        return "no measurable difference"

    def as_dict(self) -> dict[str, object]:
        return {"per_seed": [round(d, 6) for d in self.diffs], "mean": round(self.mean, 6),
                "ci95": [round(self.ci95[0], 6), round(self.ci95[1], 6)], "verdict": self.verdict}


def paired_difference(arm: list[float], baseline: list[float]) -> PairedDiff:
    """Mean of arm[i] − baseline[i] over seeds with its 95% t interval (n ≥ 2 pairs)."""
    if len(arm) != len(baseline):
        raise ValueError(f"paired values need one per seed on both sides ({len(arm)} vs {len(baseline)})")
    diffs = [a - b for a, b in zip(arm, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDiff(diffs, mean, (mean - half, mean + half))
