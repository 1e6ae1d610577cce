"""The in-memory form of per-position top-k next-token distributions.

Every stage that reads or writes top-k data speaks this type; codecs turn it into Arrow
columns and back. Positions of all windows in a batch are flattened into one array so
that encode/decode and the losses are vectorised, with `lengths` giving the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_ID = -1  # an empty entry of a position with fewer than k ids (merged or mapped distributions)
MIN_PROB = 1e-12


def tail_mass(logprobs: np.ndarray) -> np.ndarray:
    """float32 [N]: probability outside the top-k, 1 - sum(exp(logprobs [N, k])), summed in
    float64 and clipped to [0, 1] (rounding can push a near-complete top-k past 1)."""
    return tail_of_probs(np.exp(logprobs.astype(np.float64)))


def tail_of_probs(probs: np.ndarray) -> np.ndarray:
    """float32 [N]: 1 - sum(probs [N, k]) clipped to [0, 1]; tail_mass() of probabilities."""
    return np.clip(1.0 - probs.sum(axis=1), 0.0, 1.0).astype(np.float32)


@dataclass
class TopK:
    """Top-k distributions of a batch of windows, positions flattened.

    ids:          int32   [N, k] token ids, sorted by log-prob descending
    logprobs:     float32 [N, k] log-softmax over the full vocabulary (not renormalised)
    gold_logprob: float32 [N]    log-prob of the actual next token
    tail_mass:    float32 [N]    probability outside the top-k, 1 - sum(exp(logprobs))
    lengths:      int64   [W]    positions per window; lengths.sum() == N
    """

    ids: np.ndarray
    logprobs: np.ndarray
    gold_logprob: np.ndarray
    tail_mass: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        n = int(self.lengths.sum()) if len(self.lengths) else 0
        if self.ids.shape != self.logprobs.shape or self.ids.ndim != 2:
            raise ValueError(f"ids {self.ids.shape} and logprobs {self.logprobs.shape} must be [N, k]")
        if self.ids.shape[0] != n or self.gold_logprob.shape != (n,) or self.tail_mass.shape != (n,):
            raise ValueError("TopK arrays disagree with lengths")

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_positions(self) -> int:
        return int(self.ids.shape[0])

    def offsets(self) -> np.ndarray:
        """Start index of every window in the flat arrays, plus the end: int64 [W+1]."""
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def window(self, i: int) -> TopK:
        """The positions of one window as its own TopK."""
        off = self.offsets()
        s = slice(int(off[i]), int(off[i + 1]))
        return TopK(
            self.ids[s], self.logprobs[s], self.gold_logprob[s], self.tail_mass[s],
            np.array([off[i + 1] - off[i]], dtype=np.int64),
        )

    @staticmethod
    def concat(parts: list[TopK]) -> TopK:
        if not parts:
            raise ValueError("nothing to concatenate")
        return TopK(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.logprobs for p in parts]),
            np.concatenate([p.gold_logprob for p in parts]),
            np.concatenate([p.tail_mass for p in parts]),
            np.concatenate([p.lengths for p in parts]).astype(np.int64),
        )


def label_logprob(topk: TopK, labels: np.ndarray, vocab_size: int) -> np.ndarray:
    """float64 [N]: log p(label) under a sparse distribution. A label outside the top-k gets
    its share of the tail mass spread uniformly over the ids not listed."""
    hit = topk.ids == labels[:, None]  # [N, k]
    found = hit.any(axis=1)
    listed = np.where(hit, topk.logprobs.astype(np.float64), -np.inf).max(axis=1)
    n_valid = (topk.ids != PAD_ID).sum(axis=1)
    spread = np.maximum(topk.tail_mass.astype(np.float64), MIN_PROB) / np.maximum(vocab_size - n_valid, 1)
    return np.where(found, listed, np.log(spread))


def merge_sparse(rows: np.ndarray, ids: np.ndarray, probs: np.ndarray, n_rows: int, k_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum probabilities of equal (row, id) entries and keep each row's k_out largest.

    rows, ids, probs: flat [E] entries (ids >= 0). Returns ids int32 [n_rows, k_out] (PAD_ID
    where a row has fewer entries) and probs float64 [n_rows, k_out], sorted descending;
    equal probabilities are ordered by id, so the result is deterministic.
    """
    keep = (ids >= 0) & (probs > 0)
    rows, ids, probs = rows[keep].astype(np.int64), ids[keep].astype(np.int64), probs[keep]
    out_ids = np.full((n_rows, k_out), PAD_ID, dtype=np.int32)
    out_p = np.zeros((n_rows, k_out), dtype=np.float64)
    if rows.size == 0:
        return out_ids, out_p
    span = int(ids.max()) + 1
    keys, inverse = np.unique(rows * span + ids, return_inverse=True)  # sorted by (row, id)
    summed = np.bincount(inverse, weights=probs)  # [U]
    urow, uid = keys // span, keys % span
    order = np.lexsort((uid, -summed, urow))  # by row, then prob desc, then id asc
    urow, uid, summed = urow[order], uid[order], summed[order]
    first = np.searchsorted(urow, urow, side="left")  # index of each row's first entry
    rank = np.arange(urow.size) - first
    sel = rank < k_out
    out_ids[urow[sel], rank[sel]] = uid[sel]
    out_p[urow[sel], rank[sel]] = summed[sel]
    return out_ids, out_p
