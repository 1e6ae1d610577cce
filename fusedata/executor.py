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

from fusedata.dataset import DatasetDir


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
