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

from schemas.common import column, with_kind

ALIGNED_SCHEMA_VERSION = 1

# align_kind values, per target position
ONE_TO_ONE, MANY_TO_ONE, ONE_TO_MANY, FALLBACK = 0, 1, 2, 3
ALIGN_KINDS = {ONE_TO_ONE: "1:1", MANY_TO_ONE: "many:1", ONE_TO_MANY: "1:many", FALLBACK: "fallback"}

BASE_FIELDS = [
    column("doc_id", pa.string(), "document id"),
    column("window", pa.int32(), "the target's window number (same rows and order as the target's topk shard)"),
    column("align_kind", pa.list_(pa.int8()), "per target position: " + ", ".join(
        f"{code} = {name}" for code, name in ALIGN_KINDS.items()) + " (one-hot on the label)", "[n−1]"),
    column("mass_kept", pa.float32(), "share of the source top-k mass that survived the vocabulary map"),
    column("source_nll", pa.float64(), "the source's own NLL (nats) over the bytes the window predicts"),
    column("source_bytes", pa.int64(), "bytes those source predictions cover (CE per byte = source_nll / source_bytes)"),
]


def aligned_schema(codec_fields: list[pa.Field], codec_metadata: dict[bytes, bytes], k: int) -> pa.Schema:
    return with_kind(pa.schema(BASE_FIELDS + list(codec_fields)), "aligned", ALIGNED_SCHEMA_VERSION, codec_metadata, k)
