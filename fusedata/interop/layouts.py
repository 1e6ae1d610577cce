"""The layouts `fusedata export` writes: each is a schema and a function from a decoded shard to it.

A layout gets the source shard's table (its base columns) and its decoded `TopK`, and returns the rows
to write; `run_stage` writes them against the layout's schema. The manifest kind is the layout's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from fusedata.interop.plain import topk_columns
from fusedata.topk import TopK
from schemas import plain


@dataclass(frozen=True)
class Layout:
    kind: str  # manifest kind of the exported dataset
    schema: Callable[[str, int, dict[bytes, bytes]], pa.Schema]  # (source kind, k, kept metadata) -> schema
    convert: Callable[[pa.Table, TopK, str, int], pa.Table]  # (source table, its top-k, source kind, k) -> rows
    summary: str  # what it keeps and loses, for --help and the README


def to_plain(table: pa.Table, topk: TopK, kind: str, k: int) -> pa.Table:
    """The source's base columns as they are, then the four top-k list columns."""
    base = {f.name: table.column(f.name) for f in plain.base_fields(kind)}
    return pa.table(base | topk_columns(topk))


LAYOUTS: dict[str, Layout] = {
    "plain": Layout("plain", plain.plain_schema, to_plain,
                    "every column of the source; the top-k as list<list<int32>> ids and list<list<float32>> "
                    "log-probs, gold log-prob and tail mass per position: loses nothing but the codec's compactness"),
}
