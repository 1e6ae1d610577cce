"""Schema of a `topk/` dataset: one row per (document, window) of one model.

A window of n tokens has n-1 predicted positions: position i predicts token i+1.
Byte offsets are absolute offsets into the document's UTF-8 text, so alignment between
tokenizers needs no re-tokenisation and works across different window boundaries.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.common import column, with_kind

TOPK_SCHEMA_VERSION = 1

# Each extract shard's file metadata: what its worker read, as JSON: `sha256` of the input bytes
# (JSONL lines, whole text files; for Parquet the ids and texts of its rows), `bytes`, and the
# documents read / empty ones skipped / bad lines skipped. The manifest's corpus figures are summed
# from these, and `input_sha256` of each manifest shard entry is this hash.
INPUT_KEY = b"fusedata.input"

SPAN = "the window's span in the document's UTF-8 bytes"
TOKEN_OFFSETS = "byte offsets of each token in the document (BOS: empty span)"

BASE_FIELDS = [
    column("doc_id", pa.string(), "document id"),
    column("window", pa.int32(), "window number within the document"),
    column("byte_start", pa.int64(), SPAN),  # [start, end)
    column("byte_end", pa.int64(), SPAN),
    column("input_ids", pa.list_(pa.int32()), "the model's own tokens", "[n]"),
    column("token_start", pa.list_(pa.int32()), TOKEN_OFFSETS, "[n]"),
    column("token_end", pa.list_(pa.int32()), TOKEN_OFFSETS, "[n]"),
    column("ce", pa.float32(), "mean cross-entropy (nats) of the window's n−1 predictions"),
]


def topk_schema(codec_fields: list[pa.Field], codec_metadata: dict[bytes, bytes], k: int) -> pa.Schema:
    """The full schema: base columns followed by the codec's top-k columns."""
    return with_kind(pa.schema(BASE_FIELDS + list(codec_fields)), "topk", TOPK_SCHEMA_VERSION, codec_metadata, k)
