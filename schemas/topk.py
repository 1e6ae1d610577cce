"""Schema of a `topk/` dataset: one row per (document, window) of one model.

A window of n tokens has n-1 predicted positions: position i predicts token i+1.
Byte offsets are absolute offsets into the document's UTF-8 text, so alignment between
tokenizers needs no re-tokenisation and works across different window boundaries.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.common import with_kind

TOPK_SCHEMA_VERSION = 1

BASE_FIELDS = [
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("window", pa.int32(), nullable=False),  # window index within the document
    pa.field("byte_start", pa.int64(), nullable=False),  # window span [start, end) in document bytes
    pa.field("byte_end", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # [n] the model's own tokens
    pa.field("token_start", pa.list_(pa.int32()), nullable=False),  # [n] byte offset of each token
    pa.field("token_end", pa.list_(pa.int32()), nullable=False),  # [n]
    pa.field("ce", pa.float32(), nullable=False),  # mean cross-entropy (nats) over the n-1 positions
]


def topk_schema(codec_fields: list[pa.Field], codec_metadata: dict[bytes, bytes], k: int) -> pa.Schema:
    """The full schema: base columns followed by the codec's top-k columns."""
    return with_kind(pa.schema(BASE_FIELDS + list(codec_fields)), "topk", TOPK_SCHEMA_VERSION, codec_metadata, k)
