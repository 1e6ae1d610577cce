"""The stage contract every dataset stage implements, the local executor, and `run_stage`.

A stage (extract, align, fuse) says what it makes and how, and nothing about resuming:
- `kind`, `output`, `resources`: the manifest kind, the output folder, what one worker needs;
- `identity()`: everything that shapes the output (the run record in `_run.json`);
- `tasks()`: the shard plan, built from listings (a corpus, another dataset's manifest);
- `setup()` once per worker (load the model), `process(task) -> table` per shard, `teardown()`;
- `shard_done(out, result)`: a check in the driver as each shard is written, which may stop the run;
- `stats(out, names, rate)`: summary figures for the manifest, read back from the written shards.

`run_stage` owns the rest: it holds the folder's writer lock while it writes (one run at a time,
fusedata/writer_lock.py), a finished identical run is a no-op, another run's folder is refused (or,
with `overwrite`, replaced once the new run is complete: it is built in the folder's staging area
and swapped in), only missing shards are computed, each written atomically, and the manifest is
written last. An executor only decides where
`process_shard` runs: the local one here in order, the Ray one (jobs/ray_executor.py) in actors
that ask for the stage's `resources`, so local and cluster output are identical.

A shard that fails on bad input (a `UsageError` from the stage: a malformed line, a null id) is
reported by name and the other shards still run; the run then stops with all those errors, without
a manifest, and the next run computes just the shards that are missing. Any other exception (a bug,
a model that raises, a disk that fails, an interrupt) stops the run at once, with the shard's path
noted on it; the Ray executor re-raises a worker's exception itself, not Ray's wrapper of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pyarrow as pa

from fusedata.dataset import DatasetDir, refuse_input_inside, repair_dataset, same_run, verify_dataset
from fusedata.errors import UsageError, note_shard
from fusedata.writer_lock import WriterLock
from schemas.manifest import Manifest
from schemas.topk import INPUT_KEY


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """What every job that reads datasets and writes one takes beside its inputs and config (keyword
    only, so each job's own fields keep their places)."""

    overwrite: bool = False
    quiet: bool = False
    verify: bool = True  # check each input shard against its manifest sha256 (--no-verify: False)
    log: Any = field(default=print, repr=False)


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks an executor for."""

    cpus: float = 0.0  # 0: an even share of the machine's (or the cluster's) CPUs
    gpus: float = 0.0  # GPUs per worker where the cluster has some (a share of one when fewer than workers)


@dataclass
class Task:
    name: str  # output shard file name
    source: Any = None  # what the worker reads (extract: its corpus pieces, small descriptors); None: by name
    rows: int = 0  # input rows planned (extract: documents, estimated beyond the corpus probe), for progress


@dataclass
class ShardResult:
    name: str
    rows: int
    input_rows: int
    tokens: int
    seconds: float
    error: str = ""  # the shard failed on bad input: why (nothing was written for it)


INPUT_ROWS_KEY = "docs"  # a shard table's INPUT_KEY record counts the input rows the worker read


class Stage:
    """Base of extract, align and fuse (fusedata/stages/)."""

    kind: str = ""  # manifest kind of the output: topk | aligned | fused
    output: str = ""
    label: str = ""  # progress label
    resources: Resources = Resources()
    schema: pa.Schema
    count_docs: bool = False  # progress counts the input rows of the tasks (documents)

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def inputs(self) -> list[Any]:
        """Paths or Locations this stage reads: the output folder may not be or contain one of them."""
        return []

    def tasks(self) -> list[Task]:
        raise NotImplementedError

    def setup(self) -> None:
        """Once per worker, before its first task."""

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        raise NotImplementedError

    def shard_done(self, out: DatasetDir, result: ShardResult) -> None:
        """In the driver, as each shard this run computes is written (in the order they finish): a
        check that stops the run early by raising (extract: a document id an earlier shard holds)."""

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        return {}

    def teardown(self) -> None:
        """Once per worker, after its last task (stop engines, free devices)."""

    def summary(self, manifest: Manifest) -> str:
        """One line for the log once the dataset is complete."""
        return ""


def process_shard(stage: Stage, task: Task, out: DatasetDir, on_tokens: Callable[[int], None] | None = None) -> ShardResult:
    """Compute one shard and write it atomically."""
    t0 = time.perf_counter()
    tokens = 0

    def count(n: int) -> None:  # the stage reports the tokens it processed
        nonlocal tokens
        tokens += n
        if on_tokens is not None:
            on_tokens(n)

    table = stage.process(task, count)
    schema, rows_in = stage.schema, 0
    record = (table.schema.metadata or {}).get(INPUT_KEY)
    if record is not None:  # what the worker read: kept in the shard file's metadata
        schema = schema.with_metadata({**(schema.metadata or {}), INPUT_KEY: record})
        rows_in = int(json.loads(record).get(INPUT_ROWS_KEY, 0))
    out.write_shard(task.name, table, schema)
    return ShardResult(task.name, table.num_rows, rows_in, tokens, time.perf_counter() - t0)


def process_or_report(stage: Stage, task: Task, out: DatasetDir, on_tokens: Callable[[int], None] | None = None) -> ShardResult:
    """`process_shard`, with a failure on bad input returned as the shard's error (the run goes on);
    any other exception goes on up with the shard's path noted on it (`fusedata.errors.note_shard`)."""
    t0 = time.perf_counter()
    try:
        return process_shard(stage, task, out, on_tokens)
    except UsageError as exc:
        return ShardResult(task.name, 0, 0, 0, time.perf_counter() - t0, error=str(exc))
    except Exception as exc:  # not bad input: it stops the run, naming the shard (also from a Ray worker)
        note_shard(exc, str(out.shard_path(task.name)))
        raise


class Executor(Protocol):
    def run(self, stage: Stage, tasks: list[Task], out: DatasetDir, progress: Any) -> list[ShardResult]: ...


class LocalExecutor:
    """One process, shards in order: for tests, debugging and the smallest jobs."""

    def run(self, stage: Stage, tasks: list[Task], out: DatasetDir, progress: Any) -> list[ShardResult]:
        if not tasks:
            return []
        stage.setup()
        results = []
        try:
            for task in tasks:
                result = process_or_report(stage, task, out, progress.tokens)
                if not result.error:
                    stage.shard_done(out, result)
                progress.shard_done(result, count_tokens=False)
                results.append(result)
        finally:
            stage.teardown()
        return results


class ShardsFailed(UsageError):
    """Some shards failed on bad input; the others are written, the manifest is not."""

    def __init__(self, where: Any, failed: list[ShardResult], total: int) -> None:
        self.failed = failed
        shown = "; ".join(f"{r.name}: {r.error}" for r in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        super().__init__(f"{where}: {len(failed)} of {total} shard(s) failed, the others are written: {shown}{more} "
                         "(the same command again computes only the missing shards)")


@dataclass
class StageResult:
    status: Literal["skipped", "resumed", "ran"]
    manifest: Manifest
    shards_computed: int
    repaired: tuple[str, ...] = ()  # shards of the finished dataset that failed their checksum: recomputed


def run_stage(stage: Stage, executor: Executor | None = None, *, overwrite: bool = False, quiet: bool = False,
              log: Callable[[str], None] = print) -> StageResult:
    """Run `stage` into its output folder: skipped (a finished identical run), resumed (only the
    missing shards of an unfinished identical run) or ran. Everything is validated and planned
    before the folder is claimed, and another run's dataset (with `overwrite`) is replaced only by
    a complete new one, so a refused, failed or interrupted run leaves it untouched. From its first
    write to its end the run holds the folder's writer lock: a run already writing there is refused."""
    run = stage.identity()
    refuse_input_inside(stage.output, stage.inputs())
    out = DatasetDir(stage.output)
    if _finished(out, run):  # reads only: a finished dataset needs no lock (and may be read-only)
        log(f"{out.path}: already complete, nothing to do")
        return StageResult("skipped", Manifest.read(out.path), 0)
    with out.writing(run.get("stage", stage.kind), log) as lock:
        return _run_locked(stage, executor, out, run, lock, overwrite, quiet, log)


def _finished(out: DatasetDir, run: dict[str, Any]) -> bool:
    """A finished dataset of this very run whose shards all match its manifest."""
    return out.is_complete() and same_run(Manifest.read(out.path).run, run) and not verify_dataset(out.path)


def _run_locked(stage: Stage, executor: Executor | None, out: DatasetDir, run: dict[str, Any], lock: WriterLock,
                overwrite: bool, quiet: bool, log: Callable[[str], None]) -> StageResult:
    from fusedata.progress import StageProgress

    repaired: tuple[str, ...] = ()
    if out.is_complete() and same_run(Manifest.read(out.path).run, run):
        bad = verify_dataset(out.path)  # a finished run is trusted only while its shards match the manifest
        if not bad:  # another run of the same command finished it meanwhile
            log(f"{out.path}: already complete, nothing to do")
            return StageResult("skipped", Manifest.read(out.path), 0)
        log(f"{out.path}: {len(bad)} shard(s) missing or damaged ({', '.join(bad[:5])}); recomputing them")
        repair_dataset(out.path, bad)
        repaired = tuple(bad)
    tasks = stage.tasks()
    names = [t.name for t in tasks]
    # another run's dataset is replaced only once the new one is complete: it is built in staging()
    replacing = out.claim(run, overwrite)
    work = out.staging() if replacing else out
    if replacing:
        work.begin(run, overwrite=True)  # a staged replacement for yet another run is discarded
    else:
        out.begin(run)
        out.drop_staging()  # a replacement that was being swapped in when it was stopped
    if work.is_complete() and same_run(Manifest.read(work.path).run, run):
        manifest, todo = Manifest.read(work.path), []  # staged completely; only the swap was left
    else:
        done, dropped = work.sound_shards(stage.schema)
        if dropped:
            log(f"{out.path}: {len(dropped)} leftover shard(s) unreadable ({', '.join(dropped[:5])}); recomputing them")
        todo = [t for t in tasks if t.name not in done]
        if len(todo) < len(tasks):
            log(f"{out.path}: resuming, {len(tasks) - len(todo)} of {len(tasks)} shards already written")
        docs = sum(t.rows for t in todo) if stage.count_docs else None
        progress = StageProgress(stage.label, len(todo), docs, quiet)
        try:
            results = (executor or LocalExecutor()).run(stage, todo, work, progress)
        finally:
            progress.close()
        failed = [r for r in results if r.error]
        if failed:
            raise ShardsFailed(out.path, failed, len(tasks))
        lock.check()
        manifest = work.finish(stage.kind, run, names, stage.stats(work, names, progress.rate()))
    if replacing:
        lock.check()
        out.replace_with(work)
        log(f"{out.path}: replaced the dataset of another run")
    line = stage.summary(manifest)
    if line:
        log(line)
    return StageResult("resumed" if len(todo) < len(tasks) else "ran", manifest, len(todo), repaired)
