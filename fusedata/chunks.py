"""Byte-aligned chunks of two tokenisations, for the ALM loss (fusedata/losses.py).

A chunk is a span of document bytes [A, B) at whose ends both the target and the source
tokenisation have a token boundary, and with no common boundary inside: the smallest units on
which the two models' likelihoods can be compared without a vocabulary map. The teacher's chunk
log-likelihood is the sum of its stored gold log-probs over the source tokens that tile the chunk;
the student's is the sum over the target tokens of the chunk, computed at train time.

Everything is read from what extract stores: absolute document byte offsets of every token
(`token_start`, `token_end`) and the gold log-prob of every predicted position. A chunk is kept
only if both sides tile it exactly with tokens that were predicted (a document's first token and
empty-span tokens such as BOS have no gold log-prob), so a kept chunk compares the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusedata.codec import decode_topk


@dataclass
class TokenLikelihoods:
    """One model's predicted tokens of one document, sorted by start byte.

    start, end int64 [T]: byte span of each predicted token (non-empty spans only)
    logprob   float64 [T]: its gold log-prob
    """

    start: np.ndarray
    end: np.ndarray
    logprob: np.ndarray


def document_likelihoods(table: pa.Table, source: str = "") -> dict[str, TokenLikelihoods]:
    """Per document of a topk table: its predicted tokens (position i of a window predicts token
    i+1), with their spans and gold log-probs, gathered over the document's windows."""
    topk = decode_topk(table, source)
    starts = table.column("token_start").to_pylist()
    ends = table.column("token_end").to_pylist()
    off = topk.offsets()
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for w, doc in enumerate(table.column("doc_id").to_pylist()):
        s, e = np.asarray(starts[w][1:], np.int64), np.asarray(ends[w][1:], np.int64)  # predicted tokens
        lp = topk.gold_logprob[off[w]: off[w + 1]].astype(np.float64)
        parts.setdefault(doc, []).append((s, e, lp))
    out = {}
    for doc, ps in parts.items():
        s, e, lp = (np.concatenate(x) for x in zip(*ps, strict=True))
        keep = e > s
        order = np.argsort(s[keep], kind="stable")
        out[doc] = TokenLikelihoods(s[keep][order], e[keep][order], lp[keep][order])
    return out


def window_chunks(token_start: np.ndarray, token_end: np.ndarray,
                  source: TokenLikelihoods | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chunks of one target window against a source document.

    token_start, token_end int [n]: the target window's token spans (token 0 is context only;
    position p predicts token p+1). Returns chunk_start, chunk_end int32 [C] (positions
    [chunk_start, chunk_end) of the window) and the teacher's chunk log-likelihoods float32 [C].
    """
    empty = np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    a = np.asarray(token_start[1:], np.int64)  # [P] predicted target tokens
    b = np.asarray(token_end[1:], np.int64)
    if source is None or len(a) == 0 or len(source.start) == 0:
        return empty
    cut = np.isin(b, source.end)  # [P] a chunk may end after position p
    ends = np.flatnonzero(cut)  # [C] last position of each chunk
    if len(ends) == 0:
        return empty
    firsts = np.concatenate([[0], ends[:-1] + 1])  # [C] first position of each chunk
    A, B = a[firsts], b[ends]  # [C] chunk bytes
    # the target tiles [A, B): consecutive tokens touch (prefix count of gaps between neighbours)
    tgap = np.concatenate([[0], np.cumsum(a[1:] != b[:-1])])  # [P]
    target_ok = (tgap[ends] - tgap[firsts] == 0) & (B > A)
    # the source tiles [A, B) with predicted tokens: its first starts at A, its last ends at B, no gaps
    s, e, lp = source.start, source.end, source.logprob
    lo = np.searchsorted(s, A, side="left")  # [C]
    hi = np.searchsorted(e, B, side="right")  # [C] source tokens lo..hi-1
    lo_c, hi_c = np.minimum(lo, len(s) - 1), np.clip(hi - 1, 0, len(s) - 1)
    sgap = np.concatenate([[0], np.cumsum(s[1:] != e[:-1])])  # [T]
    source_ok = (hi > lo) & (s[lo_c] == A) & (e[hi_c] == B) & (sgap[hi_c] - sgap[lo_c] == 0)
    ll = np.concatenate([[0.0], np.cumsum(lp)])  # [T+1] prefix sums
    teacher = ll[np.maximum(hi, lo)] - ll[lo]
    ok = target_ok & source_ok & np.isfinite(teacher)
    return firsts[ok].astype(np.int32), (ends[ok] + 1).astype(np.int32), teacher[ok].astype(np.float32)
