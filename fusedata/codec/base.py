"""The codec interface for top-k columns, and the registry of codec versions.

A codec turns a `TopK` batch into Arrow columns (one row per window) and back. Its name,
version and parameters are written into the Parquet schema metadata and the manifest, so
a reader always knows how to decode a file, and old versions stay registered.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any

import pyarrow as pa

from fusedata.topk import TopK

METADATA_KEY = b"fusedata.codec"


class CodecError(ValueError):
    """A top-k column that cannot be decoded: unknown codec, corrupt or truncated data."""


class Codec(ABC):
    """Encode and decode the top-k columns of one window per row."""

    name: str = ""
    version: int = 0
    # a version that is not yet the default: `get_codec(name)` skips it, "name@version" selects it
    opt_in: bool = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def fields(self) -> list[pa.Field]:
        """The Arrow fields this codec writes, in order."""

    @abstractmethod
    def encode(self, topk: TopK) -> dict[str, pa.Array]:
        """Columns for `len(topk.lengths)` rows, keyed by field name."""

    @abstractmethod
    def decode(self, columns: pa.Table, k: int) -> TopK:
        """Inverse of encode; `columns` holds at least this codec's fields."""

    def check_k(self, k: int) -> None:
        """Refuse a k this codec cannot store (raise CodecError) before any work is done."""
        if k < 1:
            raise CodecError(f"{self.name}: k={k} must be >= 1")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": self.params}

    def metadata(self) -> dict[bytes, bytes]:
        return {METADATA_KEY: json.dumps(self.spec(), sort_keys=True).encode()}


_REGISTRY: dict[tuple[str, int], type[Codec]] = {}
_LATEST: dict[str, int] = {}


def register(cls: type[Codec]) -> type[Codec]:
    _REGISTRY[(cls.name, cls.version)] = cls
    if not cls.opt_in:
        _LATEST[cls.name] = max(_LATEST.get(cls.name, 0), cls.version)
    return cls


def get_codec(name: str, version: int | None = None, **params: Any) -> Codec:
    """The codec `name` at `version` (if None: the version written in `name@version`, else the
    latest version that is not opt-in)."""
    if "@" in name:
        name, _, v = name.partition("@")
        if not v.isdigit() or (version is not None and int(v) != version):
            raise CodecError(f"bad codec version in {name}@{v}: expected name@<integer>")
        version = int(v)
    version = _LATEST.get(name) if version is None else version
    cls = _REGISTRY.get((name, version))  # type: ignore[arg-type]
    if cls is None:
        known = ", ".join(f"{n} v{v}" for n, v in sorted(_REGISTRY))
        raise CodecError(f"unknown codec {name!r} version {version}; this fusedata reads: {known}")
    return cls(**params)


def codec_from_spec(spec: dict[str, Any]) -> Codec:
    return get_codec(spec["name"], int(spec["version"]), **spec.get("params", {}))


def codec_from_schema(schema: pa.Schema, source: str = "") -> Codec:
    """The codec recorded in a Parquet file's schema metadata."""
    meta = schema.metadata or {}
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise CodecError(f"{source}: no fusedata codec recorded in the schema metadata")
    try:
        return codec_from_spec(json.loads(raw))
    except CodecError as exc:
        raise CodecError(f"{source}: {exc}") from None
