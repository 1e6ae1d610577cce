"""Schema of an `aligned/<source>` dataset: a source model's distributions on the target's
positions and vocabulary, one row per *target* window (same rows, same order as the target's
topk shard of the same name).

Position i of a row is the target's position i (predicting target token i+1). The codec
columns hold the source distribution mapped into target ids; entries with id -1 are padding.
`source_nll` / `source_bytes` are the source's own cross-entropy over the text the target
window predicts, in its own tokenisation: that is what makes CE comparable across tokenizers.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.common import with_kind

ALIGNED_SCHEMA_VERSION = 1

# align_kind values, per target position
ONE_TO_ONE, MANY_TO_ONE, ONE_TO_MANY, FALLBACK = 0, 1, 2, 3
ALIGN_KINDS = {ONE_TO_ONE: "1:1", MANY_TO_ONE: "many:1", ONE_TO_MANY: "1:many", FALLBACK: "fallback"}

BASE_FIELDS = [
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("window", pa.int32(), nullable=False),  # the target's window index
    pa.field("align_kind", pa.list_(pa.int8()), nullable=False),  # [n-1] see ALIGN_KINDS
    pa.field("mass_kept", pa.float32(), nullable=False),  # mean source top-k mass that survived mapping
    pa.field("source_nll", pa.float64(), nullable=False),  # source NLL (nats) over the window's predicted bytes
    pa.field("source_bytes", pa.int64(), nullable=False),  # bytes those source predictions cover
]


def aligned_schema(codec_fields: list[pa.Field], codec_metadata: dict[bytes, bytes], k: int) -> pa.Schema:
    return with_kind(pa.schema(BASE_FIELDS + list(codec_fields)), "aligned", ALIGNED_SCHEMA_VERSION, codec_metadata, k)
