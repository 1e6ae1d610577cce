"""Paired statistics of the fusion experiment, on made-up numbers with a known answer."""

from __future__ import annotations

import pytest

from fusedata.experiment import paired_difference, t975


def test_paired_difference_known_answer():
    # diffs 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t(2) · 0.1 / √3 = 4.303 · 0.057735 = 0.248435
    d = paired_difference([1.1, 2.2, 3.3], [1.0, 2.0, 3.0])
    assert d.diffs == pytest.approx([0.1, 0.2, 0.3])
    assert d.mean == pytest.approx(0.2)
    assert d.ci95 == pytest.approx((0.2 - 0.248435, 0.2 + 0.248435), abs=1e-5)
    assert d.verdict == "no measurable difference"


def test_pairing_removes_the_shared_seed_noise():
    # the seeds differ by a lot, the arm is always 0.01 below: unpaired this is noise, paired it is sure
    base = [2.0, 2.5, 3.1, 1.7]
    arm = [b - 0.01 + e for b, e in zip(base, [0.001, -0.001, 0.0005, -0.0005], strict=True)]
    d = paired_difference(arm, base)
    assert d.mean == pytest.approx(-0.01)
    assert d.ci95[1] < 0 and d.verdict == "lower"
    assert d.as_dict()["verdict"] == "lower" and len(d.as_dict()["per_seed"]) == 4


def test_t_quantiles_and_bad_input():
    assert t975(2) == 4.303 and t975(11) == 2.228 and t975(500) == 1.96  # 11 reads df 10's (wider) value
    with pytest.raises(ValueError):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [2.0])
