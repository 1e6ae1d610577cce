"""TopK <-> the plain layout's list columns (schemas/plain.py), vectorised over a whole shard.

Plain lists hold only a position's real entries; the in-memory `TopK` is a dense [N, k] array with
PAD_ID / −inf padding at the end of a position. Both directions are a handful of numpy/Arrow calls:
no Python loop over rows or positions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusedata.errors import UsageError
from fusedata.topk import PAD_ID, TopK
from schemas.plain import TOPK_NAMES


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())


def topk_columns(topk: TopK) -> dict[str, pa.Array]:
    """The four plain top-k columns of `topk`, one row per window (padding entries dropped)."""
    valid = topk.ids != PAD_ID  # [N, k], padding last in a position
    per_pos = valid.sum(axis=1)  # [N]
    windows = _offsets(topk.lengths)  # [W+1] into the positions
    positions = _offsets(per_pos)  # [N+1] into the entries

    def nested(values: np.ndarray, type_: pa.DataType) -> pa.Array:
        inner = pa.ListArray.from_arrays(positions, pa.array(values[valid], type_))
        return pa.ListArray.from_arrays(windows, inner)

    def flat(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(windows, pa.array(values.astype(np.float32), pa.float32()))

    return {
        "topk_ids": nested(topk.ids.astype(np.int32), pa.int32()),
        "topk_logprobs": nested(topk.logprobs.astype(np.float32), pa.float32()),
        "gold_logprob": flat(topk.gold_logprob),
        "tail_mass": flat(topk.tail_mass),
    }


def _column(table: pa.Table, name: str, source: str) -> pa.Array:
    if name not in table.column_names:
        raise UsageError(f"{source}: no column '{name}' (a plain layout has {', '.join(TOPK_NAMES)})")
    col = table.column(name)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count or (pa.types.is_list(arr.type) and pc.list_flatten(arr).null_count):
        raise UsageError(f"{source}: column '{name}' holds nulls")
    return arr


def _numbers(arr: pa.Array, dtype: type, name: str, source: str) -> np.ndarray:
    try:
        return pc.cast(arr, pa.from_numpy_dtype(dtype)).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UsageError(f"{source}: column '{name}' is not numeric ({exc})") from None


def topk_from_columns(table: pa.Table, k: int | None = None, source: str = "") -> TopK:
    """The TopK of a plain-layout table; `k` (the dataset's) pads shorter positions, None: the
    longest position's length. Lists that disagree in length are refused with the column named."""
    ids_col, lp_col = _column(table, "topk_ids", source), _column(table, "topk_logprobs", source)
    gold_col, tail_col = _column(table, "gold_logprob", source), _column(table, "tail_mass", source)
    lengths = ids_col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)  # [W] positions per row
    for name, col in (("topk_logprobs", lp_col), ("gold_logprob", gold_col), ("tail_mass", tail_col)):
        if not np.array_equal(col.value_lengths().to_numpy(zero_copy_only=False), lengths):
            raise UsageError(f"{source}: column '{name}' has a different number of positions per row than 'topk_ids'")
    ids_pos, lp_pos = pc.list_flatten(ids_col), pc.list_flatten(lp_col)  # one list per position
    per_pos = ids_pos.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)  # [N]
    if not np.array_equal(lp_pos.value_lengths().to_numpy(zero_copy_only=False), per_pos):
        raise UsageError(f"{source}: 'topk_logprobs' and 'topk_ids' differ in entries per position")
    widest = int(per_pos.max(initial=0))
    k = widest if k is None else int(k)
    if widest > k:
        raise UsageError(f"{source}: a position lists {widest} entries, more than k={k}")
    if per_pos.size and per_pos.min() < 1:
        raise UsageError(f"{source}: a position lists no entry (every position needs at least one)")
    n = per_pos.size
    rows = np.repeat(np.arange(n), per_pos)  # [E] position of each entry
    cols = np.arange(rows.size) - np.repeat(np.cumsum(per_pos) - per_pos, per_pos)  # [E] rank within it
    ids = np.full((n, k), PAD_ID, dtype=np.int32)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    ids[rows, cols] = _numbers(pc.list_flatten(ids_pos), np.int32, "topk_ids", source)
    lps[rows, cols] = _numbers(pc.list_flatten(lp_pos), np.float32, "topk_logprobs", source)
    if np.any(ids[rows, cols] < 0):
        raise UsageError(f"{source}: column 'topk_ids' holds negative ids")
    gold = _numbers(pc.list_flatten(gold_col), np.float32, "gold_logprob", source)
    tail = _numbers(pc.list_flatten(tail_col), np.float32, "tail_mass", source)
    return TopK(ids, lps, gold, tail, lengths)
