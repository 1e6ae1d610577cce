"""Small helpers shared by test files (tests/ is on sys.path via conftest)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def unreadable(path: Path, monkeypatch) -> Iterator[Path]:
    """`path` made unreadable (mode 000) for the duration; restored afterwards."""
    path.chmod(0)
    if os.geteuid() == 0:  # root reads a mode-000 file: make the read fail as it would for a user
        real = Path.read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        import fusedata.corpus

        real_open = fusedata.corpus._open_file

        def open_input(f):  # the corpus reader opens its files through pyarrow
            if Path(f.path) == Path(path).absolute():
                raise PermissionError(errno.EACCES, "Permission denied", f.path)
            return real_open(f)

        monkeypatch.setattr(fusedata.corpus, "_open_file", open_input)
    try:
        yield path
    finally:
        path.chmod(0o644)


def converted_model_dir(name: str) -> Path | None:
    """A bundled model's converted folder if one exists on this machine (no conversion here)."""
    roots = [os.environ.get("FUSEDATA_CACHE"), "/tmp/fdcache", str(Path.home() / ".cache" / "fusedata")]
    for root in filter(None, roots):
        folder = Path(root) / "models" / name
        if (folder / "tokenizer.json").is_file():
            return folder
    return None
