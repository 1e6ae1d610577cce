"""Shared matplotlib set-up for the charts `fusedata inspect --plot` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, target: Path) -> Path:
    """Lay out, write and close a figure; returns the path written."""
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    pyplot().close(fig)
    return target
