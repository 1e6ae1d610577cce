"""`fusedata.load(path)`: any fusedata dataset folder as a `datasets.Dataset`, top-k decoded lazily.

The rows are the shards' rows, memory-mapped by `datasets` (nothing is decoded up front); a transform
(`with_transform`) decodes the top-k of only the rows you index or iterate, whatever layout holds them
(a codec column such as `topk_zq`, or the plain layout's lists), into the same four columns:

    topk_ids       [n−1][k] int32, most likely first; −1 pads a position with fewer than k entries
    topk_logprobs  [n−1][k] float32, log-softmax over the full vocabulary; −inf on padding
    gold_logprob   [n−1]    float32
    tail_mass      [n−1]    float32

`datasets` drops the Parquet schema metadata that names the codec and k, so both are read once here
from the first shard and carried by the transform.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusedata.codec import codec_from_schema
from fusedata.dataset import open_dataset
from fusedata.errors import UsageError
from fusedata.topk import TopK
from schemas.common import k_of
from schemas.plain import TOPK_NAMES

DECODED = ("topk_ids", "topk_logprobs", "gold_logprob", "tail_mass")


class TopKDecoder:
    """Decodes the top-k columns of a batch of rows, for the layout of one dataset's first shard."""

    def __init__(self, shard: str | Path) -> None:
        schema = pq.read_schema(shard)
        self.source = str(shard)
        self.k = k_of(schema)
        self.plain = all(n in schema.names for n in TOPK_NAMES) and b"fusedata.codec" not in (schema.metadata or {})
        self.codec = None if self.plain else codec_from_schema(schema, self.source)
        self.fields = [schema.field(n) for n in (TOPK_NAMES if self.plain else [f.name for f in self.codec.fields()])]

    @property
    def columns(self) -> list[str]:
        """The stored columns the top-k is decoded from."""
        return [f.name for f in self.fields]

    def decode_table(self, table: pa.Table) -> TopK:
        from fusedata.interop.plain import topk_from_columns

        if self.plain:
            return topk_from_columns(table, self.k, self.source)
        return self.codec.decode(table, self.k)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """A `with_transform` function: the batch with its stored top-k columns replaced by DECODED."""
        table = pa.table({f.name: pa.array(batch[f.name], f.type) for f in self.fields})
        topk = self.decode_table(table)
        off = topk.offsets()
        out = {name: values for name, values in batch.items() if name not in self.columns}
        rows = [slice(int(off[i]), int(off[i + 1])) for i in range(len(topk.lengths))]
        out["topk_ids"] = [topk.ids[s] for s in rows]
        out["topk_logprobs"] = [topk.logprobs[s] for s in rows]
        out["gold_logprob"] = [topk.gold_logprob[s] for s in rows]
        out["tail_mass"] = [topk.tail_mass[s] for s in rows]
        return out


def load(path: str | Path, *, verify: bool = True, cache_dir: str | None = None) -> Any:
    """A finished dataset folder (topk, aligned, fused, or one exported plain) as a `datasets.Dataset`
    whose top-k columns decode on access. The manifest is checked first (shards' sha256 with `verify`);
    it is in `ds.info.description` as JSON, the candidates of a fused dataset among it."""
    import datasets

    folder = Path(path)
    manifest = open_dataset(folder, verify=verify)
    if not manifest.shards:
        raise UsageError(f"{folder}: the manifest lists no shards; nothing to load")
    files = [str(folder / s.name) for s in manifest.shards]
    decoder = TopKDecoder(files[0])
    ds = datasets.Dataset.from_parquet(files, cache_dir=cache_dir)
    ds.info.description = json.dumps({"kind": manifest.kind, "run": manifest.run, "k": decoder.k})
    return ds.with_transform(decoder)


def rows_of(table: pa.Table, decoder: TopKDecoder) -> list[dict[str, np.ndarray]]:
    """Training windows of one shard: input_ids, labels (a fused row's own, else input_ids[1:]) and the
    decoded top-k per position, as numpy arrays."""
    if "input_ids" not in table.column_names:
        raise UsageError(f"{decoder.source}: has no input_ids (an aligned dataset); train on a fused or topk one")
    topk = decoder.decode_table(table)
    off = topk.offsets()
    ids = table.column("input_ids").to_pylist()
    labels = table.column("labels").to_pylist() if "labels" in table.column_names else [r[1:] for r in ids]
    rows = []
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        s = slice(int(off[i]), int(off[i + 1]))
        rows.append({"input_ids": x, "labels": y, "topk_ids": topk.ids[s], "topk_lp": topk.logprobs[s],
                     "tail": topk.tail_mass[s]})
    return rows
