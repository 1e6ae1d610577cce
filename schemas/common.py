"""Helpers shared by the dataset schemas."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_KEY = b"fusedata.schema"


def with_kind(schema: pa.Schema, kind: str, version: int, extra: dict[bytes, bytes] | None = None) -> pa.Schema:
    """Attach the dataset kind/version (and codec metadata) to a schema."""
    meta = dict(schema.metadata or {})
    meta[SCHEMA_KEY] = f"{kind}/{version}".encode()
    meta.update(extra or {})
    return schema.with_metadata(meta)


def kind_of(schema: pa.Schema) -> str | None:
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    return raw.decode() if raw else None
