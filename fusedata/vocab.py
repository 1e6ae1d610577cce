"""Vocabulary mapping between two tokenizers: EM (exact match) and MinED (minimum edit distance).

Token strings are first normalised to the bytes they stand for, whatever the family:
GPT-2 byte-level BPE (`Ġ` = space, `Ċ` = newline, the byte-to-unicode table), SentencePiece
(`▁` = space, byte-fallback `<0xNN>` = that byte) or plain vocabularies. Special tokens map to
nothing and are never matched to text. The family is read from the tokenizer's own pipeline
(pre-tokenizer and decoder), not from a list of known model names.

MinED is exact: for every source token, the minimum Levenshtein distance over the *whole*
target vocabulary (rapidfuzz, vectorised and parallel), ties broken by the smallest target id,
except that a target's byte-fallback pieces (`<0x41>`, which normalise like the piece `A`) come
after all its other tokens: the tokenizer never emits them for text that a piece covers.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

BYTE_FALLBACK_LEN = 6  # "<0xNN>"


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode table: printable bytes stand for themselves, the
    other 68 bytes are shifted to code points 256 and up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def tokenizer_family(tokenizer: Any) -> str:
    """'byte_level', 'sentencepiece' or 'plain', from the tokenizer's pipeline."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "plain"
    spec = json.loads(backend.to_str())
    text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if "ByteLevel" in text:
        return "byte_level"
    if "▁" in text or "Metaspace" in text or "ByteFallback" in text:
        return "sentencepiece"
    return "plain"


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id stands for; None for special tokens."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    family = tokenizer_family(tokenizer)
    table = _byte_level_decoder()
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif family == "byte_level":
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode())
        elif family == "sentencepiece" and len(piece) == BYTE_FALLBACK_LEN and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif family == "sentencepiece":
            out.append(piece.replace("▁", " ").encode())
        else:
            out.append(piece.encode())
    return out


def token_texts(tokenizer: Any) -> list[str | None]:
    """Normalised token strings for comparison: one character per byte (latin-1), so partial
    UTF-8 sequences compare bytewise and both families use the same alphabet."""
    return [b.decode("latin-1") if b is not None else None for b in token_bytes(tokenizer)]


def byte_fallback_ids(tokenizer: Any) -> list[int]:
    """Ids of a SentencePiece tokenizer's byte-fallback pieces `<0xNN>` (none for other families)."""
    if tokenizer_family(tokenizer) != "sentencepiece":
        return []
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [i for i, p in enumerate(pieces)
            if p is not None and len(p) == BYTE_FALLBACK_LEN and p.startswith("<0x") and p.endswith(">")]


def _preference(tgt: list[str | None], last: Any = ()) -> np.ndarray:
    """Target ids with a string, in tie-break order: ascending id, the ids in `last` after all
    others. A byte-fallback piece `<0x41>` normalises to the same string as the piece `A`, but
    the tokenizer only emits it for bytes no piece covers: the regular piece must win."""
    late = np.zeros(len(tgt), dtype=bool)
    late[np.asarray(list(last), dtype=np.int64)] = True
    ids = np.array([i for i, t in enumerate(tgt) if t is not None], dtype=np.int64)
    return np.concatenate([ids[~late[ids]], ids[late[ids]]])


def exact_map(src: list[str | None], tgt: list[str | None], size: int, last: Any = ()) -> np.ndarray:
    """int32 [size]: the target id with the identical normalised string (smallest id, ids in
    `last` only when no other has the string), else -1."""
    index: dict[str, int] = {}
    for i in _preference(tgt, last).tolist():
        if tgt[i] not in index:
            index[tgt[i]] = i
    out = np.full(size, -1, dtype=np.int32)
    for i, s in enumerate(src):
        if s is not None and s in index:
            out[i] = index[s]
    return out


def mined_map(src: list[str | None], tgt: list[str | None], size: int, workers: int = -1, chunk: int = 2048,
              last: Any = ()) -> np.ndarray:
    """int32 [size]: the target id at minimum Levenshtein distance (ties: smallest id, ids in
    `last` after all others). Exact matches (distance 0) come from the hash map; only the rest
    go through cdist."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    out = exact_map(src, tgt, size, last)
    tgt_ids = np.array([i for i in _preference(tgt, last).tolist() if tgt[i]], dtype=np.int64)
    tgt_strs = [tgt[i] for i in tgt_ids]
    todo = [i for i, s in enumerate(src) if s and out[i] < 0]
    for c in range(0, len(todo), chunk):
        ids = todo[c : c + chunk]
        dist = process.cdist([src[i] for i in ids], tgt_strs, scorer=Levenshtein.distance, dtype=np.int32,
                             workers=workers)  # [chunk, T]
        out[ids] = tgt_ids[dist.argmin(axis=1)]  # argmin returns the first in preference order on ties
    return out


def vocab_map(src_tok: Any, tgt_tok: Any, method: str, size: int, cache_dir: str | Path | None = None,
              log: Any = None) -> np.ndarray:
    """Source id -> target id (-1: none), cached on disk by both tokenizers' hashes. `log` hears
    about a map that has to be built (MinED over two large vocabularies takes minutes)."""
    from fusedata.models.spec import tokenizer_hash

    if method not in ("exact", "mined"):
        raise ValueError(f"unknown vocabulary map {method!r}")
    key = hashlib.sha256(f"{tokenizer_hash(src_tok)}:{tokenizer_hash(tgt_tok)}:{method}:{size}:v2".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"vocab-{method}-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)
    src, tgt = token_texts(src_tok), token_texts(tgt_tok)
    src = src + [None] * (size - len(src))
    if log is not None and method == "mined":
        log(f"building the MinED vocabulary map: {len(src):,} source x {len(tgt):,} target tokens "
            "(about 2 min for 49k x 262k on 2 cores; cached after, for every later run)")
    last = byte_fallback_ids(tgt_tok)
    result = exact_map(src, tgt, size, last) if method == "exact" else mined_map(src, tgt, size, last=last)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, result)
        tmp.replace(path)
    return result
