"""Where files live: a local path or a URI that pyarrow understands (s3://, gs://, hdfs://, file://).

One function turns what a user typed into a pyarrow filesystem and a path on it, so the readers and
writers of every stage work the same on local disk and on object storage.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from fusedata.errors import UsageError

_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "viewfs://", "file://", "mock://")


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for a URI with a scheme pyarrow resolves (a plain path is not one)."""
    return str(location).startswith(_SCHEMES)


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI; a local path comes back absolute.

    S3 settings come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AWS_REGION …)
    or from the URI's query (``s3://bucket/key?endpoint_override=127.0.0.1:9000&scheme=http``).
    """
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"{text}: cannot open this location: {e}") from e
