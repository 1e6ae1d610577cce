"""Schema of a `fused/` dataset: the product a trainer consumes, one row per target window.

Position i predicts `labels[i]` (= input_ids[i+1]). The codec columns hold the fused sparse
target distribution in target ids (entries with id -1 are padding). Candidate 0 is the target
model itself (unless fused with --no-target, i.e. plain distillation); the candidates' names are in the schema metadata (`fusedata.candidates`)
and the manifest.
"""

from __future__ import annotations

import json

import pyarrow as pa

from schemas import topk
from schemas.common import column, with_kind

FUSED_SCHEMA_VERSION = 1
CANDIDATES_KEY = b"fusedata.candidates"

BASE_FIELDS = [
    *topk.BASE_FIELDS[:4],  # doc_id, window, byte_start, byte_end: as in topk/
    column("input_ids", pa.list_(pa.int32()), "target tokens", "[n]"),
    column("labels", pa.list_(pa.int32()), "next-token labels (`input_ids[1:]`)", "[n−1]"),
    column("winner", pa.list_(pa.int8()), "MinCE: index of the winning candidate per position; AvgCE: −1", "[n−1]"),
    column("weights", pa.list_(pa.float32()), "candidate weights (token unit: mean over the window)", "[M]"),
    column("candidate_ce", pa.list_(pa.float32()),
           "each candidate's CE under the window metric (nats/byte by default)", "[M]"),
]


CHUNKS = "ALM (`fuse --alm-source`): each byte-aligned chunk's positions [start, end)"
# written only by `fuse --alm-source` (the ALM loss's input), after the codec's columns
CHUNK_FIELDS = [
    column("chunk_start", pa.list_(pa.int32()), CHUNKS, "[C]"),
    column("chunk_end", pa.list_(pa.int32()), CHUNKS, "[C]"),
    column("chunk_teacher_ll", pa.list_(pa.float32()),
           "ALM (`fuse --alm-source`): the source's log-likelihood (nats) of each chunk, from its stored gold log-probs",
           "[C]"),
]


def fused_schema(codec_fields: list[pa.Field], codec_metadata: dict[bytes, bytes], k: int, candidates: list[str],
                 chunks: bool = False) -> pa.Schema:
    extra = dict(codec_metadata)
    extra[CANDIDATES_KEY] = json.dumps(candidates).encode()
    fields = BASE_FIELDS + list(codec_fields) + (CHUNK_FIELDS if chunks else [])
    return with_kind(pa.schema(fields), "fused", FUSED_SCHEMA_VERSION, extra, k)
