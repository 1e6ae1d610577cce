"""The plain reference codec: float32 log-probs and int32 ids in Arrow lists.

Lossless and simple; kept as the baseline the compact codecs are measured against.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from fusedata.codec.base import Codec, CodecError, register
from fusedata.topk import TopK


def _list_array(flat: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values and per-row lengths of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
    return arr.flatten().to_numpy(zero_copy_only=False), lengths


@register
class RawCodec(Codec):
    name = "raw"
    version = 1

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("topk_ids", pa.list_(pa.int32())),
            pa.field("topk_logprobs", pa.list_(pa.float32())),
            pa.field("gold_logprob", pa.list_(pa.float32())),
            pa.field("tail_mass", pa.list_(pa.float32())),
        ]

    def encode(self, topk: TopK) -> dict[str, pa.Array]:
        off = topk.offsets()
        return {
            "topk_ids": _list_array(topk.ids.astype(np.int32).ravel(), off * topk.k),
            "topk_logprobs": _list_array(topk.logprobs.astype(np.float32).ravel(), off * topk.k),
            "gold_logprob": _list_array(topk.gold_logprob.astype(np.float32), off),
            "tail_mass": _list_array(topk.tail_mass.astype(np.float32), off),
        }

    def decode(self, columns: pa.Table, k: int) -> TopK:
        ids, id_len = _flat(columns["topk_ids"])
        lps, _ = _flat(columns["topk_logprobs"])
        gold, lengths = _flat(columns["gold_logprob"])
        tail, _ = _flat(columns["tail_mass"])
        if not np.array_equal(id_len, lengths * k) or ids.size != lps.size:
            raise CodecError("raw codec: top-k lists disagree with the number of positions")
        return TopK(
            ids.astype(np.int32).reshape(-1, k),
            lps.astype(np.float32).reshape(-1, k),
            gold.astype(np.float32),
            tail.astype(np.float32),
            lengths.astype(np.int64),
        )
