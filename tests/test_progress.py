"""Progress off a terminal: whole plain lines, not a bar's redraws cut mid-word."""

from __future__ import annotations

from types import SimpleNamespace

import fusedata.progress as progress
from fusedata.progress import StageProgress


def test_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)  # only the first and the last shard speak
    p = StageProgress("extract tiny", total_shards=3, total_docs=6)
    for _ in range(3):
        p.shard_done(SimpleNamespace(input_rows=2, tokens=100))
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("extract tiny: 1/3 shards · 2/6 docs · 100 tokens · ")
    assert lines[1].startswith("extract tiny: 3/3 shards · 6/6 docs · 300 tokens · ")
    assert all(line.endswith(" s") and "tok/s" in line for line in lines)


def test_quiet_says_nothing(capsys):
    p = StageProgress("align", total_shards=1, quiet=True)
    p.shard_done(SimpleNamespace(input_rows=1, tokens=5))
    p.close()
    assert capsys.readouterr().err == ""
