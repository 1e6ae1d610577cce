"""The vLLM extract backend (fusedata/vllm_backend.py + fusedata/vllm_worker.py).

The real tests run vLLM on CPU in its own environment (`make vllm`, or FUSEDATA_VLLM_PYTHON)
on the bundled SmolLM2 and Gemma-3 weights: `pytest -m vllm` (~4 minutes on 2 cores, most of
it the engines' start). The protocol and the parsing of vLLM's prompt log-probs are tested
without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fusedata.codec import codec_from_schema
from fusedata.errors import UsageError
from fusedata.models.cache import BUNDLED, PPL_TEXT_FILE, cache_root
from fusedata.stages.extract import ExtractConfig, ExtractJob, ExtractStage, run_extract
from fusedata.vllm_backend import available_cores, core_warning, engine_env, parse_cores, vllm_python
from fusedata.vllm_worker import PhaseTimers, positions, read_timers
from schemas.manifest import Manifest

LOCAL_CACHE = Path("/tmp/fdcache")
MODEL = "smollm2-135m"
K = 10
MAX_LENGTH = 256


# -- without vLLM --------------------------------------------------------------------------
@dataclass
class _Logprob:
    logprob: float
    rank: int | None


@dataclass
class _Flat:
    """The layout of vllm.logprobs.FlatLogprobs."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)

    def append(self, d: dict[int, _Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for t, lp in (d or {}).items():
            self.token_ids.append(t)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)


def _fake_prompt_logprobs(ids: np.ndarray, k: int, vocab: int, seed: int = 0):
    """vLLM's prompt_logprobs of a random model: per position the actual token first (with its
    rank), then ranks 1..k; plus the exact answer."""
    rng = np.random.default_rng(seed)
    entries: list[list[tuple[int, _Logprob]] | None] = [None]
    want_ids, want_lp, want_gold = [], [], []
    for t in range(1, len(ids)):
        logits = rng.normal(size=vocab)
        lp = logits - np.log(np.exp(logits).sum())
        order = np.argsort(-lp, kind="stable")
        rank_of = np.empty(vocab, np.int64)
        rank_of[order] = np.arange(1, vocab + 1)
        actual = int(ids[t])
        row = [(actual, _Logprob(float(lp[actual]), int(rank_of[actual])))]
        row += [(int(order[r]), _Logprob(float(lp[order[r]]), r + 1)) for r in range(k)]
        entries.append(row)
        want_ids.append(order[:k])
        want_lp.append(lp[order[:k]])
        want_gold.append(lp[actual])
    return entries, np.array(want_ids), np.array(want_lp), np.array(want_gold)


@pytest.mark.parametrize("layout", ["flat", "dict"])
def test_worker_parses_prompt_logprobs(layout):
    vocab, k = 50, 5
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, size=40).astype(np.int32)
    ids[5] = ids[6] = 7  # some repeats
    entries, want_ids, want_lp, want_gold = _fake_prompt_logprobs(ids, k, vocab)
    if layout == "flat":
        pl = _Flat()  # flat keeps both entries of an actual token that is also in the top k
        for e in entries:
            pl.start_indices.append(len(pl.logprobs))
            for t, lp in e or []:
                pl.token_ids.append(t)
                pl.logprobs.append(lp.logprob)
                pl.ranks.append(lp.rank)
            pl.end_indices.append(len(pl.logprobs))
    else:
        pl = [None if e is None else dict(e) for e in entries]  # a dict keeps one entry per token
    got_ids, got_lp, got_gold = positions(pl, ids, k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-6)
    np.testing.assert_allclose(got_gold, want_gold, atol=1e-6)
    assert got_ids.dtype == np.int32 and got_lp.dtype == np.float32 and got_gold.shape == (len(ids) - 1,)


def test_worker_parses_an_irregular_flat_layout():
    """Positions with extra entries (the general path) give the same answer as the fast path."""
    vocab, k = 30, 3
    ids = np.array([1, 2, 3, 4, 5, 6], np.int32)
    entries, want_ids, want_lp, want_gold = _fake_prompt_logprobs(ids, k, vocab, seed=3)
    pl = _Flat()
    for i, e in enumerate(entries):
        row = dict(e) if e is not None else None
        if row is not None and i == 2:
            row = {**row, 29: _Logprob(-50.0, vocab)}  # an extra low-ranked entry
        pl.append(row)
    got_ids, got_lp, got_gold = positions(pl, ids, k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-6)
    np.testing.assert_allclose(got_gold, want_gold, atol=1e-6)


def test_missing_vllm_environment_says_make_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEDATA_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(UsageError, match="make vllm"):
        vllm_python()


def test_core_specs_parse_and_refuse():
    assert parse_cores("") == available_cores()
    first = available_cores()[0]
    assert parse_cores(f"{first}") == [first]
    assert parse_cores(f"{first}-{first},{first}") == [first]
    for bad in ("a", "3-1", "-1", "0,,1"):
        with pytest.raises(UsageError, match="--vllm-threads"):
            parse_cores(bad)
    with pytest.raises(UsageError, match="not available"):
        parse_cores("100000")


def test_engine_env_sets_threads_whatever_the_caller_inherited():
    caller = {"OMP_NUM_THREADS": "1", "GOMP_CPU_AFFINITY": "0", "VLLM_CPU_KVCACHE_SPACE": "40",
              "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "auto", "PYTHONPATH": "/x", "HOME": "/root"}
    env = engine_env(caller, [0, 1, 2])
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["HOME"] == "/root"
    assert not {"GOMP_CPU_AFFINITY", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "PYTHONPATH"} & set(env)
    mp = engine_env(caller, [0, 1, 2], multiprocess=True)  # vLLM's own layout: it pins one thread per core
    assert mp["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2" and "OMP_NUM_THREADS" not in mp
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env and "VLLM_ENABLE_V1_MULTIPROCESSING" not in mp
    assert "one core" in core_warning([1]) and core_warning([0, 1]) is None


def test_phase_timers_add_up_calls_across_processes(tmp_path):
    class Step:
        def run(self, n):
            return sum(range(n))

    timers = PhaseTimers(str(tmp_path))
    Step.run = timers.wrap("prompt_logprobs", Step.run)
    assert Step().run(10) == 45 and Step().run(5) == 10
    (tmp_path / "999999.json").write_text(json.dumps(  # another process's timers
        {"seconds": {"prompt_logprobs": 2.0, "schedule": 0.5}, "calls": {"prompt_logprobs": 1, "schedule": 3},
         "facts": {"pid": 999999}, "cpu_s": 1.5}))
    got = read_timers(str(tmp_path))
    assert got["calls"] == {"prompt_logprobs": 3, "schedule": 3}
    assert 2.0 < got["seconds"]["prompt_logprobs"] < 3.0 and got["seconds"]["schedule"] == 0.5
    assert sorted(f["pid"] for f in got["facts"]) == sorted([999999, timers.facts["pid"]])


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(UsageError, match="backend"):
        ExtractStage(ExtractConfig(model="anything", backend="onnx")).prepare()


# -- with vLLM -----------------------------------------------------------------------------
def _vllm_missing() -> str | None:
    try:
        python = vllm_python()
    except UsageError as e:
        return str(e)
    probe = subprocess.run([str(python), "-I", "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('vllm') is None)"], capture_output=True)
    return None if probe.returncode == 0 else f"{python} cannot import vllm"


@pytest.fixture(scope="module")
def model_cache():
    with pytest.MonkeyPatch.context() as mp:
        if LOCAL_CACHE.is_dir():
            mp.setenv("FUSEDATA_CACHE", str(LOCAL_CACHE))
        _need_model(MODEL)
        yield


def _need_model(name: str) -> None:
    if importlib.util.find_spec(BUNDLED[name].package) is None and not (
        cache_root() / name / "fusedata_check.json"
    ).is_file():
        pytest.skip(f"the package shipping {name} is not installed")


@pytest.mark.vllm
@pytest.mark.real
def test_vllm_backend_matches_hf_on_real_text(model_cache, tmp_path):
    reason = _vllm_missing()
    if reason:
        pytest.skip(f"no vLLM environment: {reason}")
    from fusedata.demo_corpus import build_demo_corpus

    demo = tmp_path / "demo.jsonl"
    build_demo_corpus(demo, per_domain=4, max_chars=1500)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        json.dumps({"id": "ppl", "text": PPL_TEXT_FILE.read_text(encoding="utf-8")}) + "\n"
        + demo.read_text(encoding="utf-8"), encoding="utf-8")

    hf_out = tmp_path / "hf"
    config = ExtractConfig(model=MODEL, top_k=K, max_length=MAX_LENGTH, batch_tokens=2048, codec="raw")
    run_extract(ExtractJob([str(corpus)], str(hf_out), config, quiet=True, log=lambda m: None))

    # the vLLM run goes through the CLI: the options reach the stage. An engine step of 192 tokens,
    # fewer than a window holds, makes vLLM split prompts across steps (chunked prefill): their
    # prompt log-probs must come out whole and in order
    from cli.main import main

    vllm_out = tmp_path / "vllm"
    result = CliRunner().invoke(main, [
        "extract", "--model", MODEL, "--input", str(corpus), "--output", str(vllm_out), "--top-k", str(K),
        "--max-length", str(MAX_LENGTH), "--batch-tokens", "2048", "--codec", "raw", "--executor", "local",
        "--backend", "vllm", "--vllm-kv-cache-gb", "0.5", "--vllm-batch-tokens", "192", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    hf_m, vl_m = Manifest.read(hf_out), Manifest.read(vllm_out)
    assert "backend" not in hf_m.run and vl_m.run["backend"] == "vllm"
    assert {k: v for k, v in vl_m.run.items() if k != "backend"} == hf_m.run
    assert vl_m.rows == hf_m.rows and vl_m.tokens == hf_m.tokens

    def load(out: Path, m: Manifest):
        table = pa.concat_tables([pq.read_table(out / s.name) for s in m.shards])
        return table, codec_from_schema(table.schema).decode(table, K)

    hf_t, hf = load(hf_out, hf_m)
    vl_t, vl = load(vllm_out, vl_m)
    assert hf_t.column("input_ids").to_pylist() == vl_t.column("input_ids").to_pylist()
    assert hf_t.column("doc_id").to_pylist() == vl_t.column("doc_id").to_pylist()
    assert hf.n_positions == vl.n_positions > 2500
    same_ids = _assert_backends_agree(MODEL, hf_t, hf, vl_t, vl)
    # where the ids agree the values are close everywhere, and the tail mass follows
    np.testing.assert_allclose(vl.logprobs[same_ids], hf.logprobs[same_ids], atol=5e-3)
    np.testing.assert_allclose(vl.tail_mass, 1.0 - np.exp(vl.logprobs.astype(np.float64)).sum(axis=1), atol=1e-5)


def _assert_backends_agree(model: str, hf_t: pa.Table, hf, vl_t: pa.Table, vl) -> np.ndarray:
    """≥ 99.9 % of positions have the same top-k ids with log-probs and gold within 1e-3, and the
    windows' CE agree; returns where the ids agree."""
    same_ids = (hf.ids == vl.ids).all(axis=1)
    close = (np.abs(hf.logprobs - vl.logprobs) <= 1e-3).all(axis=1) & (np.abs(hf.gold_logprob - vl.gold_logprob) <= 1e-3)
    agree = same_ids & close
    print(f"{model} vLLM vs HF: {agree.mean():.4%} of {len(agree)} positions agree; max |Δ log-prob| where ids "
          f"agree {np.abs(hf.logprobs - vl.logprobs)[same_ids].max():.2e}, "
          f"max |Δ gold| {np.abs(hf.gold_logprob - vl.gold_logprob).max():.2e}")
    assert agree.mean() >= 0.999, f"{(~agree).sum()} of {len(agree)} positions differ"
    np.testing.assert_allclose(vl_t.column("ce").to_numpy(), hf_t.column("ce").to_numpy(), atol=1e-3)
    return same_ids


@pytest.mark.vllm
@pytest.mark.real
def test_vllm_backend_matches_hf_on_gemma3(model_cache, tmp_path):
    """A second architecture and tokenizer: Gemma-3 (262k vocabulary, tied head) through both
    backends' stages on real text."""
    reason = _vllm_missing()
    if reason:
        pytest.skip(f"no vLLM environment: {reason}")
    _need_model("gemma3-270m")
    from fusedata.corpus import read_corpus
    from fusedata.demo_corpus import build_demo_corpus

    build_demo_corpus(tmp_path / "demo.jsonl", per_domain=2, max_chars=1500)
    docs, _ = read_corpus([str(tmp_path / "demo.jsonl")])
    got = {}
    for backend in ("hf", "vllm"):
        stage = ExtractStage(ExtractConfig(model="gemma3-270m", top_k=K, max_length=MAX_LENGTH, batch_tokens=1024,
                                           codec="raw", backend=backend, vllm_kv_cache_gb=0.5))
        try:
            table = stage(docs)
        finally:
            stage.teardown()
        got[backend] = (table, codec_from_schema(table.schema).decode(table, K))
    (hf_t, hf), (vl_t, vl) = got["hf"], got["vllm"]
    assert hf_t.column("input_ids").to_pylist() == vl_t.column("input_ids").to_pylist()
    assert hf.n_positions == vl.n_positions > 1000
    _assert_backends_agree("gemma3-270m", hf_t, hf, vl_t, vl)


@pytest.mark.vllm
@pytest.mark.real
def test_explore_generation_on_vllm_matches_transformers(model_cache):
    """fusedata explore's vLLM backend: greedy text is the transformers text, and the judge's
    label probabilities agree (both fp32)."""
    reason = _vllm_missing()
    if reason:
        pytest.skip(f"no vLLM environment: {reason}")
    from fusedata.explore.prompts import judge_prompt, names_prompt
    from fusedata.explore.textmodel import TextModel, VllmTextModel

    questions = ["What is the capital of France?", "Why is the sky blue?", "How many legs does a spider have?"]
    judged = [judge_prompt(questions[0], ["Paris", "London", "I do not know"]),
              judge_prompt(questions[1], ["Because of Rayleigh scattering", "It is not"])]
    hf, vl = TextModel(MODEL, threads=1), VllmTextModel(MODEL, threads=1)
    try:
        assert vl.answer(questions, 24) == hf.answer(questions, 24)
        names = [names_prompt([], ["Science"]), names_prompt(["Science"], [])]
        assert vl.generate(names, 24, one_line=True) == hf.generate(names, 24, one_line=True)
        sampled = vl.generate(names, 16, temperature=1.0, seed=5, one_line=True)
        assert sampled == vl.generate(names, 16, temperature=1.0, seed=5, one_line=True)  # seeded
        np.testing.assert_allclose(np.concatenate(vl.label_scores(judged, [3, 2])),
                                   np.concatenate(hf.label_scores(judged, [3, 2])), atol=1e-4)
    finally:
        vl.close()
