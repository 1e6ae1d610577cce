"""Option helpers every command module shares: a config field's default and choices, --verify.

A module of its own so the command modules need not import cli.main (which imports them)."""

from __future__ import annotations

from dataclasses import MISSING, fields

import click

verify_option = click.option(
    "--verify/--no-verify", default=True, show_default=True,
    help="Check every input shard against the sha256 in its manifest first; a damaged shard is refused by name.")


def config_field(cls: type, name: str):
    """A config dataclass's field: an option's default and choices are defined once, there."""
    return next(f for f in fields(cls) if f.name == name)


def config_default(cls: type, name: str):
    value = config_field(cls, name).default
    assert value is not MISSING, f"{cls.__name__}.{name} has no default"
    return value
