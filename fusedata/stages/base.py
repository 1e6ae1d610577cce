"""The stage contract every dataset stage implements, the local executor, and `run_stage`.

A stage (extract, align, fuse) says what it makes and how, and nothing about resuming:
- `kind`, `output`, `resources`: the manifest kind, the output folder, what one worker needs;
- `identity()`: everything that shapes the output (the run record in `_run.json`);
- `tasks()`: the shard plan, built from listings (a corpus, another dataset's manifest);
- `setup()` once per worker (load the model), `process(task) -> table` per shard, `teardown()`;
- `stats(out, names, rate)`: summary figures for the manifest, read back from the written shards.

`run_stage` owns the rest: a finished identical run is a no-op, another run's folder is refused (or,
with `overwrite`, replaced once the new run is complete: it is built in the folder's staging area
and swapped in), only missing shards are computed, each written atomically, and the manifest is
written last. An executor only decides where
`process_shard` runs: the local one here in order, the Ray one (jobs/ray_executor.py) in actors
that ask for the stage's `resources`, so local and cluster output are identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pyarrow as pa

from fusedata.dataset import DatasetDir, refuse_input_inside, repair_dataset, same_run, verify_dataset
from schemas.manifest import Manifest


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks an executor for."""

    cpus: float = 0.0  # 0: an even share of the machine's (or the cluster's) CPUs
    gpus: float = 0.0  # GPUs per worker where the cluster has some (a share of one when fewer than workers)


@dataclass
class Task:
    name: str  # output shard file name
    table: pa.Table | None = None  # input rows handed to the worker (extract's documents); None: read by name


@dataclass
class ShardResult:
    name: str
    rows: int
    input_rows: int
    tokens: int
    seconds: float


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

    def inputs(self) -> list[str]:
        """Paths this stage reads: the output folder may not be or contain one of them."""
        return []

    def tasks(self) -> list[Task]:
        raise NotImplementedError

    def setup(self) -> None:
        """Once per worker, before its first task."""

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        raise NotImplementedError

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
    out.write_shard(task.name, table, stage.schema)
    rows_in = task.table.num_rows if task.table is not None else 0
    return ShardResult(task.name, table.num_rows, rows_in, tokens, time.perf_counter() - t0)


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
                result = process_shard(stage, task, out, progress.tokens)
                progress.shard_done(result, count_tokens=False)
                results.append(result)
        finally:
            stage.teardown()
        return results


@dataclass
class StageResult:
    status: Literal["skipped", "resumed", "ran"]
    manifest: Manifest
    shards_computed: int


def run_stage(stage: Stage, executor: Executor | None = None, *, overwrite: bool = False, quiet: bool = False,
              log: Callable[[str], None] = print) -> StageResult:
    """Run `stage` into its output folder: skipped (a finished identical run), resumed (only the
    missing shards of an unfinished identical run) or ran. Everything is validated and planned
    before the folder is claimed, and another run's dataset (with `overwrite`) is replaced only by
    a complete new one, so a refused, failed or interrupted run leaves it untouched."""
    from fusedata.progress import StageProgress

    run = stage.identity()
    refuse_input_inside(stage.output, stage.inputs())
    out = DatasetDir(stage.output)
    if out.is_complete() and same_run(Manifest.read(out.path).run, run):
        bad = verify_dataset(out.path)  # a finished run is trusted only while its shards match the manifest
        if not bad:
            log(f"{out.path}: already complete, nothing to do")
            return StageResult("skipped", Manifest.read(out.path), 0)
        log(f"{out.path}: {len(bad)} shard(s) missing or damaged ({', '.join(bad[:5])}); recomputing them")
        repair_dataset(out.path, bad)
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
        docs = sum(t.table.num_rows for t in todo if t.table is not None) if stage.count_docs else None
        progress = StageProgress(stage.label, len(todo), docs, quiet)
        try:
            (executor or LocalExecutor()).run(stage, todo, work, progress)
        finally:
            progress.close()
        manifest = work.finish(stage.kind, run, names, stage.stats(work, names, progress.rate()))
    if replacing:
        out.replace_with(work)
        log(f"{out.path}: replaced the dataset of another run")
    line = stage.summary(manifest)
    if line:
        log(line)
    return StageResult("resumed" if len(todo) < len(tasks) else "ran", manifest, len(todo))
