"""Schema of a plain-layout dataset (`fusedata export --layout plain`): the rows of a topk, aligned or
fused dataset with the top-k as Parquet-native lists instead of a codec's byte streams, so any
Parquet reader (pyarrow, polars, duckdb, `datasets`, the Hub viewer) sees numbers, no fusedata needed.

Position i of a row predicts the token after token i (as in the dataset it was exported from). Each
position lists only its real entries, best first: a merged or mapped distribution with fewer than k
ids has a shorter list (no −1 / −inf padding). The other columns are those of the source kind, as they
were (a fused row keeps its per-window `winner`, `weights` and `candidate_ce`; an aligned row its
`align_kind`). The source kind is in the schema metadata (`fusedata.plain.of`) and the manifest.
"""

from __future__ import annotations

import pyarrow as pa

from schemas import aligned, fused, topk
from schemas.common import column, with_kind

PLAIN_SCHEMA_VERSION = 1
OF_KEY = b"fusedata.plain.of"  # the kind the rows come from: topk | aligned | fused
KINDS = ("topk", "aligned", "fused")

PER_POSITION = "per position i (predicting the next token)"
TOPK_FIELDS = [
    column("topk_ids", pa.list_(pa.list_(pa.int32())),
           f"{PER_POSITION}: the top-k token ids, most likely first (at most k; fewer where a merged "
           "distribution has fewer)", "[n−1][≤k]"),
    column("topk_logprobs", pa.list_(pa.list_(pa.float32())),
           f"{PER_POSITION}: their log-probs, log-softmax over the full vocabulary (not renormalised)",
           "[n−1][≤k]"),
    column("gold_logprob", pa.list_(pa.float32()), f"{PER_POSITION}: log-prob of the actual next token", "[n−1]"),
    column("tail_mass", pa.list_(pa.float32()),
           f"{PER_POSITION}: probability outside the listed ids, 1 − Σ exp(topk_logprobs)", "[n−1]"),
]
TOPK_NAMES = tuple(f.name for f in TOPK_FIELDS)


def base_fields(kind: str) -> list[pa.Field]:
    """The non-top-k columns of a source kind (its schema's BASE_FIELDS)."""
    return {"topk": topk.BASE_FIELDS, "aligned": aligned.BASE_FIELDS, "fused": fused.BASE_FIELDS}[kind]


def plain_schema(kind: str, k: int, extra: dict[bytes, bytes] | None = None) -> pa.Schema:
    """The plain layout of rows of `kind`: its base columns, then the four top-k list columns.
    `extra` carries the source's own metadata worth keeping (a fused dataset's candidate names)."""
    if kind not in KINDS:
        raise ValueError(f"no plain layout for a {kind!r} dataset (only {', '.join(KINDS)})")
    meta = {OF_KEY: kind.encode(), **(extra or {})}
    return with_kind(pa.schema(base_fields(kind) + TOPK_FIELDS), "plain", PLAIN_SCHEMA_VERSION, meta, k)


def kind_of(schema: pa.Schema) -> str | None:
    """The source kind recorded in a plain shard's schema metadata (None if it has none)."""
    raw = (schema.metadata or {}).get(OF_KEY)
    return raw.decode() if raw else None
