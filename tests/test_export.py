"""`fusedata export --layout plain` and `fusedata import`: the plain layout is read by duckdb and
`datasets` with no fusedata code, and export -> import -> decode gives back the original top-k (ids
exactly, log-probs within the codec's grid); an imported target fuses like the original."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import main
from fusedata.codec import decode_topk
from fusedata.dataset import TARGET_KEYS, open_dataset
from fusedata.topk import PAD_ID
from schemas.manifest import MANIFEST_NAME, Manifest

KINDS = ["topk/llama", "aligned/gemma", "fused"]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def grid_error(codec_params: dict, lp: np.ndarray) -> np.ndarray:
    """The zq codec's documented bound on |lp − decoded| (its module docstring): step/2 above
    −coarse_from, coarse_step/2 below."""
    step, coarse_from, coarse = codec_params["step"], codec_params["coarse_from"], codec_params["coarse_step"]
    return np.where(-lp <= coarse_from + step / 2, step / 2, coarse / 2) + 1e-6


@pytest.fixture(scope="module")
def exported(spine, tmp_path_factory):
    """Each spine dataset exported plain and imported back: {kind: (plain dir, imported dir)}."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for kind in KINDS:
        name = kind.replace("/", "-")
        plain, back = root / f"plain-{name}", root / f"zq-{name}"
        r = cli("export", str(spine / kind), "--output", str(plain), "--layout", "plain", "--quiet")
        assert r.exit_code == 0, r.output
        r = cli("import", str(plain), "--output", str(back), "--quiet")
        assert r.exit_code == 0, r.output
        out[kind] = (plain, back)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_plain_round_trip(spine, exported, kind):
    plain, back = exported[kind]
    src = spine / kind
    original = decode_topk(pq.read_table(src))

    # the plain layout, read with duckdb: the same numbers, padding dropped, with no fusedata code
    import duckdb

    con = duckdb.connect()
    got = con.execute(f"select topk_ids, topk_logprobs, gold_logprob, tail_mass from read_parquet('{plain}/*.parquet')")
    rows = got.fetchall()
    ids = [p for r in rows for p in r[0]]
    lps = [p for r in rows for p in r[1]]
    assert len(ids) == original.n_positions == sum(len(r[2]) for r in rows)
    for i in range(original.n_positions):
        valid = original.ids[i] != PAD_ID
        assert ids[i] == original.ids[i][valid].tolist()
        np.testing.assert_array_equal(np.array(lps[i], np.float32), original.logprobs[i][valid])
    np.testing.assert_array_equal(np.array([g for r in rows for g in r[2]], np.float32), original.gold_logprob)
    np.testing.assert_array_equal(np.array([t for r in rows for t in r[3]], np.float32), original.tail_mass)

    # imported back: same kind, same base columns, same top-k
    m_src, m_back = Manifest.read(src), open_dataset(back)
    assert m_back.kind == m_src.kind and m_back.rows == m_src.rows and m_back.tokens == m_src.tokens
    target_run = m_src.run if m_src.kind == "topk" else m_src.run["target"]
    back_target = m_back.run if m_back.kind == "topk" else m_back.run["target"]
    assert {k: back_target.get(k) for k in TARGET_KEYS} == {k: target_run.get(k) for k in TARGET_KEYS}
    t_src, t_back = pq.read_table(src), pq.read_table(back)
    codec_cols = {"topk_zq"}
    for name in t_src.column_names:
        if name not in codec_cols:
            assert t_back.column(name).to_pylist() == t_src.column(name).to_pylist(), name
    decoded = decode_topk(t_back)
    np.testing.assert_array_equal(decoded.ids, original.ids)
    np.testing.assert_array_equal(decoded.lengths, original.lengths)
    params = m_back.run["codec"]["params"]
    real = original.ids != PAD_ID
    err = np.abs(decoded.logprobs[real] - original.logprobs[real])
    assert np.all(err <= grid_error(params, original.logprobs[real]))
    assert np.all(np.isneginf(decoded.logprobs[~real]))
    assert np.all(np.abs(decoded.gold_logprob - original.gold_logprob) <= grid_error(params, original.gold_logprob))
    # the tail is coded as round(−ln t / tail_step): relative error within exp(tail_step / 2)
    ratio = np.exp(params["tail_step"] / 2) + 1e-6
    pos = original.tail_mass > 0
    assert np.all(decoded.tail_mass[pos] <= original.tail_mass[pos] * ratio)
    assert np.all(decoded.tail_mass[pos] >= original.tail_mass[pos] / ratio)


def test_plain_keeps_fused_columns_and_loads_with_datasets(spine, exported, tmp_path):
    plain, _ = exported["fused"]
    import datasets

    ds = datasets.load_dataset(str(plain), split="train", cache_dir=str(tmp_path / "cache"))
    src = pq.read_table(spine / "fused")
    assert ds.num_rows == src.num_rows
    assert ds.features["topk_ids"].feature.feature.dtype == "int32"  # list<list<int32>>: numbers, not bytes
    assert ds.features["topk_logprobs"].feature.feature.dtype == "float32"
    for name in ("winner", "weights", "candidate_ce", "input_ids", "labels"):
        assert ds[name] == src.column(name).to_pylist(), name
    meta = pq.read_schema(next(plain.glob("shard-*.parquet"))).metadata
    assert json.loads(meta[b"fusedata.candidates"]) == Manifest.read(spine / "fused").run["candidates"]
    assert meta[b"fusedata.plain.of"] == b"fused"


def test_imported_target_fuses_like_the_original(spine, exported, tmp_path):
    """A target that went through the plain layout still matches the aligned source made against
    the original, and fuses to the same distributions."""
    _, target = exported["topk/llama"]
    out = tmp_path / "fused"
    r = cli("fuse", "--target", str(target), "--aligned", str(spine / "aligned/gemma"), "--output", str(out),
            "--method", "mince", "--executor", "local", "--quiet")
    assert r.exit_code == 0, r.output
    want, got = decode_topk(pq.read_table(spine / "fused")), decode_topk(pq.read_table(out))
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
    assert pq.read_table(out).column("winner").to_pylist() == pq.read_table(spine / "fused").column("winner").to_pylist()


def test_export_is_skipped_when_done_and_refuses_bad_input(spine, exported, tmp_path):
    plain, _ = exported["topk/llama"]
    before = {p.name: p.stat().st_mtime_ns for p in plain.iterdir()}
    r = cli("export", str(spine / "topk/llama"), "--output", str(plain))
    assert r.exit_code == 0 and "already complete" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in plain.iterdir()} == before

    r = cli("export", str(plain), "--output", str(tmp_path / "again"))  # a plain dataset is no export source
    assert r.exit_code == 2 and "is a 'plain' dataset" in r.output
    assert not (tmp_path / "again").exists()
    r = cli("export", str(spine / "topk/llama"), "--output", str(tmp_path / "x"), "--layout", "nope")
    assert r.exit_code == 2


def test_import_refuses_inconsistent_lists_and_writes_nothing(exported, tiny_llama, tmp_path):
    plain, _ = exported["topk/llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    shard = sorted(plain.glob("shard-*.parquet"))[0]
    t = pq.read_table(shard)
    lp = t.column("topk_logprobs").to_pylist()
    lp[0][0] = lp[0][0][:-1]  # one position lists one log-prob fewer than ids
    t = t.set_column(t.schema.get_field_index("topk_logprobs"), "topk_logprobs",
                     pa.array(lp, t.schema.field("topk_logprobs").type))
    pq.write_table(t, broken / "part-0.parquet")
    r = cli("import", str(broken), "--output", str(tmp_path / "out"), "--model", str(tiny_llama), "--quiet")
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "part-0.parquet" in r.output and "'topk_logprobs' and 'topk_ids' differ" in r.output
    assert not list((tmp_path / "out").glob("shard-*.parquet")) and not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_import_foreign_plain_dataset(spine, exported, tiny_llama, tmp_path):
    """Plain topk rows written by another tool (no manifest, no `ce`, exact float log-probs): imported
    with --model into a topk dataset with that tokenizer's identity, top-k within the codec's grid."""
    plain, _ = exported["topk/llama"]
    foreign = tmp_path / "foreign" / "train"
    foreign.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, shard in enumerate(sorted(plain.glob("shard-*.parquet"))):
        t = pq.read_table(shard).drop_columns(["ce"])
        lp = t.column("topk_logprobs").to_pylist()
        lp = [[sorted((np.array(p) - rng.uniform(0, 0.03)).tolist(), reverse=True) for p in row] for row in lp]
        t = t.set_column(t.schema.get_field_index("topk_logprobs"), "topk_logprobs", pa.array(lp, pa.list_(pa.list_(pa.float32()))))
        pq.write_table(t.replace_schema_metadata(None), foreign / f"part-{i}.parquet")
    out = tmp_path / "imported"
    r = cli("import", str(tmp_path / "foreign"), "--output", str(out), "--model", str(tiny_llama), "--quiet")
    assert r.exit_code == 0, r.output
    m = open_dataset(out, "topk")
    src = Manifest.read(spine / "topk/llama")
    for key in ("tokenizer_hash", "vocab_size", "top_k", "max_length", "model_hash"):
        assert m.run[key] == src.run[key], key
    written = pq.read_table(tmp_path / "foreign")
    got = decode_topk(pq.read_table(out))
    ids = [p for row in written.column("topk_ids").to_pylist() for p in row]
    lps = [p for row in written.column("topk_logprobs").to_pylist() for p in row]
    params = m.run["codec"]["params"]
    for i in range(got.n_positions):
        n = len(ids[i])
        assert got.ids[i, :n].tolist() == ids[i] and np.all(got.ids[i, n:] == PAD_ID)
        assert np.all(np.abs(got.logprobs[i, :n] - np.array(lps[i], np.float32)) <= grid_error(params, np.array(lps[i])))
    # the window CE is recomputed from the gold log-probs
    gold = written.column("gold_logprob").to_pylist()
    np.testing.assert_allclose(pq.read_table(out).column("ce").to_numpy(), [-np.mean(g) for g in gold], rtol=1e-5)
    assert (out / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("layout", ["plain", "axolotl", "trl"])
def test_inspect_summarises_an_export(spine, exported, tmp_path, layout):
    from fusedata.dataset import run_digest
    from fusedata.report import plot, summarize

    src = open_dataset(spine / "fused")
    if layout == "plain":
        out = exported["fused"][0]
    else:
        out = tmp_path / layout
        assert cli("export", str(spine / "fused"), "--output", str(out), "--layout", layout, "--quiet").exit_code == 0
    r = cli("inspect", str(out), "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    positions = sum(len(x) - 1 for x in pq.read_table(spine / "fused").column("input_ids").to_pylist())
    assert (s["layout"], s["rows"], s["positions"], s["k"]) == (layout, src.rows, positions, 5)
    assert s["source"]["kind"] == "fused" and s["source"]["digest"] == run_digest(src.run)
    assert s["total_bytes"] == sum(p.stat().st_size for p in out.glob("*.parquet"))
    assert (s["topk_bytes"] > 0) == (layout != "trl")
    text = cli("inspect", str(out)).output
    assert f"{layout} export of a fused dataset" in text and s["source"]["digest"][:16] in text
    charts = {p.name for p in plot(out, tmp_path / f"plots-{layout}")}
    assert charts == ({"bytes_per_token.png", "entropy_ce.png"} if layout == "plain" else {"bytes_per_token.png"})
    assert summarize(out)["bytes_per_token"] == pytest.approx(s["total_bytes"] / positions)
