"""The whole spine on tiny models, and its outputs read by other tools: datasets, polars, duckdb;
`fusedata inspect` summaries and plots; the codec round trip through the fused dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import main
from fusedata.codec import decode_topk
from fusedata.report import plot, summarize


def test_fused_dataset_loads_with_datasets_polars_duckdb(spine):
    import datasets
    import duckdb
    import polars as pl

    fused = spine / "fused"
    pattern = str(fused / "shard-*.parquet")
    direct = decode_topk(pq.read_table(fused))  # pyarrow reads the folder too
    ds = datasets.load_dataset("parquet", data_files=pattern, split="train")
    assert ds.num_rows == pq.read_table(fused).num_rows
    via_datasets = decode_topk(ds.data.table, like=fused)  # datasets drops the schema metadata
    np.testing.assert_array_equal(via_datasets.ids, direct.ids)
    np.testing.assert_array_equal(via_datasets.logprobs, direct.logprobs)
    df = pl.read_parquet(pattern)
    assert df.columns[:6] == ["doc_id", "window", "byte_start", "byte_end", "input_ids", "labels"]
    n_labels = duckdb.sql(f"select sum(len(labels)) from '{pattern}'").fetchall()[0][0]
    assert n_labels == direct.n_positions
    # labels are input_ids shifted by one
    for ids, labels in zip(df["input_ids"].to_list(), df["labels"].to_list(), strict=True):
        assert labels == ids[1:]


def test_fused_distributions_are_valid(spine):
    table = pq.read_table(spine / "fused")
    topk = decode_topk(table)
    valid = topk.ids >= 0
    assert valid[:, 0].all()
    p = np.where(valid, np.exp(topk.logprobs.astype(np.float64)), 0.0)
    assert (p.sum(1) <= 1 + 1e-3).all()
    np.testing.assert_allclose(p.sum(1) + topk.tail_mass, 1.0, atol=2e-2)  # zq quantises both
    winners = np.concatenate(table.column("winner").to_pylist())
    assert set(np.unique(winners)) <= {0, 1}


def test_inspect_summaries_and_plots(spine, tmp_path):
    for kind, folder in (("topk", spine / "topk/llama"), ("aligned", spine / "aligned/gemma"), ("fused", spine / "fused")):
        s = summarize(folder)
        assert s["kind"] == kind and s["k"] == 5 and s["codec"]["name"] == "zq"
        assert s["total_bytes"] == sum(f.stat().st_size for f in folder.glob("shard-*.parquet"))
        assert 0 < s["topk_bytes"] < s["total_bytes"]
        assert s["bytes_per_token"] == pytest.approx(s["total_bytes"] / s["positions"])
    aligned = summarize(spine / "aligned/gemma")["stats"]
    assert sum(aligned["kinds"].values()) == pytest.approx(1.0, abs=1e-3)
    fused = summarize(spine / "fused")["stats"]
    assert sum(fused["winning_share"]) == pytest.approx(1.0, abs=1e-3)
    written = plot(spine / "fused", tmp_path / "plots")
    names = {p.name for p in written}
    assert {"bytes_per_token.png", "entropy_ce.png", "winning_share.png"} <= names
    assert all(p.stat().st_size > 1000 for p in written)
    result = CliRunner().invoke(main, ["inspect", str(spine / "fused"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == summarize(spine / "fused")["rows"]


def test_inspect_refuses_unfinished_folder(spine, tmp_path):
    (tmp_path / "half").mkdir()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "half")])
    assert result.exit_code == 2 and "no _manifest.json" in result.output


def _readme_table(after: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after the line starting with `after` in the README's
    dataset formats section."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Dataset formats"):]
    lines = section[section.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| column"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.parametrize("kind, after", [("topk", "`topk/` —"), ("fused", "`fused/` —")])
def test_readme_tables_match_the_schema_descriptions(kind, after):
    """The README's column tables say what the schemas' field metadata says (the card uses the same)."""
    import re

    from schemas import aligned, fused, topk
    from schemas.common import description

    module = {"topk": topk, "fused": fused}[kind]
    fields = {f.name: f for f in module.BASE_FIELDS + getattr(module, "CHUNK_FIELDS", [])}  # ALM's optional columns
    documented = set()
    for names, type_cell, meaning in _readme_table(after):
        cols = re.findall(r"`([a-z_]+)`", names)
        for col in cols:
            documented.add(col)
            want, shape = description(fields[col])
            if meaning == "as in `topk/`":
                assert (want, shape) == description(next(f for f in topk.BASE_FIELDS if f.name == col))
            else:
                assert want == meaning, col
                assert type_cell.endswith(shape), col
    assert documented == set(fields)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    prose = text[text.index("`aligned/<source>` —"):text.index("`fused/` —")]
    assert all(f"`{f.name}`" in prose for f in aligned.BASE_FIELDS)
