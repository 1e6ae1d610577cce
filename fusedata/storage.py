"""Where files live: a local path or a URI that pyarrow understands (s3://, gs://, hdfs://, file://).

`resolve` turns what a user typed into a pyarrow filesystem and a path on it; `locate` wraps the two in
a `Location`, the few pathlib methods the dataset code needs (join, list, read, atomic write, delete),
so every stage reads and writes its folders the same way on local disk and on object storage.

Atomic writes: a file is written to a temporary name beside its final one and moved into place. On a
local disk (or HDFS) the move is a rename; S3 and GCS have none, so pyarrow copies the object to its
key and deletes the temporary one. Object stores show an object whole or not at all, so either way a
reader never sees a partial file under its final name; a crash between copy and delete leaves only a
temporary object, which the next run deletes by its name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from fusedata.errors import UsageError

_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "viewfs://", "file://", "mock://")

PathLike = str | os.PathLike[str]


class StorageError(UsageError):
    """A location that cannot be reached or written (no such bucket, refused credentials, no endpoint)."""


def is_uri(location: PathLike | Location) -> bool:
    """True for a URI with a scheme pyarrow resolves (a plain path is not one)."""
    if isinstance(location, Location):
        return location.scheme != ""
    return str(location).startswith(_SCHEMES)


def resolve(location: PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI; a local path comes back absolute.

    S3 settings come from the usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_ENDPOINT_URL, AWS_REGION …) or from the URI (``s3://KEY:SECRET@bucket/key?region=…`` and
    ``endpoint_override=127.0.0.1:9000&scheme=http``); messages never show the key or the query.
    """
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{shown(text)}: cannot open this location: {_first_line(e)}") from None


def join(location: PathLike, *names: str) -> str:
    """`location/name/…` as text: a local path joined as a path, a URI's path extended before its query
    (`s3://b/run?endpoint_override=…` / "topk" -> `s3://b/run/topk?endpoint_override=…`)."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text).joinpath(*names))
    head, sep, query = text.partition("?")
    return "/".join([head.rstrip("/"), *names]) + sep + query


def shown(text: str) -> str:
    """A location as messages show it: a URI without its credentials (`s3://KEY:SECRET@bucket/…`)
    or its query."""
    if not is_uri(text):
        return text
    scheme, rest = text.split("?", 1)[0].split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[-1]}" + (f"/{path}" if _ or path else "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Location:
    """A file or folder on a pyarrow filesystem. Joins with `/` like a Path; the methods are the
    pathlib ones fusedata's dataset code uses, and a failing call on remote storage raises
    StorageError naming the location (a local one raises what pathlib would)."""

    __slots__ = ("fs", "path", "scheme", "_shown")

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str = "", shown_as: str | None = None) -> None:
        self.fs, self.path, self.scheme = fs, path, scheme
        self._shown = shown_as if shown_as is not None else (f"{scheme}://{path}" if scheme else path)

    # -- naming ---------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> Location:
        shown_as = str(Path(self._shown) / name) if self.is_local else f"{self._shown.rstrip('/')}/{name}"
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", self.scheme, shown_as)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        head = self.path.rstrip("/").rsplit("/", 1)[0] or "/"
        up = str(Path(self._shown).parent) if self.is_local else self._shown.rstrip("/").rsplit("/", 1)[0]
        return Location(self.fs, head, self.scheme, up)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def __str__(self) -> str:
        return self._shown

    def __repr__(self) -> str:
        return f"Location({self._shown!r})"

    def __fspath__(self) -> str:  # local only: lets os/pathlib/pyarrow take a local Location as a path
        if not self.is_local:
            raise TypeError(f"{self}: not a local path")
        return self.path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __lt__(self, other: Location) -> bool:
        return (self.scheme, self.path) < (other.scheme, other.path)

    def contains(self, other: Location) -> bool:
        """Whether `other` is this location or lies inside it (same filesystem kind)."""
        if self.scheme != other.scheme or type(self.fs) is not type(other.fs):
            return False
        if self.is_local:
            a, b = Path(self.path).resolve(), Path(other.path).resolve()
            return a == b or a in b.parents
        a, b = self.path.rstrip("/"), other.path.rstrip("/")
        return b == a or b.startswith(a + "/")

    # -- queries --------------------------------------------------------------------------------
    @contextmanager
    def _remote_errors(self) -> Iterator[None]:
        """Local calls raise what pathlib raises; remote ones a one-line StorageError naming the place."""
        try:
            yield
        except OSError as exc:
            if self.is_local:
                raise
            raise StorageError(f"{self}: {_first_line(exc)}") from None

    def _type(self) -> pafs.FileType:
        with self._remote_errors():
            return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def size(self) -> int:
        with self._remote_errors():
            info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self}: no such file")
        return int(info.size)

    def iterdir(self) -> list[Location]:
        """The entries directly inside this folder (none if it does not exist)."""
        with self._remote_errors():
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self / info.base_name for info in sorted(infos, key=lambda i: i.base_name)]

    def files(self) -> list[Location]:
        """The files directly inside this folder (none if it does not exist)."""
        with self._remote_errors():
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self / i.base_name for i in sorted(infos, key=lambda i: i.base_name) if i.type == pafs.FileType.File]

    # -- reading --------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self._remote_errors(), self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def blocks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes in blocks (for hashing without holding it whole)."""
        with self._remote_errors(), self.fs.open_input_stream(self.path) as f:
            while block := f.read(size):
                yield block

    def open_input_file(self) -> Any:
        """A seekable file (for pyarrow.parquet)."""
        with self._remote_errors():
            return self.fs.open_input_file(self.path)

    # -- writing --------------------------------------------------------------------------------
    def temporary(self) -> Location:
        """A fresh temporary name beside this one (`.NAME.tmp-<pid><random>`: hidden from Parquet
        folder readers, unique across the nodes of a cluster, recognised as fusedata's by `TMP_RE`)."""
        return self.with_name(f".{self.name}.tmp-{os.getpid()}{uuid.uuid4().int % 10**8:08d}")

    def mkdir(self) -> None:
        """Create the folder and its parents (on object stores: a marker, folders are key prefixes)."""
        with self._remote_errors():
            self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        """Write the file in one go under its own name (one PUT on an object store, which shows
        the object whole or not at all; on a local disk a reader may see it half-written)."""
        with self._remote_errors(), self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_atomic(self, write: Any) -> None:
        """Call `write(tmp)` to write a temporary file beside this one, then move it into place; an
        interrupted write leaves no file under this name, and its temporary one is removed."""
        tmp = self.temporary()
        try:
            with self._remote_errors():
                write(tmp)
            tmp.replace(self)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except (OSError, UsageError):
                pass  # the storage is gone: the next run deletes the temporary file by its name
            raise

    def write_bytes_atomic(self, data: bytes) -> None:
        def write(tmp: Location) -> None:
            with tmp.fs.open_output_stream(tmp.path) as f:
                f.write(data)
        self.write_atomic(write)

    def write_text_atomic(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes_atomic(text.encode(encoding))

    def replace(self, target: Location) -> None:
        """Move this file to `target`, replacing it (a rename locally, copy + delete on S3/GCS)."""
        if self.is_local:
            os.replace(self.path, target.path)
            return
        with self._remote_errors():
            self.fs.move(self.path, target.path)

    def unlink(self, missing_ok: bool = False) -> None:
        if self.is_local:
            Path(self.path).unlink(missing_ok=missing_ok)
            return
        try:
            with self._remote_errors():
                self.fs.delete_file(self.path)
        except StorageError:
            if missing_ok and not self.exists():
                return
            raise

    def rmdir(self) -> None:
        """Remove this (empty) folder."""
        if self.is_local:
            Path(self.path).rmdir()
            return
        with self._remote_errors():
            self.fs.delete_dir(self.path)


def locate(location: PathLike | Location) -> Location:
    """The Location of a local path or a URI (a Location comes back as it is)."""
    if isinstance(location, Location):
        return location
    fs, path = resolve(location)
    text = str(location)
    if not is_uri(text):
        return Location(fs, path, "", str(Path(text)))
    if isinstance(fs, pafs.LocalFileSystem):  # file://
        return Location(fs, path, "", path)
    return Location(fs, path.rstrip("/"), text.split("://", 1)[0], shown(text).rstrip("/"))
