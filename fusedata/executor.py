"""Run a stage over shards: the shared shard step and the local sequential executor.

A stage is any object with `setup()`, `schema` and `__call__(table, on_tokens) -> table`.
The executor only decides where `process_shard` runs; the Ray executor (jobs/ray_executor.py)
calls the very same function inside an actor, so local and cluster output are identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from fusedata.dataset import DatasetDir, refuse_input_inside, same_run


class Stage(Protocol):
    schema: pa.Schema

    def setup(self) -> None: ...

    def __call__(self, table: pa.Table, on_tokens: Callable[[int], None] | None = None) -> pa.Table: ...


@dataclass
class ShardTask:
    name: str  # output shard file name
    table: pa.Table  # the input rows of this shard


@dataclass
class ShardResult:
    name: str
    rows: int
    input_rows: int
    tokens: int
    seconds: float


def process_shard(stage: Stage, task: ShardTask, out: DatasetDir, on_tokens: Callable[[int], None] | None = None) -> ShardResult:
    """Compute one shard and write it atomically."""
    t0 = time.perf_counter()
    tokens = 0

    def count(n: int) -> None:  # the stage reports the tokens it processed
        nonlocal tokens
        tokens += n
        if on_tokens is not None:
            on_tokens(n)

    table = stage(task.table, count)
    out.write_shard(task.name, table, stage.schema)
    return ShardResult(task.name, table.num_rows, task.table.num_rows, tokens, time.perf_counter() - t0)


class Executor(Protocol):
    def run(
        self,
        make_stage: Callable[[], Stage],
        tasks: list[ShardTask],
        out: DatasetDir,
        progress: Any,
    ) -> list[ShardResult]: ...

    def with_gpu(self, want: bool) -> Executor:
        """This executor with workers that ask for a GPU where the cluster has them (or not)."""
        ...


class LocalExecutor:
    """One process, shards in order: for tests, debugging and the smallest jobs."""

    def run(self, make_stage: Callable[[], Stage], tasks: list[ShardTask], out: DatasetDir, progress: Any) -> list[ShardResult]:
        if not tasks:
            return []
        stage = make_stage()
        stage.setup()
        results = []
        for task in tasks:
            result = process_shard(stage, task, out, progress.tokens)
            progress.shard_done(result, count_tokens=False)
            results.append(result)
        return results

    def with_gpu(self, want: bool) -> LocalExecutor:
        return self  # the stage itself picks its device in this process


def shard_name_task(name: str) -> ShardTask:
    """The task of a dataset-to-dataset stage: just the shard name (the stage reads its inputs)."""
    return ShardTask(name, pa.table({"shard": [name]}))


def run_stage(
    *,
    kind: str,
    output: str,
    run: dict[str, Any],
    names: list[str],
    make_stage: Callable[[], Stage],
    executor: Executor,
    stats: Callable[[DatasetDir, list[str], float], dict[str, Any]],
    label: str,
    make_task: Callable[[str], ShardTask] = shard_name_task,
    count_docs: bool = False,
    overwrite: bool = False,
    inputs: list[str] = (),  # type: ignore[assignment]
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> Any:
    """The flow every stage shares: a finished identical run is a no-op; otherwise claim the
    folder, compute only the missing shards, then write the manifest with `stats(out, names,
    tokens_per_second)`. Returns the Manifest."""
    from fusedata.progress import StageProgress
    from schemas.manifest import Manifest

    refuse_input_inside(output, list(inputs))
    out = DatasetDir(output)
    if out.is_complete() and same_run(Manifest.read(out.path).run, run):
        log(f"{out.path}: already complete, nothing to do")
        return Manifest.read(out.path)
    out.begin(run, overwrite=overwrite)
    done = out.done_shards()
    tasks = [make_task(n) for n in names if n not in done]
    if done:
        log(f"{out.path}: resuming, {len(names) - len(tasks)} of {len(names)} shards already written")
    docs = sum(t.table.num_rows for t in tasks) if count_docs else None
    progress = StageProgress(label, len(tasks), docs, quiet)
    try:
        executor.run(make_stage, tasks, out, progress)
    finally:
        progress.close()
    return out.finish(kind, run, names, stats(out, names, progress.rate()))
