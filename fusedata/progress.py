"""A progress display with shards, documents, tokens and tokens/s: a rich bar on a terminal, whole
plain lines elsewhere (a log file, CI, a pipe: a bar's redraws there come out cut mid-word), or silence."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PLAIN_EVERY_S = 5.0  # off a terminal: a line per finished shard, at most this often (and the last one)


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
        self.label, self.total_shards, self.shards, self.count_docs = label, total_shards, 0, count_docs
        self._plain = not quiet and not Console(stderr=True).is_terminal
        self._said_at = float("-inf")
        if not quiet and not self._plain:
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
        self.shards += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        self._refresh()
        if self._plain and (time.perf_counter() - self._said_at >= PLAIN_EVERY_S or self.shards == self.total_shards):
            self._say()

    def line(self) -> str:
        """The figures as one plain line."""
        docs = f" · {self._docs_shown()} docs" if self.count_docs else ""
        return (f"{self.label}: {self.shards}/{self.total_shards} shards{docs} · {self.tokens_done:,} tokens · "
                f"{self.rate():,.0f} tok/s · {time.perf_counter() - self.t0:.0f} s")

    def _say(self) -> None:
        self._said_at = time.perf_counter()
        print(self.line(), file=sys.stderr, flush=True)

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
