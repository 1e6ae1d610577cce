"""A worker's exception, brought back to the driver as itself rather than as Ray's wrapping of it.

Ray Data turns an exception raised in a `map_batches` worker into `RayTaskError(UserCodeException)`,
whose cause chain does not survive the trip (the driver gets only text: "UDF failed to process a data
block..."), and keeps only the text of an actor's `__init__` error. So the shard workers never raise:
they return the failure in their result row (`pack`), and the driver raises it (`unpack`), with the
same type and message as under the local executor (a UsageError stays one: exit status 2), the shard
it happened in (fusedata.errors.note_shard) and the worker's traceback as a note (`fusedata --debug`).
Plain Ray actors (explore's model pool) keep the exception as the RayTaskError's cause: `worker_error`.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import ray

from fusedata.errors import UsageError

TRACEBACK_NOTE = "the worker's traceback:\n"


def pack(exc: BaseException) -> bytes:
    """`exc` for the driver: pickled whole when it unpickles again, else its type, message and notes."""
    try:
        whole: bytes | None = pickle.dumps(exc)
        pickle.loads(whole)  # an exception whose __init__ does not take its args back fails here
    except Exception:  # noqa: BLE001 - any failure to round-trip: send the parts
        whole = None
    return pickle.dumps({
        "exception": whole, "type": type(exc).__name__, "usage": isinstance(exc, UsageError), "message": str(exc),
        "notes": [n for n in getattr(exc, "__notes__", ()) if isinstance(n, str)],
        "traceback": "".join(traceback.format_exception(exc)).rstrip(),
    })


def unpack(data: bytes) -> BaseException:
    """The exception `pack` sent, with the worker's traceback as a note."""
    parts: dict[str, Any] = pickle.loads(data)
    exc: BaseException | None = None
    if parts["exception"] is not None:
        try:
            exc = pickle.loads(parts["exception"])
        except Exception:  # noqa: BLE001 - its class is not importable here
            exc = None
    if exc is None:
        exc = UsageError(parts["message"]) if parts["usage"] else RuntimeError(f"{parts['type']}: {parts['message']}")
        for note in parts["notes"]:
            exc.add_note(note)
    exc.add_note(TRACEBACK_NOTE + parts["traceback"])
    return exc


def worker_error(exc: BaseException) -> BaseException:
    """The exception a plain Ray actor raised, out of the RayTaskError that carries it (its str is
    Ray's multi-line report), with the actor's traceback as a note; `exc` itself when it carries none."""
    cause = exc.__dict__.get("cause") if isinstance(exc, ray.exceptions.RayTaskError) else None
    if not isinstance(cause, Exception) or isinstance(cause, ray.exceptions.RayError):
        return exc
    trace = exc.__dict__.get("traceback_str") or str(exc)  # as_instanceof_cause() keeps it in its str
    cause.add_note(TRACEBACK_NOTE + str(trace).rstrip())
    return cause
