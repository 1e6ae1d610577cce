"""A real S3 server for the tests: moto's server mode on 127.0.0.1, a free port, one bucket.

moto runs in its own process, from the first of: $FUSEDATA_MOTO_SERVER (a `moto_server` executable),
this Python if it has `moto[server]`, or .venv-s3/bin/moto_server (`make s3` builds it: moto pins
python-dateutil < 3, so it is kept out of the main environment). Without one the S3 tests skip.
pyarrow finds the server through the environment the `s3` fixture sets (AWS_ENDPOINT_URL and test
credentials), as a user would point fusedata at their own S3-compatible store.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fusedata-test"
KEY, SECRET, REGION = "testing-key", "testing-secret", "us-east-1"


def moto_command() -> list[str] | None:
    """How to start moto's server here, or None."""
    if exe := os.environ.get("FUSEDATA_MOTO_SERVER"):
        return [exe]
    if importlib.util.find_spec("moto") and importlib.util.find_spec("flask"):
        return [sys.executable, "-m", "moto.server"]
    exe = REPO / ".venv-s3" / "bin" / "moto_server"
    if exe.is_file():
        return [str(exe)]
    return shutil.which("moto_server") and [shutil.which("moto_server")]  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """The environment that points pyarrow (and so fusedata) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(access_key=KEY, secret_key=SECRET, region=REGION, scheme="http",
                                 endpoint_override=self.endpoint.split("://", 1)[1], allow_bucket_creation=True)

    def keys(self, prefix: str) -> list[str]:
        """Every object under s3://bucket/prefix, relative to it."""
        sel = pafs.FileSelector(f"{self.bucket}/{prefix}", recursive=True, allow_not_found=True)
        base = len(self.bucket) + len(prefix) + 2
        return sorted(i.path[base:] for i in self.filesystem().get_file_info(sel) if i.type == pafs.FileType.File)


def start_server(extra_env: dict[str, str] | None = None, bucket: str | None = BUCKET) -> S3Server:
    """Start moto on a free loopback port and wait until it answers (skip the test if no moto)."""
    cmd = moto_command()
    if not cmd:
        pytest.skip("no moto server: `make s3` builds .venv-s3 (or set FUSEDATA_MOTO_SERVER)")
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # moto imports for seconds; much longer on a loaded machine
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on {endpoint} ({' '.join(cmd)})")
            time.sleep(0.1)
    server = S3Server(endpoint, bucket or "", proc)
    if bucket:
        server.filesystem().create_dir(bucket)
    return server


def stop_server(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_server()
    yield server
    stop_server(server)


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Server]:
    """The session's S3 server with its environment set for this test (a patch of its own, so a
    test's `monkeypatch.undo()` keeps it); tests write under a prefix named after themselves
    (`s3_prefix(request)`)."""
    with pytest.MonkeyPatch.context() as env:
        for k, v in s3_server.env.items():
            env.setenv(k, v)
        # the writer lock's wait before reading its record back (2 s, for real networks) on loopback
        env.setattr("fusedata.writer_lock.SETTLE_S", 0.05)
        yield s3_server


def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own: s3://BUCKET/<prefix>/…"""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return f"s3://{BUCKET}/{name}"
