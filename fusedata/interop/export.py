"""`fusedata export` and `fusedata import`: a dataset in another layout and back, as stages.

Both are `Stage`s (fusedata/stages/base.py), so `run_stage` gives them what every dataset gets: a run
record, atomic shards with the source's shard names, resume, skip-when-done, `--overwrite` that
replaces only once the new dataset is complete, and the manifest last.

- export: a topk, aligned or fused dataset -> a layout that needs no fusedata to read (`plain`:
  schemas/plain.py; the trainer layouts: fusedata/interop/layouts.py). The source is decoded
  through the codec's public `decode_topk`, whatever codec version wrote it.
- import: a plain dataset -> the compact codec again, with the source's own kind and run record
  (so an imported target still matches the aligned datasets made against the original), or a plain
  dataset made elsewhere, described by `--model` (its tokenizer) so it can be aligned, fused, trained.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusedata.codec import DEFAULT_CODEC, CodecError, decode_topk, get_codec
from fusedata.dataset import DatasetDir, open_dataset, read_shard, run_digest, sha256_file, table_tokens
from fusedata.errors import OptionError, UsageError, check_options, field_choices
from fusedata.interop import layouts
from fusedata.interop.plain import topk_from_columns
from fusedata.stages.base import JobOptions, Stage, Task, run_stage
from fusedata.storage import is_uri
from schemas import plain
from schemas.aligned import aligned_schema
from schemas.common import k_of
from schemas.fused import CANDIDATES_KEY, fused_schema
from schemas.manifest import MANIFEST_NAME, Manifest
from schemas.topk import topk_schema


@dataclass(frozen=True)
class ExportConfig:
    layout: str = field(default="plain", metadata={"choices": tuple(layouts.LAYOUTS)})

    def __post_init__(self) -> None:
        check_options(field_choices(self))


@dataclass(frozen=True)
class ExportJob(JobOptions):
    source: str
    output: str
    config: ExportConfig = field(default_factory=ExportConfig)


def _layout_stats(out: DatasetDir, names: list[str], source: Manifest, source_dir: str) -> dict[str, Any]:
    """Size figures of the written layout beside the source's (bytes per predicted position)."""
    positions = source.stats.get("positions") or max(source.tokens - source.rows, 1)
    written = sum(out.shard_path(n).size() for n in names)
    src_bytes = sum(s.bytes for s in source.shards)
    return {"of": source.kind, "positions": int(positions), "bytes": written,
            "bytes_per_token": written / max(positions, 1), "source_bytes": src_bytes,
            "source_bytes_per_token": src_bytes / max(positions, 1), "source_stats": source.stats}


class ExportStage(Stage):
    """One source shard in -> the same rows in the chosen layout, same shard name."""

    label = "export"

    def __init__(self, job: ExportJob) -> None:
        self.job, self.output = job, job.output
        if is_uri(job.source):  # its readers take local paths (the output may be a URI)
            raise UsageError(f"{job.source}: export reads a dataset on local disk only; copy it to a local "
                             "folder first")
        self.layout = layouts.LAYOUTS[job.config.layout]
        self.source = open_dataset(job.source, verify=job.verify)
        if self.source.kind not in plain.KINDS:
            raise UsageError(f"{job.source}: is a '{self.source.kind}' dataset; export takes a topk, aligned or "
                             "fused dataset")
        if not self.source.shards:
            raise UsageError(f"{job.source}: the manifest lists no shards; nothing to export")
        first = pq.read_schema(Path(job.source) / self.source.shards[0].name)
        self.k = k_of(first)
        keep = {key: v for key, v in (first.metadata or {}).items() if key == CANDIDATES_KEY}
        self.kind = self.layout.kind
        try:
            self.schema = self.layout.schema(self.source.kind, self.k, keep)
        except ValueError as exc:
            raise UsageError(f"{job.source}: no {job.config.layout} layout of it: {exc}") from None

    def identity(self) -> dict[str, Any]:
        return {"stage": "export", "layout": self.job.config.layout, "of": self.source.kind,
                "k": self.k, "source_run": self.source.run, "source_digest": run_digest(self.source.run),
                "source_shards": [s.sha256 for s in self.source.shards]}

    def inputs(self) -> list[str]:
        return [self.job.source]

    def tasks(self) -> list[Task]:
        return [Task(s.name) for s in self.source.shards]

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        path = Path(self.job.source) / task.name
        table = read_shard(path)
        topk = decode_topk(table, str(path))
        out = self.layout.convert(table, topk, self.source.kind, self.k)
        if on_tokens is not None:
            on_tokens(int(topk.n_positions))
        return out

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        return _layout_stats(out, names, self.source, self.job.source)

    def summary(self, manifest: Manifest) -> str:
        s = manifest.stats
        return (f"{self.output}: {manifest.rows} rows of {s['of']} in the {self.job.config.layout} layout, "
                f"{s['bytes_per_token']:.1f} bytes/position (the source: {s['source_bytes_per_token']:.1f})")


def run_export(job: ExportJob, executor: Any = None) -> Manifest:
    """Write `job.source` in `job.config.layout` to `job.output`."""
    return run_stage(ExportStage(job), executor, overwrite=job.overwrite, quiet=job.quiet, log=job.log).manifest


# -- import -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportConfig:
    codec: str = DEFAULT_CODEC
    # a plain dataset made elsewhere (no fusedata manifest): the model whose tokenizer made its ids
    model: str = ""
    max_length: int = 0  # foreign data: the window length it was made with (0: its longest row)

    def __post_init__(self) -> None:
        try:
            get_codec(self.codec)
        except CodecError as exc:
            raise OptionError("codec", str(exc)) from None
        check_options([("max_length", self.max_length >= 0, "must be >= 0 (0: the longest row)")])


@dataclass(frozen=True)
class ImportJob(JobOptions):
    source: str
    output: str
    config: ImportConfig = field(default_factory=ImportConfig)


class ImportStage(Stage):
    """One plain shard in -> the same rows with the top-k in the codec, in the source's own kind."""

    label = "import"

    def __init__(self, job: ImportJob) -> None:
        self.job, self.output = job, job.output
        self.codec = get_codec(job.config.codec)
        folder = Path(job.source)
        if (folder / MANIFEST_NAME).is_file():
            self.plain = open_dataset(folder, "plain", verify=job.verify)
            self.files = [folder / s.name for s in self.plain.shards]
            run = self.plain.run
            self.kind, self.k, self.source_run = run["of"], int(run["k"]), run["source_run"]
            self.source_stats = self.plain.stats.get("source_stats", {})
            first = pq.read_schema(self.files[0])
        else:
            self.plain = None
            self.files = _foreign_files(job.source)
            first = pq.read_schema(self.files[0])
            self.kind = plain.kind_of(first) or "topk"
            if self.kind != "topk":
                raise UsageError(f"{job.source}: a plain {self.kind} dataset without its fusedata manifest cannot be "
                                 "imported (only topk rows: the model's own distributions)")
            self.source_run = self._foreign_run(first)  # sets self.k
            self.source_stats = {}
        self.codec.check_k(self.k)
        cands = (first.metadata or {}).get(CANDIDATES_KEY)
        self.candidates = json.loads(cands) if cands else []
        self.schema = self._schema(self.k)

    def _schema(self, k: int) -> pa.Schema:
        fields, meta = self.codec.fields(), self.codec.metadata()
        if self.kind == "topk":
            return topk_schema(fields, meta, k)
        if self.kind == "aligned":
            return aligned_schema(fields, meta, k)
        return fused_schema(fields, meta, k, self.candidates)

    def _foreign_run(self, first: pa.Schema) -> dict[str, Any]:
        """The run record of a plain topk dataset made elsewhere: its files, and the model named by
        --model (tokenizer hash and vocabulary size, which align checks); k and the window length
        are read from the data."""
        from fusedata.models.spec import load_config, load_tokenizer, resolve, tokenizer_hash, weights_hash

        if not self.job.config.model:
            raise UsageError(f"{self.job.source}: has no fusedata manifest; say which model's tokenizer made its "
                             "token ids with --model")
        missing = [f.name for f in plain.base_fields("topk") if f.name not in first.names and f.name != "ce"]
        missing += [n for n in plain.TOPK_NAMES if n not in first.names]
        if missing:
            raise UsageError(f"{self.files[0]}: missing column(s) {', '.join(missing)} of the plain topk layout")
        ref = resolve(self.job.config.model)
        tok = load_tokenizer(ref)
        k = max_length = 0
        for f in self.files:
            t = read_shard(f, columns=["input_ids", "topk_ids"])
            k = max(k, int(pc.max(pc.list_value_length(pc.list_flatten(t.column("topk_ids")))).as_py() or 0))
            max_length = max(max_length, int(pc.max(pc.list_value_length(t.column("input_ids"))).as_py() or 0))
        self.k = k
        cfg = load_config(ref)
        vocab = int(getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", 0))
        return {"stage": "import", "model": self.job.config.model, "model_path": ref.path,
                "model_hash": weights_hash(ref.path), "licence": ref.licence, "tokenizer_hash": tokenizer_hash(tok),
                "vocab_size": vocab or len(tok), "top_k": k, "max_length": self.job.config.max_length or max_length,
                "dtype": "unknown", "corpus_hash": _files_digest(self.files), "docs_per_shard": None,
                "imported_files": [f.name for f in self.files]}

    def identity(self) -> dict[str, Any]:
        if self.plain is None:
            return self.source_run | {"codec": self.codec.spec()}
        run = dict(self.source_run)
        run.update(stage="import", codec=self.codec.spec(), imported_from=run_digest(self.plain.run),
                   original_stage=self.source_run.get("stage"))
        return run

    def inputs(self) -> list[str]:
        return [self.job.source]

    def tasks(self) -> list[Task]:
        return [Task(f.name if self.plain is not None else f"shard-{i:05d}.parquet") for i, f in enumerate(self.files)]

    def _file(self, name: str) -> Path:
        return Path(self.job.source) / name if self.plain is not None else self.files[int(name[6:11])]

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        path = self._file(task.name)
        table = read_shard(path)
        topk = topk_from_columns(table, self.k, str(path))
        if "input_ids" in table.column_names:
            n = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
            if not np.array_equal(np.maximum(n - 1, 0), topk.lengths):
                raise UsageError(f"{path}: rows must have one top-k position per predicted token "
                                 "(len(input_ids) − 1 positions)")
        if self.kind == "topk" and "ce" not in table.column_names:  # a foreign topk: its CE from the gold log-probs
            sums = np.add.reduceat(-topk.gold_logprob.astype(np.float64), topk.offsets()[:-1]) if topk.n_positions \
                else np.zeros(0)
            ce = np.where(topk.lengths > 0, sums / np.maximum(topk.lengths, 1), 0.0)
            table = table.append_column("ce", pa.array(ce.astype(np.float32)))
        try:
            columns = self.codec.encode(topk)
        except CodecError as exc:
            raise UsageError(f"{path}: {exc}") from None
        base = [f.name for f in plain.base_fields(self.kind)]
        out = pa.table({name: table.column(name) for name in base} | columns)
        if on_tokens is not None:
            on_tokens(table_tokens(out) if "input_ids" in out.column_names else int(topk.n_positions))
        return out

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        written = sum(out.shard_path(n).size() for n in names)
        positions = int(self.source_stats.get("positions") or _positions(out, names))
        return {**self.source_stats, "positions": positions, "bytes": written,
                "bytes_per_token": written / max(positions, 1)}

    def summary(self, manifest: Manifest) -> str:
        return (f"{self.output}: {manifest.rows} {self.kind} rows, codec {self.codec.name} v{self.codec.version}, "
                f"{manifest.stats['bytes_per_token']:.1f} bytes/position")


def _positions(out: DatasetDir, names: list[str]) -> int:
    n = 0
    for name in names:
        col = read_shard(out.shard_path(name), columns=["input_ids"]).column(0)
        n += int(pc.sum(pc.max_element_wise(pc.subtract(pc.list_value_length(col), 1), 0)).as_py() or 0)
    return n


def _foreign_files(source: str) -> list[Path]:
    """The Parquet files of a plain dataset made elsewhere: a folder (searched recursively) or a glob."""
    p = Path(source)
    found = sorted(p.rglob("*.parquet")) if p.is_dir() else sorted(Path(f) for f in glob.glob(source))
    found = [f for f in found if not any(part.startswith((".", "_")) for part in f.parts[len(p.parts):])]
    if not found:
        raise UsageError(f"{source}: no Parquet files to import")
    return found


def _files_digest(files: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def run_import(job: ImportJob, executor: Any = None) -> Manifest:
    """Write the plain dataset `job.source` back in the compact codec to `job.output`."""
    return run_stage(ImportStage(job), executor, overwrite=job.overwrite, quiet=job.quiet, log=job.log).manifest
