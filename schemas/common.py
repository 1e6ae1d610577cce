"""Helpers shared by the dataset schemas."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_KEY = b"fusedata.schema"
DESCRIPTION_KEY = b"description"  # a column's meaning, in its field metadata (README tables, dataset card)
SHAPE_KEY = b"shape"  # a list column's length per row, e.g. "[n]", "[n−1]", "[M]"
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


def column(name: str, type_: pa.DataType, description: str, shape: str = "") -> pa.Field:
    """A non-null column with its meaning (and list length) in the field metadata."""
    meta = {DESCRIPTION_KEY: description.encode()}
    if shape:
        meta[SHAPE_KEY] = shape.encode()
    return pa.field(name, type_, nullable=False, metadata=meta)


def description(f: pa.Field) -> tuple[str, str]:
    """(meaning, shape) of a column defined with `column()`, ("", "") for others."""
    meta = f.metadata or {}
    return meta.get(DESCRIPTION_KEY, b"").decode(), meta.get(SHAPE_KEY, b"").decode()


def without_descriptions(schema: pa.Schema) -> pa.Schema:
    """The schema as written to files: descriptions document the code, shards stay as they were."""
    return pa.schema([f.remove_metadata() for f in schema], metadata=schema.metadata)
