"""One writer per dataset folder (fusedata/writer_lock.py): a second run into a folder that a live run
writes is refused by name before it touches anything, a dead run's lock is taken over (so a killed run
resumes), a run whose lock was taken over stops before its manifest; on local disk and on S3."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import fusedata.stages.base
import fusedata.writer_lock as wl
from cli.main import main
from fusedata.dataset import RUN_NAME, DatasetDir, open_dataset
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from fusedata.storage import locate
from schemas.lock import LOCK_NAME, LockRecord, iso, utc_now
from schemas.manifest import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]


def _job(model: Path, corpus: Path, out: str | Path, logs: list[str] | None = None, **cfg) -> ExtractJob:
    config = ExtractConfig(model=str(model), **{"top_k": 5, "max_length": 24, **cfg})
    return ExtractJob([str(corpus)], str(out), config, docs_per_shard=2, quiet=True,
                      log=(logs if logs is not None else []).append)


def _record(host: str = wl.HOST, pid: int | None = None, heartbeat_age_s: float = 0.0) -> LockRecord:
    when = iso(utc_now() - dt.timedelta(seconds=heartbeat_age_s))
    return LockRecord(host, os.getpid() if pid is None else pid, "f" * 32, "extract", when, when, 120.0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> str:
    """A local folder, or a prefix on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "ds")
    from s3 import s3_prefix

    request.getfixturevalue("s3")
    return f"{s3_prefix(request)}/ds"


def test_a_live_lock_refuses_a_second_writer_until_released(place):
    logs: list[str] = []
    with DatasetDir(place).writing("align", logs.append) as first:
        record = LockRecord.from_json((locate(place) / LOCK_NAME).read_text())
        assert (record.host, record.pid, record.token, record.what) == (wl.HOST, os.getpid(), first.token, "align")
        with pytest.raises(wl.LockHeld, match=rf"is being written by another run \(align, pid {os.getpid()} on "
                                              rf"{wl.HOST}, since {re.escape(record.started)} \(heartbeat \d+ s ago\)\)"):
            DatasetDir(place).writing("fuse").acquire()
        assert LockRecord.from_json((locate(place) / LOCK_NAME).read_text()).token == first.token  # untouched
    assert not (locate(place) / LOCK_NAME).exists()
    with DatasetDir(place).writing("fuse"):  # free again
        pass
    assert logs == []


@pytest.mark.parametrize("left", ["dead-process", "old-heartbeat", "damaged"])
def test_a_dead_runs_lock_is_taken_over(place, left):
    lock = locate(place) / LOCK_NAME
    locate(place).mkdir()
    if left == "damaged":
        lock.write_bytes(b'{"host": ')
    else:
        record = (_record(pid=_dead_pid()) if left == "dead-process"
                  else _record(host="elsewhere", pid=1, heartbeat_age_s=121))
        lock.write_bytes(record.to_json().encode())
    logs: list[str] = []
    with DatasetDir(place).writing("extract", logs.append) as taken:
        assert LockRecord.from_json(lock.read_text()).token == taken.token
    why = {"dead-process": r"its process \d+ on .* has exited", "old-heartbeat": r"no heartbeat for 12\d s",
           "damaged": "it does not read as a lock record"}[left]
    assert len(logs) == 1 and logs[0].startswith(f"{place}: taking over the lock of a run that is gone (")
    assert re.search(why, logs[0]), logs[0]
    assert not lock.exists()


def test_another_machines_live_lock_is_refused(place):
    lock = locate(place) / LOCK_NAME
    locate(place).mkdir()
    lock.write_bytes(_record(host="elsewhere", pid=1, heartbeat_age_s=30).to_json().encode())
    with pytest.raises(wl.LockHeld, match=r"pid 1 on elsewhere.*heartbeat 3\d s ago.*taken over once its "
                                          r"heartbeat is 120 s old, or at once on elsewhere"):
        DatasetDir(place).writing("extract").acquire()
    assert LockRecord.from_json(lock.read_text()).host == "elsewhere"  # nothing deleted


def test_heartbeat_and_a_lock_taken_over_while_the_run_stalled(tmp_path, monkeypatch):
    monkeypatch.setattr(wl, "HEARTBEAT_S", 0.05)
    lock = tmp_path / "ds" / LOCK_NAME
    with DatasetDir(tmp_path / "ds").writing("extract") as held:
        started = LockRecord.from_json(lock.read_text())
        deadline = time.monotonic() + 10
        while LockRecord.from_json(lock.read_text()).heartbeat == started.heartbeat:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
        held.check()  # still ours
        # the run stalled past the timeout: another one took the lock over
        lock.write_text(_record(host="elsewhere", pid=7).to_json())
        with pytest.raises(wl.LockLost, match=r"lock was taken over by another run \(extract, pid 7 on elsewhere"):
            held.check()
        time.sleep(0.2)  # the heartbeat leaves the other run's lock alone
        assert LockRecord.from_json(lock.read_text()).host == "elsewhere"
    assert LockRecord.from_json(lock.read_text()).host == "elsewhere"  # and so does the release


def test_on_s3_the_last_writer_wins(s3, request, monkeypatch):
    """Object stores have no exclusive create: a run whose record was overwritten while it waited
    to read it back backs off (and leaves the other's record)."""
    from s3 import s3_prefix

    where = f"{s3_prefix(request)}/ds"
    other = _record(host="elsewhere", pid=9)

    def another_run_writes_meanwhile():
        (locate(where) / LOCK_NAME).write_bytes(other.to_json().encode())

    monkeypatch.setattr(wl, "_settle", another_run_writes_meanwhile)
    with pytest.raises(wl.LockHeld, match="pid 9 on elsewhere"):
        DatasetDir(where).writing("extract").acquire()
    assert LockRecord.from_json((locate(where) / LOCK_NAME).read_text()) == other


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_run_into_a_folder_another_run_writes_is_refused(tiny_llama, corpus_file, tmp_path, monkeypatch):
    """While one extract writes its shards, another run with --overwrite (or the same command again)
    is refused with one line naming the writer, and changes nothing; the first run then finishes."""
    monkeypatch.setattr(wl, "HEARTBEAT_S", 1000.0)  # the lock file stays as it is during the test
    out = tmp_path / "topk"
    first_written, go_on = threading.Event(), threading.Event()
    real = fusedata.stages.base.process_shard

    def process_shard(stage, task, work, on_tokens=None):
        result = real(stage, task, work, on_tokens)
        if task.name == "shard-00000.parquet":
            first_written.set()
            go_on.wait(120)
        return result

    monkeypatch.setattr(fusedata.stages.base, "process_shard", process_shard)
    finished: dict[str, object] = {}
    writer = threading.Thread(target=lambda: finished.setdefault("manifest", run_extract(_job(tiny_llama, corpus_file, out))))
    writer.start()
    try:
        assert first_written.wait(120)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert sorted(before) == [LOCK_NAME, RUN_NAME, "shard-00000.parquet"]
        holder = LockRecord.from_json(before[LOCK_NAME].decode())
        result = CliRunner().invoke(main, [
            "extract", "--model", str(tiny_llama), "--input", str(corpus_file), "--output", str(out),
            "--top-k", "6", "--max-length", "24", "--docs-per-shard", "2", "--overwrite", "--executor", "local",
            "--quiet"])
        assert result.exit_code == 2, (result.output, result.exception)
        line = _one_error_line(result)
        assert line == (f"error: {out} is being written by another run (extract, pid {os.getpid()} on {wl.HOST}, "
                        f"since {holder.started} (heartbeat {line.split('heartbeat ')[1].split(' ')[0]} s ago)); "
                        f"wait for it to finish: if it no longer runs, its lock is taken over once its heartbeat "
                        f"is 120 s old, or at once on {wl.HOST}")
        with pytest.raises(wl.LockHeld):  # the same command twice at once: the second is refused too
            run_extract(_job(tiny_llama, corpus_file, out))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging, nothing deleted
    finally:
        go_on.set()
        writer.join(120)
    manifest = open_dataset(out)  # finished, every shard verified
    assert manifest == finished["manifest"] and manifest.run["top_k"] == 5 and len(manifest.shards) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted([RUN_NAME, MANIFEST_NAME, *(s.name for s in manifest.shards)])


def test_a_run_that_lost_its_lock_writes_no_manifest(tiny_llama, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "topk"
    real = fusedata.stages.base.process_shard

    def process_shard(stage, task, work, on_tokens=None):
        if task.name == "shard-00002.parquet":  # meanwhile this run was taken for dead
            (out / LOCK_NAME).write_text(_record(host="elsewhere", pid=7).to_json())
        return real(stage, task, work, on_tokens)

    monkeypatch.setattr(fusedata.stages.base, "process_shard", process_shard)
    with pytest.raises(wl.LockLost, match="taken over by another run"):
        run_extract(_job(tiny_llama, corpus_file, out))
    assert not (out / MANIFEST_NAME).exists()
    assert LockRecord.from_json((out / LOCK_NAME).read_text()).host == "elsewhere"


def test_a_killed_runs_lock_is_taken_over(tiny_llama, corpus_file, tmp_path):
    """kill -9 leaves the lock behind: the next run finds its process gone, takes the lock over and
    finishes the dataset. (The killed process only takes the lock: the resume of a killed extract's
    shards is tested in test_run_extract.py and test_cluster.py.)"""
    out = tmp_path / "topk"
    holder = ("import sys, time\nfrom fusedata.dataset import DatasetDir\n"
              "with DatasetDir(sys.argv[1]).writing('extract'):\n    print('locked', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline() == b"locked\n"
        with pytest.raises(wl.LockHeld, match=f"pid {proc.pid} on"):  # alive: refused
            run_extract(_job(tiny_llama, corpus_file, out))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert LockRecord.from_json((out / LOCK_NAME).read_text()).pid == proc.pid  # left behind
    logs: list[str] = []
    manifest = run_extract(_job(tiny_llama, corpus_file, out, logs))
    assert logs[0] == (f"{out}: taking over the lock of a run that is gone "
                       f"(its process {proc.pid} on {wl.HOST} has exited)")
    assert open_dataset(out) == manifest and len(manifest.shards) == 3
    assert not (out / LOCK_NAME).exists()
