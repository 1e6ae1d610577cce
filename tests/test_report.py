"""`fusedata inspect`'s figures: what each dataset kind reports."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from fusedata.report import render, summarize
from fusedata.stages.fuse import FuseConfig, FuseJob, run_fuse
from schemas.manifest import Manifest


def test_avgce_reports_weights_and_aligned_reports_positions(spine, tmp_path):
    """AvgCE has no winner: inspect shows each candidate's mean weight, not 'wins 0.0%'. An aligned
    dataset holds no token ids: inspect shows the positions it covers, not 'tokens 0'."""
    out = tmp_path / "avgce"
    run_fuse(FuseJob(str(spine / "topk/llama"), [str(spine / "aligned/gemma")], str(out),
                     FuseConfig(method="avgce"), quiet=True, log=lambda m: None))
    text = render(summarize(out))
    candidates = [line for line in text.splitlines() if line.lstrip().startswith("candidate ")]
    assert len(candidates) == 2 and not any("wins" in line for line in candidates), text
    assert all("mean weight" in line for line in candidates)
    assert "wins" in render(summarize(spine / "fused"))  # MinCE still says who won

    aligned = summarize(spine / "aligned/gemma")
    assert aligned["positions"] > 0
    assert "tokens 0" not in render(aligned)


def test_mean_candidate_ce_weights_windows_by_positions(spine):
    """A 2-token tail window counts for the one position it predicts, not as much as a full window."""
    folder = spine / "fused"
    manifest = Manifest.read(folder)
    ce, n = [], []
    for s in manifest.shards:
        t = pq.read_table(folder / s.name, columns=["winner", "candidate_ce"])
        ce += t.column("candidate_ce").to_pylist()
        n += [len(w) for w in t.column("winner").to_pylist()]
    ce_arr, n_arr = np.asarray(ce, np.float64), np.asarray(n, np.float64)
    assert len(set(n)) > 1  # windows of different lengths: the two means differ
    want = (ce_arr * n_arr[:, None]).sum(0) / n_arr.sum()
    np.testing.assert_allclose(manifest.stats["mean_candidate_ce"], want.round(4), atol=1e-4)


def test_candidates_named_on_the_command_line(spine, tmp_path):
    """`--aligned NAME=PATH` names a candidate in the fused dataset and in inspect (default: the model
    path given to extract, which for a user's own model is a long folder path)."""
    from click.testing import CliRunner

    from cli.main import main

    out = tmp_path / "named"
    args = ["fuse", "--target", f"llama={spine / 'topk/llama'}", "--aligned", f"gemma={spine / 'aligned/gemma'}",
            "--output", str(out), "--executor", "local", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = summarize(out)
    assert Manifest.read(out).run["candidates"] == ["llama", "gemma"]
    assert "candidate llama" in render(summary) and "candidate gemma" in render(summary)
    # the same data as the unnamed run: only the names differ
    for s in Manifest.read(out).shards:
        named, plain = pq.read_table(out / s.name), pq.read_table(spine / "fused" / s.name)
        assert named.select(["winner", "candidate_ce", "topk_zq"]).equals(plain.select(["winner", "candidate_ce", "topk_zq"]))

    same = CliRunner().invoke(main, args[:3] + ["--aligned", f"llama={spine / 'aligned/gemma'}", "--output",
                                                str(tmp_path / "x"), "--executor", "local", "--quiet"])
    assert same.exit_code == 2 and "error: two candidates are given the same name" in same.stderr
