"""The `_lock.json` a dataset folder holds while a run writes it (fusedata/writer_lock.py).

It names the run that writes the folder (machine, process, a random token that tells two runs of one
process apart) and when it started; the run rewrites `heartbeat` every few seconds while it lives
and deletes the file when it ends, whether it succeeded or failed. A lock whose process is gone (on
the same machine) or whose heartbeat is older than its `stale_after_s` belongs to a dead run and is
taken over.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass

LOCK_VERSION = 1
LOCK_NAME = "_lock.json"  # leading underscore: Parquet folder readers skip it


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def iso(t: _dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


@dataclass(frozen=True)
class LockRecord:
    host: str  # socket.gethostname() of the machine the run's driver runs on
    pid: int  # the driver's process id on that machine
    token: str  # random, one per run: which run holds the lock, even two in one process
    what: str  # the command writing the folder: extract, align, fuse, export, import, explore
    started: str  # ISO 8601 UTC, when the lock was taken
    heartbeat: str  # ISO 8601 UTC, rewritten every few seconds while the run lives
    stale_after_s: float  # a heartbeat older than this means the run is gone
    lock_version: int = LOCK_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> LockRecord:
        """The record in `text`; ValueError for anything that is not one."""
        try:
            d = json.loads(text)
            record = cls(host=str(d["host"]), pid=int(d["pid"]), token=str(d["token"]), what=str(d["what"]),
                         started=str(d["started"]), heartbeat=str(d["heartbeat"]),
                         stale_after_s=float(d["stale_after_s"]), lock_version=int(d.get("lock_version", 1)))
            for t in (record.started, record.heartbeat):
                if _dt.datetime.fromisoformat(t).tzinfo is None:
                    raise ValueError(f"{t!r} has no time zone")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a fusedata lock record ({exc})") from None
        return record

    def heartbeat_age_s(self, now: _dt.datetime | None = None) -> float:
        """Seconds since the last heartbeat (clocks of the machines involved are assumed to agree
        to well within `stale_after_s`)."""
        return ((now or utc_now()) - _dt.datetime.fromisoformat(self.heartbeat)).total_seconds()
