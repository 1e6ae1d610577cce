"""Errors that reach the user as a clear message and a non-zero exit, not a traceback."""


class UsageError(Exception):
    """Bad input or configuration: the CLI prints the message and exits with status 2."""
