"""Fusion of candidate distributions (the target's own and the aligned sources'): MinCE, AvgCE.

All candidates are sparse top-k distributions on the target's positions and vocabulary.
Both methods are one mechanism: per unit (window or token) each candidate gets a weight,
and the fused distribution is the weighted mixture, duplicates merged by adding
probabilities, truncated to the k_out most probable ids.

- MinCE: weight 1 for the candidate with the lowest cross-entropy on the gold text (ties go
  to the lower index, so the target wins ties), 0 for the others.
- AvgCE: weights = softmax(-CE / temperature) over the candidates (lower CE, larger weight).

Comparing candidates. A *window* is compared by CE per byte of the text it predicts, each
model measured on its own tokenisation (`metric="byte"`, the default): per-token CE is not
comparable across tokenizers, because their tokens cover different amounts of text, and the
own-tokenisation figure is untouched by alignment errors. `metric="token"` instead uses the
mean −log p(label) of the aligned distributions on the target's tokens (FuseLLM's setting).
A *token* is compared by −log p(label) of each aligned distribution at that position: all
candidates then predict the same target token, so the figures are directly comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from fusedata.codec import decode_topk
from fusedata.errors import UsageError
from fusedata.topk import MIN_PROB, PAD_ID, TopK, label_logprob, merge_sparse, tail_of_probs
from fusedata.windows import predicted_bytes

if TYPE_CHECKING:
    from fusedata.stages.fuse import FuseConfig

# AvgCE's default temperature, CE in nats per byte (or token). Two teachers' window CEs differ by a median
# 0.05 nats/byte (SmolLM2 vs Gemma-3 on the fusion experiment's corpus): T = 1 made that a 0.49/0.51 average
# of the two, whatever their CE; T = 0.05 weights a median difference e:1 (0.73/0.27).
AVGCE_TEMPERATURE = 0.05


def softmax_neg(ce: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(-ce / temperature) over the last axis."""
    z = -ce / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def onehot_min(ce: np.ndarray) -> np.ndarray:
    """Weight 1 on the lowest CE of the last axis (first index on ties)."""
    w = np.zeros_like(ce, dtype=np.float64)
    np.put_along_axis(w, ce.argmin(axis=-1)[..., None], 1.0, axis=-1)
    return w


@dataclass
class FuseResult:
    topk: TopK  # fused distribution, target ids
    winner: np.ndarray  # int8 [N] winning candidate (MinCE), -1 for AvgCE
    weights: np.ndarray  # float32 [W, M] per-window candidate weights (token unit: mean over positions)
    candidate_ce: np.ndarray  # float32 [W, M] window-level CE of each candidate under `metric`


def fuse(
    candidates: list[TopK],
    labels: np.ndarray,
    window_ce: np.ndarray,
    vocab_size: int,
    method: str = "mince",
    unit: str = "window",
    k_out: int | None = None,
    temperature: float = AVGCE_TEMPERATURE,
) -> FuseResult:
    """Fuse M candidate distributions over the same N target positions.

    candidates: M TopK with equal lengths (candidate 0 is the target itself)
    labels:     int [N] the target's next-token ids
    window_ce:  float [W, M] window-level CE of each candidate (used when unit == "window")
    """
    if method not in ("mince", "avgce"):
        raise ValueError(f"unknown fusion method {method!r}")
    if unit not in ("window", "token"):
        raise ValueError(f"unknown fusion unit {unit!r}")
    lengths = candidates[0].lengths
    n = candidates[0].n_positions
    k_out = k_out or candidates[0].k
    token_lp = np.stack([label_logprob(c, labels, vocab_size) for c in candidates], axis=1)  # [N, M]
    if unit == "window":
        ce = window_ce.astype(np.float64)  # [W, M]
        w_win = onehot_min(ce) if method == "mince" else softmax_neg(ce, temperature)
        w_pos = np.repeat(w_win, lengths, axis=0)  # [N, M]
    else:
        w_pos = onehot_min(-token_lp) if method == "mince" else softmax_neg(-token_lp, temperature)
        w_win = window_sums(w_pos, lengths) / np.maximum(lengths, 1)[:, None]
    # mixture over all candidates' entries: [N, M*k] flattened
    rows = np.concatenate([np.repeat(np.arange(n), c.k) for c in candidates])
    ids = np.concatenate([c.ids.ravel() for c in candidates])
    probs = np.concatenate([(np.exp(c.logprobs.astype(np.float64)) * w_pos[:, j : j + 1]).ravel()
                            for j, c in enumerate(candidates)])
    out_ids, out_p = merge_sparse(rows, ids, probs, n, k_out)
    with np.errstate(divide="ignore"):
        out_lp = np.where(out_ids == PAD_ID, -np.inf, np.log(out_p)).astype(np.float32)
    gold = np.log(np.maximum((w_pos * np.exp(token_lp)).sum(axis=1), MIN_PROB)).astype(np.float32)
    tail = tail_of_probs(out_p)
    winner = w_pos.argmax(axis=1).astype(np.int8) if method == "mince" else np.full(n, -1, dtype=np.int8)
    fused = TopK(out_ids, out_lp, gold, tail, lengths.astype(np.int64))
    return FuseResult(fused, winner, w_win.astype(np.float32), window_ce.astype(np.float32))


def window_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[W, ...] sums of the per-position `values` [N, ...] over each window (0 for empty ones)."""
    out = np.zeros((len(lengths),) + values.shape[1:], dtype=np.float64)
    nz = lengths > 0
    if nz.any():
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        out[nz] = np.add.reduceat(values, starts[nz], axis=0)
    return out


def token_metric_ce(candidates: list[TopK], labels: np.ndarray, vocab_size: int) -> np.ndarray:
    """float [W, M]: mean −log p(label) per window for each candidate (metric="token")."""
    token_lp = np.stack([label_logprob(c, labels, vocab_size) for c in candidates], axis=1)  # [N, M]
    lengths = candidates[0].lengths
    return -window_sums(token_lp, lengths) / np.maximum(lengths, 1)[:, None]


def fuse_tables(target: pa.Table, aligned: list[pa.Table], k: int, vocab_size: int, config: FuseConfig,
                codec: Any, schema: pa.Schema) -> pa.Table:
    """The pure fusion of one shard: target topk table + aligned tables (same rows)."""
    for a in aligned:
        if a.column("doc_id").to_pylist() != target.column("doc_id").to_pylist() or \
                a.column("window").to_pylist() != target.column("window").to_pylist():
            raise UsageError("aligned shard rows do not match the target shard (was it made from this target?)")
    cands = [decode_topk(t) for t in [target, *aligned]]
    ids_col = target.column("input_ids").combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    flat = ids_col.values.to_numpy()
    # labels: input_ids[1:] of each window, flattened  [N]
    label_mask = np.ones(flat.size, dtype=bool)
    label_mask[offsets[:-1][offsets[:-1] < offsets[1:]]] = False
    labels = flat[label_mask].astype(np.int64)
    if config.metric == "byte":
        nbytes = predicted_bytes(target.column("token_start").combine_chunks(), target.column("token_end").combine_chunks())
        ce = [target.column("ce").to_numpy().astype(np.float64) * cands[0].lengths / np.maximum(nbytes, 1)]
        ce += [a.column("source_nll").to_numpy() / np.maximum(a.column("source_bytes").to_numpy(), 1) for a in aligned]
        window_ce = np.stack(ce, axis=1)  # [W, M]
    else:
        window_ce = token_metric_ce(cands, labels, vocab_size)
    if not config.include_target:
        cands, window_ce = cands[1:], window_ce[:, 1:]
    result = fuse(cands, labels, window_ce, vocab_size, config.method, config.unit, config.k_out or k, config.temperature)
    off = cands[0].offsets()
    cols = {
        "doc_id": target.column("doc_id"),
        "window": target.column("window"),
        "byte_start": target.column("byte_start"),
        "byte_end": target.column("byte_end"),
        "input_ids": target.column("input_ids"),
        "labels": pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(labels.astype(np.int32))),
        "winner": pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(result.winner)),
        "weights": [row for row in result.weights],
        "candidate_ce": [row for row in result.candidate_ce],
    }
    cols.update(codec.encode(result.topk))
    return pa.table(cols, schema=schema)
