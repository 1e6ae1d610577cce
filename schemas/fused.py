"""Schema of a `fused/` dataset: the product a trainer consumes, one row per target window.

Position i predicts `labels[i]` (= input_ids[i+1]). The codec columns hold the fused sparse
target distribution in target ids (entries with id -1 are padding). Candidate 0 is the target
model itself (unless fused with --no-target, i.e. plain distillation); the candidates' names are in the schema metadata (`fusedata.candidates`)
and the manifest.
"""

from __future__ import annotations

import json

import pyarrow as pa

from schemas.common import with_kind

FUSED_SCHEMA_VERSION = 1
CANDIDATES_KEY = b"fusedata.candidates"

BASE_FIELDS = [
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("window", pa.int32(), nullable=False),
    pa.field("byte_start", pa.int64(), nullable=False),
    pa.field("byte_end", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # [n] target tokens
    pa.field("labels", pa.list_(pa.int32()), nullable=False),  # [n-1] next-token labels
    pa.field("winner", pa.list_(pa.int8()), nullable=False),  # [n-1] MinCE: winning candidate; AvgCE: -1
    pa.field("weights", pa.list_(pa.float32()), nullable=False),  # [M] candidate weights (token unit: mean)
    pa.field("candidate_ce", pa.list_(pa.float32()), nullable=False),  # [M] CE of each candidate (window metric)
]


def fused_schema(codec_fields: list[pa.Field], codec_metadata: dict[bytes, bytes], k: int, candidates: list[str]) -> pa.Schema:
    extra = dict(codec_metadata)
    extra[CANDIDATES_KEY] = json.dumps(candidates).encode()
    return with_kind(pa.schema(BASE_FIELDS + list(codec_fields)), "fused", FUSED_SCHEMA_VERSION, extra, k)
