"""Vocabulary maps: source token id -> target token id (int32, -1 = no target).

Both compare token *surfaces* (`fusedata.align.tokens`: the bytes a token stands for, space
markers and byte-fallback pieces already normalised, one character per byte):

- `exact` (EM): the target token with the identical surface; none -> -1.
- `mined` (MinED): the target token at minimum Levenshtein distance (in bytes) over the whole
  target vocabulary: every ordinary source token gets a target. The result equals the brute
  force minimum exactly (`mined_brute_force`), found faster by length pruning: a target whose
  length differs by more than r is at distance > r, so a source whose best distance among
  targets of length within r is <= r is settled without looking further (rapidfuzz `cdist`
  over rings of growing length difference).

Tie-break, both methods, deterministic: smallest distance, then regular pieces before
byte-fallback pieces `<0xNN>` (a SentencePiece target emits `<0x41>` only for bytes no piece
covers, never for `A`), then the smallest target id.

Special tokens are never matched to text. A source special token with a declared role
(bos, eos, unk, pad) maps to the target's token of the same role when it has one, else -1.

`vocab_map` caches the map on disk as .npy under a caller-given folder, keyed by both
tokenizers' sha256 (`tokenizer_hash`), the method and the map size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from fusedata.align.tokens import TokenTable, token_table, tokenizer_hash

CACHE_VERSION = 1
METHODS = ("exact", "mined")


def _target_order(target: TokenTable) -> np.ndarray:
    """Target ids with a surface, in tie-break order: regular pieces by id, then byte-fallback
    pieces by id. int64 [T]."""
    ids = np.array([i for i, s in enumerate(target.surface) if s is not None], dtype=np.int64)
    late = target.byte_fallback[ids]
    return np.concatenate([ids[~late], ids[late]])


def _roles(source: TokenTable, target: TokenTable, out: np.ndarray) -> None:
    for role, i in source.roles.items():
        if role in target.roles and source.special[i]:
            out[i] = target.roles[role]


def exact_map(source: TokenTable, target: TokenTable) -> np.ndarray:
    """int32 [len(source)]: the target id with the identical surface (tie-break above), else -1."""
    index: dict[str, int] = {}
    for i in _target_order(target).tolist():
        index.setdefault(target.surface[i], i)
    out = np.fromiter((index.get(s, -1) if s is not None else -1 for s in source.surface), np.int32, len(source))
    _roles(source, target, out)
    return out


def _radii(limit: int) -> list[int]:
    """Ring radii 0, 1, 2, 3, 4, 6, 9, 13, ... (x1.5) up to the first >= limit."""
    out = [0]
    while out[-1] < limit:
        out.append(max(out[-1] + 1, out[-1] * 3 // 2))
    return out


def mined_map(source: TokenTable, target: TokenTable, workers: int = 2, max_cells: int = 1 << 24) -> np.ndarray:
    """int32 [len(source)]: the target id at minimum edit distance (tie-break above).

    Exact matches come from a hash map. For the rest, targets are visited in rings of
    growing length difference |len(t) - len(s)| in (r_prev, r] with exact `cdist`
    distances; a source is settled once its best distance is <= r, because every target
    not yet visited is at distance >= |len difference| > r. Ties across rings are resolved
    by tie-break rank, so the result equals `mined_brute_force`. `max_cells` bounds one
    distance matrix (int16: 32 MB by default).
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    out = exact_map(source, target)
    order = _target_order(target)  # [T] target ids in tie-break order
    t_str = [target.surface[i] for i in order.tolist()]
    t_len = np.fromiter((len(s) for s in t_str), np.int64, len(t_str))  # [T]
    todo = np.array([i for i, s in enumerate(source.surface) if s is not None and out[i] < 0], dtype=np.int64)
    if len(todo) == 0 or len(t_str) == 0:
        return out
    s_str = [source.surface[i] for i in todo.tolist()]
    s_len = np.fromiter((len(s) for s in s_str), np.int64, len(s_str))  # [S]
    best_d = np.full(len(todo), np.iinfo(np.int64).max, dtype=np.int64)  # [S]
    best_rank = np.zeros(len(todo), dtype=np.int64)  # [S] position in `order`
    for length in np.unique(s_len).tolist():
        rows = np.flatnonzero(s_len == length)  # unsettled sources of this length
        diff = np.abs(t_len - length)  # [T]
        prev = -1
        for radius in _radii(int(diff.max())):
            ring = np.flatnonzero((diff > prev) & (diff <= radius))  # ascending rank
            prev = radius
            if len(ring) and len(rows):
                ring_str = [t_str[j] for j in ring.tolist()]
                step = max(1, max_cells // len(ring))
                for c in range(0, len(rows), step):
                    chunk = rows[c:c + step]
                    dist = process.cdist([s_str[i] for i in chunk.tolist()], ring_str, scorer=Levenshtein.distance,
                                         dtype=np.int16, workers=workers)  # [c, |ring|]
                    arg = dist.argmin(axis=1)  # first minimum: lowest rank in the ring
                    d = dist[np.arange(len(chunk)), arg].astype(np.int64)
                    better = (d < best_d[chunk]) | ((d == best_d[chunk]) & (ring[arg] < best_rank[chunk]))
                    best_d[chunk[better]] = d[better]
                    best_rank[chunk[better]] = ring[arg[better]]
            rows = rows[best_d[rows] > radius]  # settled: nothing farther can be as close
            if len(rows) == 0:
                break
    out[todo] = order[best_rank]
    return out


def mined_brute_force(source_surfaces: list[str], target: TokenTable) -> np.ndarray:
    """The definition, for tests: over the whole target vocabulary, the id minimising
    (distance, is byte-fallback, id). int64 [len(source_surfaces)]."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    ids = np.array([i for i, s in enumerate(target.surface) if s is not None], dtype=np.int64)
    dist = process.cdist(source_surfaces, [target.surface[i] for i in ids.tolist()],
                         scorer=Levenshtein.distance, dtype=np.int32, workers=1)  # [S, T]
    key = np.lexsort((np.broadcast_to(ids, dist.shape), np.broadcast_to(target.byte_fallback[ids], dist.shape),
                      dist), axis=1)
    return ids[key[:, 0]]


def map_cache_path(cache_dir: str | Path, source_hash: str, target_hash: str, method: str, size: int) -> Path:
    key = hashlib.sha256(f"{source_hash}:{target_hash}:{method}:{size}:v{CACHE_VERSION}".encode()).hexdigest()
    return Path(cache_dir) / f"vocab-{method}-{key[:32]}.npy"


def vocab_map(source_tokenizer: Any, target_tokenizer: Any, method: str = "mined", cache_dir: str | Path | None = None,
              size: int | None = None, workers: int = 2) -> np.ndarray:
    """int32 [size]: source id -> target id (-1 = none), `method` 'exact' or 'mined'.

    size: the source model's vocabulary size (default the tokenizer's length; ids past the
    tokenizer map to -1). With `cache_dir`, the map is read from / written to
    `vocab-<method>-<key>.npy` there (key: both tokenizer hashes, method, size), atomically.
    """
    if method not in METHODS:
        raise ValueError(f"unknown vocabulary map method {method!r} (expected one of {METHODS})")
    size = len(source_tokenizer) if size is None else int(size)
    path = None
    if cache_dir is not None:
        path = map_cache_path(cache_dir, tokenizer_hash(source_tokenizer), tokenizer_hash(target_tokenizer), method, size)
        if path.is_file():
            return np.load(path)
    source, target = token_table(source_tokenizer, size), token_table(target_tokenizer)
    result = exact_map(source, target) if method == "exact" else mined_map(source, target, workers)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, result)
        os.replace(tmp, path)
    return result
