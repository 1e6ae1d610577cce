"""A progress display with shards, documents, tokens and tokens/s (rich), or silence."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    """Counts what a stage has done; renders a bar on a terminal (stderr) unless quiet."""

    def __init__(self, label: str, total_shards: int, total_docs: int | None = None, quiet: bool = False,
                 count_docs: bool | None = None) -> None:
        count_docs = total_docs is not None if count_docs is None else count_docs
        self.docs = 0
        self.tokens_done = 0
        self.total_docs = total_docs
        self.t0 = time.perf_counter()
        self._bar: Progress | None = None
        if not quiet:
            self._bar = Progress(
                TextColumn(f"[bold]{label}[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("shards · " + ("{task.fields[docs]} docs · " if count_docs else "")
                           + "{task.fields[tokens]} tokens · {task.fields[rate]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total_shards, docs=self._docs_shown(), tokens=0, rate="-")
            self._bar.start()

    def tokens(self, n: int) -> None:
        self.tokens_done += n
        self._refresh()

    def add(self, docs: int = 0, tokens: int = 0) -> None:
        """Figures a worker reports while its shard is under way (the Ray executor's live progress)."""
        self.docs += docs
        self.tokens_done += tokens
        self._refresh()

    def shard_done(self, result: Any, count_tokens: bool = True, count_docs: bool = True) -> None:
        if count_docs:
            self.docs += result.input_rows
        if count_tokens:
            self.tokens_done += result.tokens
        if self._bar is not None:
            self._bar.advance(self._task)
        self._refresh()

    def _docs_shown(self) -> str:
        return f"{self.docs:,}" if self.total_docs is None else f"{self.docs}/{self.total_docs}"

    def rate(self) -> float:
        return self.tokens_done / max(time.perf_counter() - self.t0, 1e-9)

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task,
                docs=self._docs_shown(),
                tokens=f"{self.tokens_done:,}",
                rate=f"{self.rate():,.0f} tok/s",
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
