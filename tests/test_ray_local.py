"""fusedata's embedded Ray: every listener on loopback, nothing left after a killed driver, and
never a cluster the user did not name.

Each driver is a subprocess (`init_ray` is process-global) with a private RAY_TMPDIR, so neither
the instance it starts nor the cluster it must not join touches /tmp/ray or another Ray on the
machine; a process belongs to the instance when its command line names that folder or it descends
from the driver.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")
pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

DRIVER = """
import os, sys, time
import ray
from jobs.ray_executor import init_ray
init_ray(sys.argv[1] or None)

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
ray.get(actor.pid.remote())
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
"""


@pytest.fixture
def ray_tmp():
    """A private RAY_TMPDIR (short: Ray's socket paths have a length limit); every process found
    under it is stopped afterwards."""
    tmp = tempfile.mkdtemp(prefix="fdr-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    yield tmp, env
    _stop(_processes(tmp))


def _processes(tmp: str, driver: int | None = None) -> dict[int, psutil.Process]:
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != me and (p.pid == driver or any(tmp in a for a in p.info["cmdline"] or [])):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _alive(procs) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _stop(procs: dict[int, psutil.Process]) -> None:
    alive = _alive(procs.values())
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


def _listening(procs) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of `procs`."""
    out = []
    for p in _alive(procs):
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                    if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _driver(env: dict[str, str], address: str = "", wait: bool = False) -> tuple[subprocess.Popen, str]:
    """Start a driver; returns it and the GCS address it reports once its actor answered."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, address, "wait" if wait else "exit"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    line = ""
    while time.time() < deadline and not line.startswith("GCS "):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"the driver failed: {proc.stderr.read()[-3000:]}")
    assert line.startswith("GCS "), "the driver did not come up"
    return proc, line.split()[1]


def test_embedded_ray_listens_on_loopback_only_and_goes_with_a_killed_driver(ray_tmp):
    tmp, env = ray_tmp
    proc, _ = _driver(env, wait=True)
    time.sleep(2)  # the agents finish binding
    procs = _processes(tmp, proc.pid)
    listening = _listening(procs.values())
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet", "ray::Actor"} <= names, listening  # the servers were seen
    assert [s for s in listening if s[1] not in LOOPBACK] == [], listening

    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    procs.update(_processes(tmp))
    deadline = time.time() + 20
    while _alive(procs.values()) and time.time() < deadline:
        time.sleep(0.5)
    assert _listening(procs.values()) == []
    assert [(p.pid, p.name()) for p in _alive(procs.values())] == []


def _ray_start_head(env: dict[str, str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
                          "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return port


def test_embedded_ray_never_joins_a_running_cluster(ray_tmp):
    """A cluster started with `ray start` (recorded where `ray.init()` looks for one) is joined only
    when named, and the driver says which Ray it uses."""
    tmp, env = ray_tmp
    port = _ray_start_head(env)
    proc, gcs = _driver(env)
    err = proc.communicate(timeout=120)[1]
    assert not gcs.endswith(f":{port}"), f"joined the running cluster at {gcs}"
    assert "started an embedded local Ray on 127.0.0.1" in err

    proc, gcs = _driver(env, address=f"127.0.0.1:{port}")
    err = proc.communicate(timeout=120)[1]
    assert gcs.endswith(f":{port}")
    assert f"using the cluster at 127.0.0.1:{port}" in err
