"""A Ray worker killed in the middle of a shard: Ray Data restarts the actor, another process redoes
that shard, and the dataset is byte for byte the local executor's.

The stage is the real extract stage with one addition, made in the test: each worker notes which
shard it starts in a folder, and the first worker to start a shard claims it as the victim and waits
there (at most a minute) until the test has killed it with SIGKILL. The class is pickled by value
(the actors cannot import this test module)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from fusedata.stages.base import run_stage
from fusedata.stages.extract import ExtractConfig, ExtractJob, ExtractStage, run_extract
from schemas.manifest import Manifest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

VICTIM = "victim"  # the file the first worker to start a shard creates: "<pid> <shard>"
HOLD_S = 60.0  # how long the victim waits to be killed before it gives up (the test then fails)


class MarkedExtract(ExtractStage):
    """Extract, noting `<shard>.<pid>` in `marks` as each shard starts; the first start anywhere
    waits to be killed."""

    def __init__(self, config: ExtractConfig, job: ExtractJob, marks: Path) -> None:
        super().__init__(config, job=job)
        self.marks = str(marks)

    def process(self, task, on_tokens=None):
        marks = Path(self.marks)
        (marks / f"{task.name}.{os.getpid()}").touch()
        try:
            fd = os.open(marks / VICTIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().process(task, on_tokens)
        os.write(fd, f"{os.getpid()} {task.name}".encode())
        os.close(fd)
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:  # SIGKILL ends this process here, mid-shard
            time.sleep(0.05)
        return super().process(task, on_tokens)


class CrashingExtract(ExtractStage):
    """Extract whose worker process dies (SIGKILL) each time it computes one shard, as a worker
    killed for memory on a huge document would."""

    crash_on = "shard-00001.parquet"

    def process(self, task, on_tokens=None):
        if task.name == self.crash_on:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(task, on_tokens)


@pytest.fixture(scope="module")
def local_ray():
    from jobs.embedded_ray import start_local_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_run(tiny_llama, corpus_file, tmp_path_factory):
    """The local executor's dataset of the same job: (folder, manifest)."""
    out = tmp_path_factory.mktemp("local") / "topk"
    return out, run_extract(_job(tiny_llama, corpus_file, out))


def _job(model: Path, corpus: Path, out: Path) -> ExtractJob:
    # one torch thread in the driver and in every actor: the same float sums, so byte-identical shards
    config = ExtractConfig(model=str(model), top_k=5, max_length=24, batch_tokens=256, threads=1)
    return ExtractJob([str(corpus)], str(out), config, docs_per_shard=1, quiet=True, log=lambda m: None)


def _kill_victim(marks: Path, killed: list[tuple[int, str]], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            text = (marks / VICTIM).read_text()
        except FileNotFoundError:
            text = ""
        if text:  # written in one call after the exclusive create: whole once non-empty
            pid, shard = text.split()
            os.kill(int(pid), signal.SIGKILL)
            killed.append((int(pid), shard))
            return
        time.sleep(0.02)


def test_a_worker_killed_mid_shard_is_replaced_and_its_shard_redone(local_ray, local_run, tiny_llama, corpus_file,
                                                                     tmp_path):
    local_out, local = local_run
    marks = tmp_path / "marks"
    marks.mkdir()
    killed: list[tuple[int, str]] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_victim, args=(marks, killed, stop), daemon=True)
    killer.start()
    from jobs.ray_executor import RayExecutor

    out = tmp_path / "ray"
    job = _job(tiny_llama, corpus_file, out)
    try:
        result = run_stage(MarkedExtract(job.config, job, marks), RayExecutor(workers=1), quiet=True, log=job.log)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker started a shard"
    (pid, shard), = killed
    # the shard was started by the killed process and then by another one, which finished it (had the
    # kill missed, the victim would have finished it itself after its hold)
    starts = {p.name.rsplit(".", 1)[1] for p in marks.glob(f"{shard}.*")}
    assert str(pid) in starts and starts - {str(pid)}, starts
    assert result.status == "ran"
    manifest = Manifest.read(out)
    assert [s.name for s in manifest.shards] == [s.name for s in local.shards]
    assert [(s.name, s.sha256) for s in manifest.shards] == [(s.name, s.sha256) for s in local.shards]
    assert [(p.name, p.read_bytes()) for p in sorted(out.glob("shard-*"))] == \
        [(p.name, p.read_bytes()) for p in sorted(local_out.glob("shard-*"))]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_duplicate_id_stops_a_ray_run_when_its_second_shard_is_written(local_ray, tiny_llama, tmp_path,
                                                                          monkeypatch):
    """The driver checks each shard's ids as the workers' results stream in (past the probed head,
    where the planner cannot see them) and shuts the execution down at the first repeat."""
    import json

    import fusedata.corpus
    from fusedata.errors import UsageError
    from jobs.ray_executor import RayExecutor

    monkeypatch.setattr(fusedata.corpus, "PROBE_BYTES", 64)  # the head holds the first line only
    corpus = tmp_path / "c.jsonl"
    ids = ["d0", "d1", "d0", *(f"d{i}" for i in range(3, 10))]
    corpus.write_text("".join(json.dumps({"id": i, "text": f"document {n:03d} about a lighthouse"}) + "\n"
                              for n, i in enumerate(ids)), encoding="utf-8")
    out = tmp_path / "topk"
    with pytest.raises(UsageError, match=r"duplicate document id 'd0' \(in shard-0000[02].parquet and "
                                         r"shard-0000[02].parquet\)"):
        run_extract(_job(tiny_llama, corpus, out), RayExecutor(workers=1))
    assert not (out / "_manifest.json").exists()


def test_a_shard_whose_worker_always_dies_fails_by_name_and_the_rest_completes(local_ray, local_run, tiny_llama,
                                                                               corpus_file, tmp_path):
    """Not retried forever: past `shard_attempts` starts the shard fails, named, like bad input; the
    other shards are written, no manifest, and the same command again computes only that shard.
    (One start here: each more costs an actor restart; the default is three.)"""
    from fusedata.stages.base import ShardsFailed
    from jobs.ray_executor import RayExecutor

    out = tmp_path / "ray"
    job = _job(tiny_llama, corpus_file, out)
    with pytest.raises(ShardsFailed, match=rf"1 of \d+ shard\(s\) failed.*{CrashingExtract.crash_on}: its worker died "
                                           r"while computing it, 1 time\(s\).*started at most 1 time"):
        run_stage(CrashingExtract(job.config, job=job), RayExecutor(workers=1, shard_attempts=1), quiet=True,
                  log=job.log)
    written = {p.name for p in out.glob("shard-*")}
    assert written == {s.name for s in local_run[1].shards} - {CrashingExtract.crash_on}
    assert not (out / "_manifest.json").exists()
    logs: list[str] = []
    manifest = run_extract(ExtractJob(job.inputs, job.output, job.config, docs_per_shard=1, quiet=True,
                                      log=logs.append))  # the same run, local here: no more actor starts
    assert any(f"resuming, {len(written)} of {len(manifest.shards)} shards already written" in m for m in logs)
    assert [(s.name, s.sha256) for s in manifest.shards] == [(s.name, s.sha256) for s in local_run[1].shards]
