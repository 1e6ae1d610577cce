"""Alignment maths: a source model's predictions expressed on the target's positions and vocabulary.

Per target window, each target position is matched to the source position that predicts the text
from the same byte (`match_by_bytes`, linear time) or by DTW over token strings (`match_by_dtw`);
the source top-k at the matched position is mapped into target ids with a vocabulary map (EM or
MinED, fusedata.vocab) and duplicates merged (`project`). Positions with no match fall back to a
one-hot on the target's next-token label (not the current token: FuseAI issue 27).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.codec import decode_topk
from fusedata.topk import PAD_ID, TopK, label_logprob, merge_sparse, tail_of_probs
from schemas.aligned import FALLBACK, MANY_TO_ONE, ONE_TO_MANY, ONE_TO_ONE


@dataclass
class DocPositions:
    """All predictions a model made on one document, over all its windows, in byte order.

    pred_start/pred_end int64 [P]: byte span of the predicted token; nll float64 [P];
    token_ids int32 [P]: the predicted (gold) token; topk: TopK of the P positions.
    """

    pred_start: np.ndarray
    pred_end: np.ndarray
    nll: np.ndarray
    gold_ids: np.ndarray
    topk: TopK


def doc_positions(rows: pa.Table, topk: TopK) -> dict[str, DocPositions]:
    """Group a topk table's predictions by document; a position predicts token i+1."""
    off = topk.offsets()
    starts = rows.column("token_start").to_pylist()
    ends = rows.column("token_end").to_pylist()
    ids = rows.column("input_ids").to_pylist()
    by_doc: dict[str, list[int]] = {}
    for r, doc in enumerate(rows.column("doc_id").to_pylist()):
        by_doc.setdefault(doc, []).append(r)
    out = {}
    for doc, rs in by_doc.items():
        ps = np.concatenate([np.asarray(starts[r][1:], np.int64) for r in rs])
        pe = np.concatenate([np.asarray(ends[r][1:], np.int64) for r in rs])
        gid = np.concatenate([np.asarray(ids[r][1:], np.int32) for r in rs])
        sel = np.concatenate([np.arange(off[r], off[r + 1]) for r in rs])
        order = np.argsort(ps, kind="stable")
        tk = TopK(topk.ids[sel][order], topk.logprobs[sel][order], topk.gold_logprob[sel][order],
                  topk.tail_mass[sel][order], np.array([len(sel)], np.int64))
        out[doc] = DocPositions(ps[order], pe[order], -tk.gold_logprob.astype(np.float64), gid[order], tk)
    return out


@dataclass
class AlignedWindow:
    topk: TopK  # source distribution on the window's target positions, target ids
    kinds: np.ndarray  # int8 [n-1] ALIGN_KINDS
    mass_kept: float  # mean share of the source top-k mass that survived the vocabulary map
    source_nll: float
    source_bytes: int


def match_by_bytes(tgt_start: np.ndarray, tgt_end: np.ndarray, src: DocPositions) -> tuple[np.ndarray, np.ndarray]:
    """Linear-time position alignment from byte offsets.

    Target position t predicts target token t+1, which starts at byte b = tgt_start[t+1]. The
    source position that predicts the text from the same byte b (its predicted token starts at
    b) carries the source's knowledge of what comes next: it is matched to t. Then the source
    token ends where the target token ends (1:1), before (several source tokens make up the
    target token: many:1, the first one's distribution is used) or after (one source token
    covers several target tokens: 1:many). No source token starts at b: fallback.
    Returns the matched source position (or -1) and the kind, both [n-1].
    """
    b, e = tgt_start[1:].astype(np.int64), tgt_end[1:].astype(np.int64)  # [n-1] predicted target tokens
    j = np.searchsorted(src.pred_start, b, side="left")  # [n-1]
    jj = np.minimum(j, max(len(src.pred_start) - 1, 0))
    hit = (j < len(src.pred_start)) & (src.pred_start[jj] == b) if len(src.pred_start) else np.zeros(len(b), bool)
    src_end = src.pred_end[jj] if len(src.pred_start) else np.zeros(len(b), np.int64)
    kinds = np.full(len(b), FALLBACK, dtype=np.int8)
    kinds[hit & (src_end == e)] = ONE_TO_ONE
    kinds[hit & (src_end < e)] = MANY_TO_ONE
    kinds[hit & (src_end > e)] = ONE_TO_MANY
    return np.where(hit, jj, -1), kinds


def project(src_topk: TopK, matched: np.ndarray, labels: np.ndarray, vocab_map: np.ndarray,
            target_vocab: int) -> tuple[TopK, np.ndarray]:
    """Source top-k at the matched positions, mapped into target ids (duplicates merged by
    adding probabilities); unmatched positions get a one-hot on the target's next-token label.
    Returns the TopK [n-1, k] and the share of source top-k mass kept per position."""
    n, k = len(matched), src_topk.k
    ok = matched >= 0
    src_ids = src_topk.ids[np.where(ok, matched, 0)]  # [n, k]
    probs = np.exp(src_topk.logprobs[np.where(ok, matched, 0)].astype(np.float64))  # [n, k]
    mapped = np.where(src_ids >= 0, vocab_map[np.maximum(src_ids, 0)], -1)  # [n, k]
    probs = np.where(ok[:, None], probs, 0.0)
    rows = np.repeat(np.arange(n), k)
    ids, p = merge_sparse(rows, mapped.ravel(), np.where(mapped >= 0, probs, 0.0).ravel(), n, k)
    # fallback: one-hot on the label
    ids[~ok] = PAD_ID
    p[~ok] = 0.0
    ids[~ok, 0] = labels[~ok]
    p[~ok, 0] = 1.0
    total = probs.sum(axis=1)
    kept = np.where(ok, p.sum(axis=1) / np.maximum(total, 1e-12), 1.0)
    with np.errstate(divide="ignore"):
        lp = np.where(ids == PAD_ID, -np.inf, np.log(np.maximum(p, 1e-45))).astype(np.float32)
    tail = tail_of_probs(p)
    out = TopK(ids, lp, np.zeros(n, np.float32), tail, np.array([n], np.int64))
    out.gold_logprob = label_logprob(out, labels.astype(np.int64), target_vocab).astype(np.float32)
    return out, kept


def match_by_dtw(ids: np.ndarray, src: DocPositions, inside: np.ndarray, tgt_texts: list, src_texts: list
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Position alignment by DTW (fusedata.dtw) between the target's predicted tokens and the
    source's predicted tokens on the same bytes. Target position t is matched to the first
    source prediction aligned to its token; kinds: several source tokens on one target token
    (many:1), one source token on several target tokens (1:many), else 1:1."""
    from fusedata.dtw import dtw_align, strip_markers

    sel = np.flatnonzero(inside)  # source predictions within the window's bytes
    a = strip_markers([tgt_texts[i] or "" for i in ids[1:]])
    b = strip_markers([src_texts[i] or "" for i in src.gold_ids[sel]])
    n = len(a)
    if not b:
        return np.full(n, -1, dtype=np.int64), np.full(n, FALLBACK, dtype=np.int8)
    off, col = dtw_align(a, b)
    count = np.diff(off)  # [n] source tokens per target token
    fan_in = np.bincount(col, minlength=len(b))  # target tokens per source token
    first = col[off[:-1]]
    kinds = np.full(n, ONE_TO_ONE, dtype=np.int8)
    kinds[fan_in[first] > 1] = ONE_TO_MANY
    kinds[count > 1] = MANY_TO_ONE
    return sel[first].astype(np.int64), kinds


def align_window(ids: np.ndarray, start: np.ndarray, end: np.ndarray, src: DocPositions, vocab_map: np.ndarray,
                 target_vocab: int, texts: tuple[list, list] | None = None) -> AlignedWindow:
    """One target window (ids/start/end [n]) against all source predictions on its document.
    `texts` (target, source token strings) selects DTW; None selects the byte-offset method."""
    lo, hi = (int(start[1:].min()), int(end[1:].max())) if len(ids) > 1 else (0, 0)
    inside = (src.pred_start >= lo) & (src.pred_start < hi)
    if texts is None:
        matched, kinds = match_by_bytes(start, end, src)
    else:
        matched, kinds = match_by_dtw(ids, src, inside, *texts)
    topk, kept = project(src.topk, matched, ids[1:].astype(np.int64), vocab_map, target_vocab)
    nbytes = int(src.pred_end[inside].max() - src.pred_start[inside].min()) if inside.any() else 0
    return AlignedWindow(topk, kinds, float(kept.mean()) if len(kept) else 1.0, float(src.nll[inside].sum()), nbytes)


def align_tables(target: pa.Table, source_rows: pa.Table, vocab_map: np.ndarray, target_vocab: int,
                 codec: Any, schema: pa.Schema, texts: tuple[list, list] | None = None) -> pa.Table:
    """The pure alignment of one target shard against the source rows of the same documents."""
    src_docs = doc_positions(source_rows, decode_topk(source_rows)) if source_rows.num_rows else {}
    empty = DocPositions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int32),
                         TopK(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32), np.zeros(0, np.float32),
                              np.zeros(0, np.float32), np.array([0], np.int64)))
    results = []
    for doc, ids, start, end in zip(target.column("doc_id").to_pylist(), target.column("input_ids").to_pylist(),
                                    target.column("token_start").to_pylist(), target.column("token_end").to_pylist(),
                                    strict=True):
        results.append(align_window(np.asarray(ids, np.int32), np.asarray(start, np.int64), np.asarray(end, np.int64),
                                    src_docs.get(doc, empty), vocab_map, target_vocab, texts))
    topk = TopK.concat([r.topk for r in results]) if results else None
    cols: dict[str, Any] = {
        "doc_id": target.column("doc_id"),
        "window": target.column("window"),
        "align_kind": [r.kinds for r in results],
        "mass_kept": [r.mass_kept for r in results],
        "source_nll": [r.source_nll for r in results],
        "source_bytes": [r.source_bytes for r in results],
    }
    if topk is None:
        return schema.empty_table()
    cols.update(codec.encode(topk))
    return pa.table(cols, schema=schema)
