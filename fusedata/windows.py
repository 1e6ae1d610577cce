"""Cutting documents into windows of tokens with UTF-8 byte offsets (extract's and eval's).

Offsets are in bytes of the document, not characters and not tokens, so alignment compares two
tokenisations of the same text without tokenising again, and bits per byte is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.errors import UsageError


@dataclass
class Window:
    doc: int  # row in the docs table
    index: int  # window number within the document
    ids: np.ndarray  # int32 [n]
    start: np.ndarray  # int32 [n] byte offsets
    end: np.ndarray  # int32 [n]


def char_to_byte(text: str) -> np.ndarray:
    """int64 [len(text)+1]: UTF-8 byte offset of every character boundary."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    nbytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(nbytes)])


def window_bounds(n_tokens: int, max_length: int, bos_prefixed: bool = False) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most max_length tokens, each token after the first
    predicted exactly once. Without a BOS, consecutive windows share one token. With a BOS
    (the document starts with it), windows do not overlap and each later window gets the BOS
    re-prepended by the caller, so its length budget here is max_length - 1 (Gemma-3 degrades
    badly on a window that does not start with <bos>). Windows predicting nothing are dropped."""
    if max_length < 2 + int(bos_prefixed):
        raise UsageError(f"--max-length must be at least {2 + int(bos_prefixed)}")
    if bos_prefixed:
        step = max_length - 1
        return [(s, min(s + step, n_tokens)) for s in range(1, n_tokens, step)]
    if n_tokens < 2:
        return []
    step = max_length - 1
    return [(s, min(s + max_length, n_tokens)) for s in range(0, n_tokens - 1, step)]


def split_character_spans(ids: np.ndarray, start: np.ndarray, end: np.ndarray, nbytes: np.ndarray) -> None:
    """Give tokens that split a character their own bytes, in place.

    Tokenizer offsets are in characters, so pieces of one multi-byte character (byte-level
    pieces like `Ã` `»` or `ĠðŁĺ` `Ģ`, byte fallback `<0xC3>` `<0xBB>`) report the whole
    character's span and overlap. Each maximal run of consecutive tokens whose span length
    differs from their byte length is laid out again, byte by byte from the run's start; the
    new layout is kept only if it ends exactly where the run ended (else the tokenizer had a
    normaliser that changed the text, and its spans are left as they were).
    """
    n = len(ids)
    lengths = np.where(ids < len(nbytes), nbytes[np.minimum(ids, len(nbytes) - 1)], 0)  # [n]
    off = (lengths > 0) & (end - start != lengths)  # [n]
    i = 0
    while i < n:
        if not off[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and off[j + 1]:
            j += 1
        group = np.arange(i, j + 1)
        first = start[i] + np.concatenate([[0], np.cumsum(lengths[group])[:-1]])
        if first[-1] + lengths[j] == end[group].max():
            start[group], end[group] = first, first + lengths[group]
        i = j + 1


def tokenize_windows(tokenizer: Any, texts: list[str], max_length: int, token_nbytes: np.ndarray) -> list[Window]:
    """Tokenise texts with byte offsets and cut each into windows (extract's, and eval's)."""
    if not texts:  # transformers' batch tokenizer fails on an empty list
        return []
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    bos = tokenizer.bos_token_id
    out: list[Window] = []
    for d, text in enumerate(texts):
        ids = np.asarray(enc["input_ids"][d], dtype=np.int32)  # [n]
        chars = np.asarray(enc["offset_mapping"][d], dtype=np.int64).reshape(-1, 2)  # [n, 2]
        byte_at = char_to_byte(text)
        start, end = byte_at[chars[:, 0]].astype(np.int32), byte_at[chars[:, 1]].astype(np.int32)
        split_character_spans(ids, start, end, token_nbytes)
        bos_prefixed = bos is not None and len(ids) > 0 and int(ids[0]) == bos
        for w, (s, e) in enumerate(window_bounds(len(ids), max_length, bos_prefixed)):
            if bos_prefixed:  # [BOS] + body tokens; the BOS covers no bytes
                sel = np.concatenate([[0], np.arange(s, e)])
                st, en = start[sel], end[sel]
                st[0] = en[0] = start[s]
                out.append(Window(d, w, ids[sel], st, en))
            else:
                out.append(Window(d, w, ids[s:e], start[s:e], end[s:e]))
    return out


def batch_by_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Group window indices (longest first) so that rows × longest row ≤ budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def predicted_bytes(token_start: pa.ListArray, token_end: pa.ListArray) -> np.ndarray:
    """int64 [W]: bytes of text a window predicts (its tokens after the first)."""
    out = np.zeros(len(token_start), dtype=np.int64)
    for i, (s, e) in enumerate(zip(token_start.to_pylist(), token_end.to_pylist(), strict=True)):
        if len(s) > 1:
            out[i] = max(max(e[1:]) - min(s[1:]), 1)
    return out
