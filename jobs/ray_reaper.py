"""Stops what is left of fusedata's embedded Ray when its driver dies (kill -9, OOM killer).

Ray ties its GCS and raylet to the driver (the kernel kills them with it), but the raylet's
dashboard agent and runtime-env agent then spend about a minute trying to report to the dead
GCS while still listening on their ports. This watchdog, started by `jobs.embedded_ray`, keeps a
list of the driver's Ray descendants and, once its stdin (a pipe only the driver writes) closes or
the driver is gone, terminates every one still alive, then kills those that linger.

Run as a script (`python -I ray_reaper.py DRIVER_PID RAY_DIR`); it imports psutil only.
"""

from __future__ import annotations

import os
import sys
import threading

import psutil

POLL_S = 1.0
GRACE_S = 2.0


def is_ray_process(p: psutil.Process, ray_dir: str) -> bool:
    """gcs_server, raylet and Ray's Python helpers run from the ray package; workers and agents
    rename themselves `ray::...`."""
    try:
        return p.name().startswith("ray::") or any(ray_dir in a or a.startswith("ray::") for a in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def watch(driver_pid: int, ray_dir: str, stdin_closed: threading.Event) -> list[psutil.Process]:
    """Record the driver's Ray descendants until the driver goes; return them (psutil.Process
    remembers each creation time, so a reused pid is never taken for one of them)."""
    seen: dict[int, psutil.Process] = {}
    me = os.getpid()  # a child of the driver too, and its command line names the ray folder
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    while True:
        try:
            for p in driver.children(recursive=True):
                if p.pid != me and p.pid not in seen and is_ray_process(p, ray_dir):
                    seen[p.pid] = p
        except psutil.NoSuchProcess:
            break
        if stdin_closed.wait(POLL_S) or not driver.is_running():
            break
    return list(seen.values())


def reap(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main() -> None:
    driver_pid, ray_dir = int(sys.argv[1]), sys.argv[2]
    closed = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()  # returns when every copy of the pipe's write end is closed
        closed.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    reap(watch(driver_pid, ray_dir, closed))


if __name__ == "__main__":
    main()
