"""fusedata's own local Ray: on loopback only, never a cluster the user did not name, gone with its driver.

- `address="local"`: `ray.init()` with no address joins a Ray already running on the machine (the one
  `ray start` recorded in /tmp/ray/ray_current_cluster); "local" always starts a new instance.
- Loopback: Ray turns a node address of 127.0.0.1 into the machine's LAN address
  (`services.resolve_ip_for_localhost`), and every server (GCS, raylet, core workers of the driver and
  the actors, dashboard agent, runtime-env agent) then listens on all interfaces. It keeps 127.0.0.1
  only where "Ray clusters" are disabled (its `ENABLE_RAY_CLUSTER`, read from
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import), so they are disabled while the instance starts: in this
  process for the address, in the environment for the processes it starts. The servers then bind
  127.0.0.1. No dashboard is started; the raylet always starts its dashboard agent (it needs the
  agent's metrics port and exits without it), which then listens on 127.0.0.1 too.
- Gone with its driver: `jobs/ray_reaper.py` stops the agents that would outlive a killed driver.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

LOOPBACK = "127.0.0.1"
_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_REAPER = Path(__file__).with_name("ray_reaper.py")
_reapers: list[subprocess.Popen] = []  # held so their stdin pipes stay open while this process lives


@contextmanager
def _loopback_only() -> Iterator[None]:
    import ray._private.ray_constants as ray_constants

    saved_flag, saved_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(_CLUSTERS_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTERS_ENV] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTERS_ENV, None)
        else:
            os.environ[_CLUSTERS_ENV] = saved_env


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a new Ray instance for this process alone, every listener on 127.0.0.1."""
    with _loopback_only():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOOPBACK,
                 logging_level="ERROR", log_to_driver=False, _node_ip_address=LOOPBACK)
    _start_reaper()


def _start_reaper() -> None:
    """The watchdog that stops this instance's processes if this driver is killed (its stdin is a
    pipe whose write end only this process holds: non-inheritable, so no child keeps it open)."""
    if any(r.poll() is None for r in _reapers):  # one per driver: it records every later instance too
        return
    ray_dir = str(Path(ray.__file__).parent)
    _reapers.append(subprocess.Popen([sys.executable, "-I", str(_REAPER), str(os.getpid()), ray_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True))
