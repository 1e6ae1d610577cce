"""Dataset folders: atomic shard writes, resume, and the manifest written last.

Conventions shared by every stage (after datatrove's completion markers):
- a shard is written to a temporary name in the same folder and moved into place (a rename on a
  local disk, a copy on object stores: fusedata/storage.py), so a file named `shard-*.parquet` is
  always complete and is never recomputed;
- `_run.json`, written when a run starts, holds the run's identity; a folder holding another
  run's identity is refused unless the caller asks to overwrite;
- `_manifest.json` is written last (also atomically) and lists every shard with its sha256;
- `_lock.json` exists while a run writes the folder (`writing()`, fusedata/writer_lock.py): one
  writer at a time.

A folder is a local path or a URI (s3://, gs://, …): every file operation goes through
`fusedata.storage.Location`, one code path for both.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import fusedata
from fusedata.errors import UsageError
from fusedata.storage import Location, PathLike, locate
from fusedata.writer_lock import WriterLock, is_lock_file
from schemas.common import without_descriptions
from schemas.lock import LOCK_NAME
from schemas.manifest import MANIFEST_NAME, Manifest, ShardEntry
from schemas.topk import INPUT_KEY

RUN_NAME = "_run.json"
SHARD_GLOB = "shard-*.parquet"
SHARD_RE = re.compile(r"shard-\d{5}\.parquet")  # names shard_name() gives
TMP_RE = re.compile(r"\..+\.tmp-\d+")
STAGING_NAME = ".overwrite"  # DatasetDir.staging()
STAGES = frozenset({"extract", "align", "fuse", "explore", "export", "import"})  # the `stage` of every run record fusedata writes
ZSTD_LEVEL = 6


# Where things were found on the machine that ran the stage: recorded, but not part of what a run
# *is*, so moving the model cache (FUSEDATA_CACHE) or a dataset to another machine changes nothing.
LOCATION_KEYS = frozenset({"model_path"})


def run_key(run: Any) -> Any:
    """A run's identity without location keys (at any depth)."""
    if isinstance(run, dict):
        return {k: run_key(v) for k, v in run.items() if k not in LOCATION_KEYS}
    if isinstance(run, list):
        return [run_key(v) for v in run]
    return run


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _comparable(run_key(a)) == _comparable(run_key(b))


def _comparable(run: Any) -> Any:
    """A run key as compared with another: fuse records written before #21 carried the (unused) AvgCE
    temperature of MinCE runs; today's do not, and the two are the same run. (Digests are not
    changed: they tie exports to the record as written.)"""
    f = run.get("fuse") if isinstance(run, dict) and run.get("stage") == "fuse" else None
    if isinstance(f, dict) and f.get("method") == "mince" and "temperature" in f:
        run = {**run, "fuse": {k: v for k, v in f.items() if k != "temperature"}}
    return run


def run_digest(run: dict[str, Any]) -> str:
    """A short identity of a run (used to tie derived datasets to their inputs); where the model
    was found (model_path) is not part of it."""
    return hashlib.sha256(json.dumps(run_key(run), sort_keys=True).encode()).hexdigest()[:16]


# What a dataset made against a target (aligned, fused) must agree on with that target's topk run.
TARGET_KEYS = ("tokenizer_hash", "corpus_hash", "max_length", "docs_per_shard", "model_hash")


def target_identity(target_run: dict[str, Any]) -> dict[str, Any]:
    """The `target` entry of a derived dataset's run record."""
    return {k: target_run.get(k) for k in TARGET_KEYS} | {"model": target_run["model"]}


def check_same_target(target: Manifest, target_path: str, other: Manifest, other_path: str) -> None:
    """Refuse a derived dataset that was made against another target, saying what differs."""
    recorded = other.run.get("target", {})
    diffs = [k for k in TARGET_KEYS if recorded.get(k) != target.run.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} vs {target.run.get(k)!r}" for k in diffs)
        raise UsageError(f"{other_path} was made against a different target than {target_path} ({shown})")


def check_same_corpus(a: Manifest, a_path: Any, b: Manifest, b_path: Any) -> None:
    """Refuse two topk datasets extracted from different corpora. They are compared by content (the
    sum of the documents' digests that extract records as `corpus_content`), so copies of one corpus
    at other paths, on other machines or in object storage agree; a dataset made before fusedata
    recorded it is compared by its run's `corpus_hash`, which comes from the listing (paths, sizes,
    modification times), so there only the very same files agree."""
    ca, cb = a.stats.get("corpus_content"), b.stats.get("corpus_content")
    if ca and cb:
        if ca != cb:
            raise UsageError(f"{a_path} and {b_path} were extracted from different corpora (their documents "
                             f"differ: corpus_content {ca[:12]}… vs {cb[:12]}…)")
        return
    if a.run.get("corpus_hash") != b.run.get("corpus_hash"):
        older = a_path if not ca else b_path
        raise UsageError(f"{a_path} and {b_path} were extracted from different corpora (corpus_hash differs; {older} "
                         "records no corpus_content, so the corpora are compared by their file listing: paths, sizes "
                         "and times; extract it again to compare them by their documents)")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def sha256_file(path: PathLike | Location) -> str:
    h = hashlib.sha256()
    for block in locate(path).blocks():
        h.update(block)
    return h.hexdigest()


def atomic_write_text(path: PathLike | Location, text: str) -> None:
    """Write `text` via a temporary name: an interrupted write leaves no partial file behind."""
    locate(path).write_text_atomic(text)


def stat_columns(schema: pa.Schema) -> list[str]:
    """Columns worth min/max statistics: the flat scalar ones (doc_id, window, ...). Statistics
    on list and binary codec columns copy blob bytes into page headers and cost ~1.5 B/token."""
    return [f.name for f in schema if not pa.types.is_nested(f.type) and not pa.types.is_binary(f.type)]


def write_parquet_atomic(table: pa.Table, path: PathLike | Location, schema: pa.Schema) -> None:
    """Write `table` (cast to `schema`, which is enforced) to `path` via a temporary name."""
    path = locate(path)
    schema = without_descriptions(schema)
    try:
        table = table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"table does not match the schema for {path.name}: {exc}") from exc
    path.write_atomic(lambda tmp: pq.write_table(
        table, tmp.path, filesystem=tmp.fs, compression="zstd", compression_level=ZSTD_LEVEL,
        write_statistics=stat_columns(schema), write_page_checksum=True))


def _same_columns(got: pa.Schema, want: pa.Schema) -> bool:
    """The same column names and types (a list's item may be named `element` after a Parquet round trip)."""
    def norm(t: pa.DataType) -> pa.DataType:
        return pa.list_(norm(t.value_type)) if pa.types.is_list(t) else t
    return got.names == want.names and all(norm(g.type) == norm(w.type) for g, w in zip(got, want, strict=True))


class DatasetDir:
    """An output folder of one stage."""

    def __init__(self, path: PathLike | Location) -> None:
        self.path = locate(path)

    def shard_path(self, name: str) -> Location:
        return self.path / name

    def done_shards(self) -> set[str]:
        return {p.name for p in self.path.files() if fnmatch.fnmatchcase(p.name, SHARD_GLOB)}

    def sound_shards(self, schema: pa.Schema) -> tuple[set[str], list[str]]:
        """The shards here that a resume may keep, and the names of the leftovers it deleted: a shard
        written before a kill is kept only if it reads back whole as Parquet, every page matching its
        CRC (shards are written with page checksums), with `schema`'s columns and types (an empty,
        truncated or damaged file is removed, so the run recomputes it)."""
        kept, dropped = set(), []
        for name in sorted(self.done_shards()):
            p = self.shard_path(name)
            try:
                ok = _same_columns(read_shard(p).schema, schema)
            except UsageError:
                ok = False
            if ok:
                kept.add(name)
            else:
                p.unlink(missing_ok=True)
                dropped.append(name)
        return kept, dropped

    def writing(self, what: str, log: Callable[[str], None] = print) -> WriterLock:
        """The folder's writer lock for a run of `what` (a context manager): every run holds it
        from before its first write here to its end, so no two runs write the folder at once."""
        return WriterLock(self.path, what, log)

    def is_complete(self) -> bool:
        return (self.path / MANIFEST_NAME).is_file()

    def recorded_run(self) -> dict[str, Any] | None:
        """The run record of a folder fusedata wrote (its `_run.json`, else its manifest's run), or
        None: a `_run.json` must be a fusedata run record (a table naming its stage), not just any JSON."""
        run_file = self.path / RUN_NAME
        if run_file.is_file():
            try:
                record = json.loads(run_file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                return None
            return record if isinstance(record, dict) and record.get("stage") in STAGES else None
        if (self.path / MANIFEST_NAME).is_file():
            try:
                return Manifest.read(self.path).run
            except ValueError:
                return None
        return None

    def own_files(self) -> list[Location]:
        """What fusedata wrote here: the shards the manifest lists, shards and temporary files of an
        unfinished run (by their names), the manifest, the run record and the writer lock. Nothing else."""
        listed: set[str] = set()
        if (self.path / MANIFEST_NAME).is_file():
            try:
                listed = {s.name for s in Manifest.read(self.path).shards}
            except ValueError:
                pass
        found = [p for p in self.path.files() if (
            p.name in listed or SHARD_RE.fullmatch(p.name) or TMP_RE.fullmatch(p.name)
            or p.name in (MANIFEST_NAME, RUN_NAME, LOCK_NAME))]
        return sorted(found)

    def remove_own(self, owned: tuple[str, ...] = ()) -> None:
        """Delete what fusedata wrote here (`own_files`), plus the `owned` names the caller wrote
        (files, or sub-folders that are datasets themselves); the folder and anything else stay, and
        so does the writer lock (only the run holding it removes it)."""
        for p in self.own_files():
            if not is_lock_file(p.name):
                p.unlink(missing_ok=True)
        for name in owned:
            p = self.path / name
            if p.is_dir():
                DatasetDir(p).remove_own()
                if not p.iterdir():
                    p.rmdir()
            elif p.is_file():
                p.unlink()

    def claim(self, run: dict[str, Any], overwrite: bool = False) -> bool:
        """Whether `run` may write here, changing nothing: refuse a file, a folder of files fusedata did
        not write, or another run's folder without `overwrite`. True: it holds another run's output
        that `run` replaces."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"output {self.path} exists and is not a folder")
        if not self.path.is_dir() or not any(p.name != STAGING_NAME and not is_lock_file(p.name) for p in self.path.iterdir()):
            return False
        previous = self.recorded_run()
        if previous is None:  # never delete a folder fusedata did not write, --overwrite or not
            raise UsageError(f"output folder {self.path} holds files fusedata did not write; choose another folder")
        if same_run(previous, run):
            return False
        if not overwrite:
            raise UsageError(
                f"output folder {self.path} holds another run's output{_describe_diff(previous, run)}; "
                "choose another folder or pass --overwrite"
            )
        return True

    def begin(self, run: dict[str, Any], overwrite: bool = False, owned: tuple[str, ...] = ()) -> None:
        """Claim the folder for `run`; refuse a folder that holds a different run. With `overwrite`,
        another run's files are deleted at once (only those: see `remove_own`); `owned` names the
        files and sub-folders beyond shards that the caller writes here. (`run_stage` instead builds
        a replacement in `staging()` and swaps it in when complete: `replace_with`.)"""
        run_file = self.path / RUN_NAME
        if self.claim(run, overwrite):
            self.remove_own(owned)
        elif run_file.is_file() and json.loads(run_file.read_text(encoding="utf-8")) != run:
            atomic_write_text(run_file, json.dumps(run, indent=2, sort_keys=True))  # same run, model found elsewhere
        self.path.mkdir()
        for stale in self.path.files():  # partial files of a killed run of this same run
            if TMP_RE.fullmatch(stale.name) and not is_lock_file(stale.name):
                stale.unlink(missing_ok=True)
        if not run_file.is_file():
            atomic_write_text(run_file, json.dumps(run, indent=2, sort_keys=True))

    def staging(self) -> DatasetDir:
        """Where a run that replaces this folder's dataset is built, inside the folder it replaces
        (a hidden name: Parquet folder readers skip it)."""
        return DatasetDir(self.path / STAGING_NAME)

    def drop_staging(self) -> None:
        """Remove what a replacement run left in `staging()` (only fusedata's files)."""
        staged = self.staging()
        if staged.path.is_dir():
            staged.remove_own()
            if not staged.path.iterdir():
                staged.path.rmdir()

    def replace_with(self, staged: DatasetDir) -> None:
        """Swap the complete dataset in `staged` in for the other run's files here. The order keeps
        every point of a crash resumable: first the old manifest and shards go (the folder still
        names the old run, so a rerun with --overwrite swaps the staged dataset in again), then the
        new run record, then the new shards (a rerun resumes the new run here), the manifest last."""
        manifest_text = (staged.path / MANIFEST_NAME).read_text(encoding="utf-8")
        (self.path / MANIFEST_NAME).unlink(missing_ok=True)
        for p in self.own_files():
            if p.name != RUN_NAME and not is_lock_file(p.name):
                p.unlink()
        (staged.path / RUN_NAME).replace(self.path / RUN_NAME)
        for p in staged.own_files():
            if SHARD_RE.fullmatch(p.name):
                p.replace(self.path / p.name)
        atomic_write_text(self.path / MANIFEST_NAME, manifest_text)
        self.drop_staging()

    def write_shard(self, name: str, table: pa.Table, schema: pa.Schema) -> None:
        write_parquet_atomic(table, self.shard_path(name), schema)

    def finish(self, kind: str, run: dict[str, Any], expected: list[str], stats: dict[str, Any]) -> Manifest:
        """Checksum every shard and write the manifest; all of `expected` must exist."""
        present = {p.name for p in self.path.files()}  # one listing (one request on object storage)
        missing = [n for n in expected if n not in present]
        if missing:
            raise UsageError(f"{self.path}: shards missing, cannot finish: {', '.join(missing[:10])}")
        entries = [_shard_entry(self.shard_path(name)) for name in expected]
        manifest = Manifest(
            kind=kind,
            fusedata_version=fusedata.__version__,
            run=run,
            shards=entries,
            stats=stats,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        atomic_write_text(self.path / MANIFEST_NAME, manifest.to_json())
        return manifest


def table_tokens(table: pa.Table) -> int:
    """Tokens in a table: the total length of its `input_ids` lists."""
    return int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)


def _shard_entry(path: Location) -> ShardEntry:
    """A shard's manifest entry (rows, tokens, bytes, sha256) from one read of its bytes: one
    request on object storage, and a shard at a time in memory."""
    data = path.read_bytes()
    meta = _named(path, lambda: pq.read_metadata(pa.BufferReader(data)))
    tokens = 0
    if "input_ids" in meta.schema.to_arrow_schema().names:
        tokens = table_tokens(_named(path, lambda: pq.read_table(pa.BufferReader(data), columns=["input_ids"])))
    read = json.loads((meta.metadata or {}).get(INPUT_KEY, b"{}"))  # what an extract worker read
    return ShardEntry(path.name, meta.num_rows, tokens, len(data), hashlib.sha256(data).hexdigest(),
                      read.get("sha256", ""))


def _describe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    old, new = run_key(old), run_key(new)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])
    return f" (differs in {shown})" if shown else ""


def refuse_input_inside(output: PathLike | Location, inputs: list[PathLike | Location]) -> None:
    """Refuse an output folder that is, or contains, one of the run's inputs: overwriting it
    would delete the input, and the input's files would be taken for another run's."""
    out = locate(output)
    for p in inputs:
        if out.contains(locate(p)):
            raise UsageError(f"output folder {out} contains the input {locate(p)}; choose another folder")


def open_dataset(path: PathLike | Location, kind: str | None = None, verify: bool = True) -> Manifest:
    """The manifest of a finished dataset, with clear errors for unfinished or damaged ones. With
    `verify` (every reader's default; `--no-verify` turns it off) each shard must match the size and
    sha256 the manifest lists: a damaged shard is refused by file name before any of it is read."""
    folder = locate(path)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such dataset folder")
    if not (folder / MANIFEST_NAME).is_file():
        raise UsageError(f"{folder}: no {MANIFEST_NAME}; the run that writes it has not finished")
    try:
        manifest = Manifest.read(folder)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if kind is not None and manifest.kind != kind:
        raise UsageError(f"{folder}: is a '{manifest.kind}' dataset, expected '{kind}'")
    missing = [s.name for s in manifest.shards if not (folder / s.name).is_file()]
    if missing:
        raise UsageError(f"{folder}: shards listed in the manifest are missing: {', '.join(missing[:10])}")
    if verify:
        bad = _damaged(folder, manifest)
        if bad:
            raise UsageError(f"{folder / bad[0]}: damaged (its size or sha256 differs from {MANIFEST_NAME}"
                             f"{f'; {len(bad) - 1} more shard(s) too' if len(bad) > 1 else ''}); "
                             "recompute it (`fusedata run` repairs), or pass --no-verify to read it anyway")
    return manifest


def _damaged(folder: Location, manifest: Manifest) -> list[str]:
    """The shards of `manifest` whose file is missing or differs in size or sha256 from the listing."""
    bad = []
    for s in manifest.shards:
        p = folder / s.name
        if not p.is_file() or p.size() != s.bytes or sha256_file(p) != s.sha256:
            bad.append(s.name)
    return bad


def read_shard(path: PathLike | Location, **kw: Any) -> pa.Table:
    """A shard's table (`kw` as for `pq.read_table`), every page checked against its CRC: a file
    that does not read back whole (truncated, not Parquet, a damaged page) is refused by name."""
    loc = locate(path)
    return _named(loc, lambda: pq.read_table(loc.path, filesystem=loc.fs, page_checksum_verification=True, **kw))


def shard_metadata(path: PathLike | Location) -> pq.FileMetaData:
    """A shard's Parquet footer; a file without a readable one is refused by name."""
    loc = locate(path)
    return _named(loc, lambda: pq.read_metadata(loc.path, filesystem=loc.fs))


def _named(path: Location, read: Any) -> Any:
    try:
        return read()
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: damaged or not a readable shard ({exc}); recompute it") from None


def verify_dataset(path: PathLike | Location) -> list[str]:
    """Shards of a finished dataset whose bytes no longer match the sha256 in its manifest (or
    that are missing). An unfinished folder (no manifest) has nothing to check against: []."""
    folder = locate(path)
    if not (folder / MANIFEST_NAME).is_file():
        return []
    try:
        manifest = Manifest.read(folder)
    except ValueError:
        return [MANIFEST_NAME]
    return _damaged(folder, manifest)


def repair_dataset(path: PathLike | Location, bad: list[str]) -> None:
    """Delete the damaged shards and the manifest, so the stage's next run recomputes exactly
    those shards (the run identity in `_run.json` is kept: it is still the same run)."""
    folder = locate(path)
    for name in bad:
        if name.startswith("shard-"):
            (folder / name).unlink(missing_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
