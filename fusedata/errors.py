"""Errors that reach the user as a clear message and a non-zero exit, not a traceback."""


class UsageError(Exception):
    """Bad input or configuration: the CLI prints the message and exits with status 2."""


class OptionError(UsageError):
    """A config field holds a bad value. Raised by a config dataclass's `__post_init__`, the one
    place its options are checked; each entry point names the field its own way (`--warmup-ratio`
    on the command line, `train.warmup_ratio` in a pipeline file) with `named()`."""

    def __init__(self, field: str, message: str) -> None:
        # raised from Python: the field's name, and the command-line option it comes from
        super().__init__(f"{field}: {message} (--{field.replace('_', '-')})")
        self.field, self.message = field, message

    def named(self, prefix: str = "--") -> str:
        """The message with the field as the entry point spells it."""
        name = "--" + self.field.replace("_", "-") if prefix == "--" else prefix + self.field
        return f"{name}: {self.message}"


def check_options(checks: list[tuple[str, bool, str]]) -> None:
    """A config's `__post_init__`: raise OptionError for the first failed (field, ok, message)."""
    for name, ok, message in checks:
        if not ok:
            raise OptionError(name, message)


def field_choices(config: object) -> list[tuple[str, bool, str]]:
    """The checks of every field of a config dataclass declared with `metadata={"choices": (...)}`."""
    from dataclasses import fields

    return [choice(f.name, getattr(config, f.name), f.metadata["choices"])
            for f in fields(config) if "choices" in f.metadata]  # type: ignore[arg-type]


def choice(name: str, value: object, choices: tuple) -> tuple[str, bool, str]:
    """The check that `value` is one of `choices`, with the message every entry point shows."""
    return (name, value in choices, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


# A failure that is not bad input (a model that raises, a disk that fails, a bug) keeps its own type,
# so Python callers can catch it; it carries the shard it happened in as a note, which survives the
# pickling that brings it back from a Ray worker, and the CLI prints it as one line (`failure_line`).
SHARD_NOTE = "while computing "


def note_shard(exc: BaseException, shard: str) -> None:
    """Record on `exc` the shard it was raised for (once: the innermost place wins)."""
    if shard_of(exc) is None:
        exc.add_note(SHARD_NOTE + shard)


def shard_of(exc: BaseException) -> str | None:
    """The shard `note_shard` recorded on `exc`, or None."""
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, str) and note.startswith(SHARD_NOTE):
            return note[len(SHARD_NOTE):]
    return None


def failure_line(exc: BaseException) -> str:
    """A failure in one line: the shard it happened in, its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    shard = shard_of(exc)
    return f"{shard}: {what}" if shard else what
