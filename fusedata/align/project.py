"""Projection: a source model's top-k distributions, re-expressed on the target's positions
and in target token ids.

Inputs are the source `TopK` (any rows, e.g. all positions of one document), a
`PositionMatch` saying which source row serves each target position (see
`fusedata.align.sequence` for the rule and the kinds), the target labels (input_ids[t+1])
and a vocabulary map (source id -> target id, -1 = none).

Per target position t:
- matched (1:1, many:1, 1:many): the source row's k (id, p) pairs are mapped to target ids;
  pairs whose id maps to -1 are dropped (their mass goes to the tail); pairs landing on the
  same target id are merged by ADDING their probabilities (MinED maps many source ids onto
  one target id: `get`, `gets`, `Get` -> `get`; dropping duplicates would lose mass). The
  merged entries are sorted by probability descending (ties: smaller id first) and the first
  `k_out` are kept (default: the source's k; merging never yields more than k entries, so the
  default loses nothing). Rows with fewer entries are padded with id -1, log-prob -inf.
- fallback (no source position predicts text starting where the target's next token does):
  a one-hot on the target's label input_ids[t+1] (FuseLLM degrades to a one-hot too, but on
  the *current* token: FuseAI issue 27). The fallback is exact supervision, not a guess.

`tail_mass` = 1 - sum of the kept probabilities (the source's own tail plus dropped/cut mass);
`gold_logprob` = log p(label) under the projected distribution: the listed entry's log-prob if
the label is listed, else the tail spread uniformly over the target ids not listed.
`mass_kept` per position = mapped source top-k mass / source top-k mass (NaN at fallbacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusedata.align.sequence import FALLBACK, MANY_TO_ONE, ONE_TO_MANY, ONE_TO_ONE, PositionMatch
from fusedata.topk import TopK

PAD_ID = -1
MIN_PROB = 1e-12


@dataclass
class WindowStats:
    """Per target window counts of position kinds and mean mass kept over its matched
    positions (NaN when none matched). All arrays [W]."""

    one_to_one: np.ndarray
    many_to_one: np.ndarray
    one_to_many: np.ndarray
    fallback: np.ndarray
    mass_kept: np.ndarray

    def totals(self) -> dict[str, float]:
        n = int(self.one_to_one.sum() + self.many_to_one.sum() + self.one_to_many.sum() + self.fallback.sum())
        matched = n - int(self.fallback.sum())
        valid = ~np.isnan(self.mass_kept)
        weights = (self.one_to_one + self.many_to_one + self.one_to_many)[valid]
        mass = float((self.mass_kept[valid] * weights).sum() / max(weights.sum(), 1)) if matched else float("nan")
        return {"positions": n, "1:1": int(self.one_to_one.sum()), "many:1": int(self.many_to_one.sum()),
                "1:many": int(self.one_to_many.sum()), "fallback": int(self.fallback.sum()), "mass_kept": mass}


@dataclass
class Projection:
    topk: TopK  # [P, k_out] target ids; lengths = the target windows' position counts
    kind: np.ndarray  # int8 [P]
    mass_kept: np.ndarray  # float32 [P], NaN at fallbacks
    stats: WindowStats


def merge_rows(ids: np.ndarray, probs: np.ndarray, k_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, sum the probabilities of equal ids (ids < 0 are dropped) and keep the k_out
    largest, sorted descending (ties: smaller id first).

    ids int [R, k], probs float [R, k] -> ids int32 [R, k_out] (PAD_ID padding), probs
    float64 [R, k_out] (0 padding). O(R·k log k), all rows at once.
    """
    r, k = ids.shape
    ids = np.where(probs > 0, ids, PAD_ID).astype(np.int64)  # zero mass: nothing to list
    order = np.argsort(ids, axis=1, kind="stable")  # [R, k] equal ids adjacent
    sid = np.take_along_axis(ids, order, axis=1)
    sp = np.take_along_axis(probs.astype(np.float64), order, axis=1)
    start = np.ones((r, k), dtype=bool)  # [R, k] first entry of a run of equal ids
    start[:, 1:] = sid[:, 1:] != sid[:, :-1]
    # run sums: running total minus the running total just before the run's first entry
    csum = np.cumsum(sp, axis=1)
    first = np.maximum.accumulate(np.where(start, np.arange(k), 0), axis=1)  # [R, k]
    before = np.take_along_axis(csum - sp, first, axis=1)
    end = np.ones((r, k), dtype=bool)
    end[:, :-1] = start[:, 1:]
    total = np.where(end & (sid >= 0), csum - before, -1.0)  # [R, k] one entry per distinct id
    # by total descending; a stable sort keeps equal totals in id order (sid is ascending)
    key = np.argsort(-total, axis=1, kind="stable")[:, :k_out]  # [R, min(k, k_out)]
    out_p = np.take_along_axis(total, key, axis=1)
    out_ids = np.take_along_axis(sid, key, axis=1)
    pad = out_p < 0
    if k_out > k:
        out_p = np.concatenate([out_p, np.full((r, k_out - k), -1.0)], axis=1)
        out_ids = np.concatenate([out_ids, np.full((r, k_out - k), PAD_ID)], axis=1)
        pad = out_p < 0
    out_ids = np.where(pad, PAD_ID, out_ids).astype(np.int32)
    out_p = np.where(pad, 0.0, out_p)
    return out_ids, out_p


def label_logprob(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, labels: np.ndarray,
                  vocab_size: int) -> np.ndarray:
    """float32 [R]: log p(label) under a sparse distribution; a label outside the listed ids
    gets its uniform share of the tail."""
    hit = ids == labels[:, None]  # [R, k]
    listed = np.where(hit, logprobs, -np.inf).max(axis=1, initial=-np.inf)
    n_listed = (ids != PAD_ID).sum(axis=1)
    spread = np.maximum(tail.astype(np.float64), MIN_PROB) / np.maximum(vocab_size - n_listed, 1)
    return np.where(hit.any(axis=1), listed, np.log(spread)).astype(np.float32)


def window_stats(kind: np.ndarray, mass_kept: np.ndarray, lengths: np.ndarray) -> WindowStats:
    """Per-window counts and mean mass kept from per-position arrays [P] and lengths [W]."""
    w = np.repeat(np.arange(len(lengths)), lengths)  # [P] window of each position
    count = [np.bincount(w[kind == c], minlength=len(lengths)).astype(np.int64)
             for c in (ONE_TO_ONE, MANY_TO_ONE, ONE_TO_MANY, FALLBACK)]
    matched = kind != FALLBACK
    n = np.bincount(w[matched], minlength=len(lengths))
    s = np.bincount(w[matched], weights=mass_kept[matched].astype(np.float64), minlength=len(lengths))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / np.maximum(n, 1), np.nan).astype(np.float32)
    return WindowStats(*count, mean)


def project(source: TopK, match: PositionMatch, labels: np.ndarray, vocab_map: np.ndarray, target_vocab: int,
            lengths: np.ndarray | None = None, k_out: int | None = None) -> Projection:
    """The source distribution on every target position, in target ids.

    source: TopK with Q rows (source ids); match: [P] rows of `source` (-1 = fallback);
    labels int [P]: the target token each position predicts; vocab_map int [V_src]: source
    id -> target id or -1; lengths int64 [W]: target positions per window (default one
    window). Returns a TopK [P, k_out] with `lengths`, kinds, mass kept and window stats.
    """
    p = len(match.src_pos)
    lengths = np.array([p], dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
    k_out = source.k if k_out is None else int(k_out)
    labels = np.asarray(labels, dtype=np.int64)
    ok = match.src_pos >= 0  # [P]
    row = np.where(ok, match.src_pos, 0)
    src_ids = source.ids[row].astype(np.int64) if source.n_positions else np.full((p, source.k), PAD_ID)  # [P, k]
    probs = np.exp(source.logprobs[row].astype(np.float64)) if source.n_positions else np.zeros((p, source.k))
    probs[~ok] = 0.0
    valid = (src_ids >= 0) & (src_ids < len(vocab_map))
    mapped = np.where(valid, np.asarray(vocab_map)[np.where(valid, src_ids, 0)], PAD_ID)  # [P, k] target ids
    ids, merged = merge_rows(mapped, probs, k_out)  # [P, k_out]
    # fallback: one-hot on the label
    ids[~ok] = PAD_ID
    merged[~ok] = 0.0
    ids[~ok, 0] = labels[~ok]
    merged[~ok, 0] = 1.0
    with np.errstate(divide="ignore"):
        logprobs = np.where(ids == PAD_ID, -np.inf, np.log(np.maximum(merged, 1e-45))).astype(np.float32)
    tail = np.clip(1.0 - merged.sum(axis=1), 0.0, 1.0).astype(np.float32)
    gold = label_logprob(ids, logprobs, tail, labels, target_vocab)
    gold[~ok] = 0.0
    total = probs.sum(axis=1)
    kept_mass = np.where(mapped >= 0, probs, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mass_kept = np.where(ok, kept_mass / np.maximum(total, MIN_PROB), np.nan).astype(np.float32)
    kind = match.kind.astype(np.int8)
    topk = TopK(ids, logprobs, gold, tail, lengths)
    return Projection(topk, kind, mass_kept, window_stats(kind, mass_kept, lengths))
