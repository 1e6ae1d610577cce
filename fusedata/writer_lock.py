"""One writer per dataset folder: the `_lock.json` a run takes before it writes anything there.

Every run that writes a dataset folder holds the folder's lock from before its first write until it
ends, whether it succeeds or fails (`run_stage`, which runs extract, align, fuse, export, import and
every dataset stage of `fusedata run`; and `explore`). A second run into the folder (another run's
`--overwrite`, or the same command started twice) is refused with one line naming the holder, before
it writes or deletes anything. The driver holds the lock; Ray workers only write shards under it.

A lock whose run is gone is taken over, so a killed run resumes: at once on the machine it ran on
(its process no longer exists), from anywhere once its heartbeat, rewritten every `HEARTBEAT_S`, is
older than `STALE_AFTER_S`. A run whose lock was taken over while it still lived (it stalled for
longer than that: a suspended laptop, a stopped process) sees it at `check()`, which `run_stage` calls
before writing its manifest and before swapping a replacement in, and stops there.

How a lock is taken:
- Local disk: the lock's changes (take, heartbeat, release) are serialised between processes by
  flock on the folder itself, and the file is created with O_EXCL. Nothing is left to chance.
- Object stores (S3, GCS): pyarrow offers neither exclusive creation nor locks. A run writes its record,
  waits `SETTLE_S`, reads it back and goes on only if it is still its own: of runs that start together
  the last writer wins and the others are refused. The race that remains: a run whose read (no lock)
  and write are more than `SETTLE_S` apart (a request stalled for seconds) also goes on, after the
  first one's read-back. The first run then finds the other's token at its next heartbeat or `check()`
  and stops before its manifest, but until then both may have written shards.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from fusedata.errors import UsageError
from fusedata.storage import Location, PathLike, locate
from schemas.lock import LOCK_NAME, LockRecord, iso, utc_now

try:
    import fcntl
except ImportError:  # Windows: O_EXCL alone
    fcntl = None  # type: ignore[assignment]

HEARTBEAT_S = 10.0  # how often a run rewrites its heartbeat
STALE_AFTER_S = 120.0  # a heartbeat this old means the run is gone (recorded in each lock)
SETTLE_S = 2.0  # object stores: how long a run waits before reading its record back
HOST = socket.gethostname()


class LockHeld(UsageError):
    """Another live run writes this folder."""


class LockLost(UsageError):
    """This run's lock was taken over by another run (this run stalled past its heartbeat timeout)."""


def is_lock_file(name: str) -> bool:
    """The lock, or a temporary file of its heartbeat (only the run holding the lock removes them)."""
    return name == LOCK_NAME or name.startswith(f".{LOCK_NAME}.tmp-")


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process: alive
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def gone(record: LockRecord) -> str:
    """Why the run holding `record` is gone ("" while it may still live)."""
    if record.host == HOST and not _pid_alive(record.pid):
        return f"its process {record.pid} on {record.host} has exited"
    age = record.heartbeat_age_s()
    if age > record.stale_after_s:
        return f"no heartbeat for {age:.0f} s"
    return ""


def holder(record: LockRecord) -> str:
    """Who holds a lock, for messages."""
    return (f"{record.what}, pid {record.pid} on {record.host}, since {record.started} "
            f"(heartbeat {max(0.0, record.heartbeat_age_s()):.0f} s ago)")


class WriterLock:
    """The lock of one dataset folder, for one run. Use as a context manager: taken on entry
    (LockHeld if another live run holds it), refreshed by a thread while held, removed on exit."""

    def __init__(self, folder: PathLike | Location, what: str, log: Callable[[str], None] = print) -> None:
        self.folder = locate(folder)
        self.path = self.folder / LOCK_NAME
        self.what, self.log = what, log
        self.token = uuid.uuid4().hex
        self.record: LockRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[Path] = []  # the folders this run created (innermost first)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- reading and writing the record ------------------------------------------------------------
    def _mutex(self) -> Any:
        return _folder_flock(self.folder.path) if self.folder.is_local and fcntl is not None else nullcontext()

    def _read(self) -> tuple[bool, LockRecord | None]:
        """(whether a lock file exists, its record or None when it does not read as one)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False, None
        except UsageError:  # remote: a missing object or a failed request
            if not self.path.exists():
                return False, None
            raise
        try:
            return True, LockRecord.from_json(text)
        except (ValueError, UnicodeDecodeError):
            return True, None

    def _write(self, record: LockRecord, exclusive: bool = False) -> None:
        """Write the record whole: one PUT on an object store (an object shows whole or not at all);
        locally a new file with O_EXCL (`exclusive`), else a temporary file renamed over the lock."""
        data = record.to_json().encode()
        if not self.folder.is_local:
            self.path.write_bytes(data)
        elif not exclusive:
            self.path.write_bytes_atomic(data)
        else:
            fd = os.open(self.path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- taking, refreshing and releasing ---------------------------------------------------------
    def acquire(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"output {self.folder} exists and is not a folder")
        self._made = _missing_folders(self.folder) if self.folder.is_local else []
        self.folder.mkdir()
        now = iso(utc_now())
        self.record = LockRecord(HOST, os.getpid(), self.token, self.what, now, now, STALE_AFTER_S)
        try:
            if self.folder.is_local:
                with self._mutex():
                    self._clear_stale()
                    for left in self.folder.files():  # a heartbeat's temporary file, if its run was killed
                        if is_lock_file(left.name) and left.name != LOCK_NAME:
                            left.unlink(missing_ok=True)
                    try:
                        self._write(self.record, exclusive=True)
                    except FileExistsError:  # a writer that does not take the flock (another machine on NFS)
                        raise self._held(self._read()[1]) from None
            else:
                self._clear_stale()
                self._write(self.record)
                _settle()
                _, back = self._read()
                if back is None or back.token != self.token:  # another run wrote after this one: it goes on
                    raise self._held(back)
        except BaseException:  # refused, or stopped half-way: leave no lock of this run behind
            self._remove_if_ours()
            self._drop_folder()
            raise
        self._thread = threading.Thread(target=self._beat, name=f"fusedata-lock {self.folder}", daemon=True)
        self._thread.start()

    def _clear_stale(self) -> None:
        """Refuse a live lock of another run; make way for a dead run's lock (or a damaged one)."""
        exists, held = self._read()
        if not exists:
            return
        why = "it does not read as a lock record" if held is None else gone(held)
        if held is not None and not why:
            raise self._held(held)
        self.log(f"{self.folder}: taking over the lock of a run that is gone ({why})")
        if self.folder.is_local:
            self.path.unlink(missing_ok=True)

    def _held(self, record: LockRecord | None) -> LockHeld:
        if record is None:
            return LockHeld(f"{self.folder}: another run is taking this folder's lock at the same time; "
                            "try again once it has finished")
        return LockHeld(f"{self.folder} is being written by another run ({holder(record)}); wait for it to "
                        f"finish: if it no longer runs, its lock is taken over once its heartbeat is "
                        f"{record.stale_after_s:.0f} s old, or at once on {record.host}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self._mutex():
                    _, now = self._read()
                    if now is None or now.token != self.token:  # taken over: check() stops the run
                        return
                    assert self.record is not None
                    self.record = replace(self.record, heartbeat=iso(utc_now()))
                    self._write(self.record)
            except (OSError, UsageError):
                continue  # a storage hiccup: the next beat tries again

    def check(self) -> None:
        """Raise LockLost if another run now holds this folder's lock: called before the steps a
        run must not take once another one writes here (the manifest, the overwrite swap)."""
        with self._mutex():
            _, now = self._read()
        if now is None or now.token != self.token:
            who = f" by another run ({holder(now)})" if now is not None else ""
            raise LockLost(f"{self.folder}: this run's lock was taken over{who} while it stalled for more than "
                           f"{STALE_AFTER_S:.0f} s; stopped before finishing (its shards are kept)")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's. Never raises: it runs
        while another error may be on its way out (a lock that cannot be removed goes stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove_if_ours()
        self._drop_folder()

    def _remove_if_ours(self) -> None:
        try:
            with self._mutex():
                _, now = self._read()
                if now is not None and now.token == self.token:
                    self.path.unlink(missing_ok=True)
        except (OSError, UsageError) as exc:
            self.log(f"{self.folder}: could not remove {LOCK_NAME} ({exc}); the next run takes it over")

    def _drop_folder(self) -> None:
        """Remove the folders this run made if nothing was written to them (a refused run leaves no trace)."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: it holds the run's output


def _missing_folders(folder: Location) -> list[Path]:
    """The folders `mkdir` would create for a local `folder`, innermost first."""
    missing, p = [], Path(folder.path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _settle() -> None:
    """Object stores: give a run that read "no lock" at the same time as this one the time to write its own."""
    time.sleep(SETTLE_S)


@contextmanager
def _folder_flock(path: str) -> Iterator[None]:
    """An exclusive flock on the folder `path` (held for the few file operations of a lock change)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
