"""Helpers shared by the dataset schemas."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_KEY = b"fusedata.schema"
K_KEY = b"fusedata.k"  # entries per position in the top-k columns


def with_kind(schema: pa.Schema, kind: str, version: int, extra: dict[bytes, bytes] | None = None,
              k: int | None = None) -> pa.Schema:
    """Attach the dataset kind/version, k and codec metadata to a schema."""
    meta = dict(schema.metadata or {})
    meta[SCHEMA_KEY] = f"{kind}/{version}".encode()
    if k is not None:
        meta[K_KEY] = str(int(k)).encode()
    meta.update(extra or {})
    return schema.with_metadata(meta)


def k_of(schema: pa.Schema) -> int:
    raw = (schema.metadata or {}).get(K_KEY)
    if raw is None:
        raise ValueError("no top-k size (fusedata.k) in the schema metadata")
    return int(raw)
