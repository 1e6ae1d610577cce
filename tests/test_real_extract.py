"""Extraction with the real bundled models against a plain transformers forward pass.

Slow (model conversion is cached under FUSEDATA_CACHE, ~30 s the first time): `pytest -m real`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fusedata.codec import codec_from_schema
from fusedata.models.cache import BUNDLED, PPL_TEXT_FILE, cache_root
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from schemas.manifest import Manifest

pytestmark = pytest.mark.real

LOCAL_CACHE = Path("/tmp/fdcache")
K = 10
MAX_LENGTH = 128


@pytest.fixture(autouse=True)
def model_cache(monkeypatch):
    if LOCAL_CACHE.is_dir():
        monkeypatch.setenv("FUSEDATA_CACHE", str(LOCAL_CACHE))


def _available(name: str) -> bool:
    """Installed package, or an already converted copy in the cache."""
    return importlib.util.find_spec(BUNDLED[name].package) is not None or (
        cache_root() / name / "fusedata_check.json"
    ).is_file()


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m",
        # Gemma's 262k vocabulary makes it slower; run it only where its conversion is cached
        pytest.param("gemma3-270m", marks=pytest.mark.skipif(
            not (LOCAL_CACHE / "models" / "gemma3-270m" / "fusedata_check.json").is_file(),
            reason="gemma3-270m conversion not cached")),
    ],
)
def test_real_model_matches_plain_forward(name, tmp_path):
    if not _available(name):
        pytest.skip(f"the package shipping {name} is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = PPL_TEXT_FILE.read_text(encoding="utf-8")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "ppl", "text": text}) + "\n", encoding="utf-8")
    out = tmp_path / "topk"
    # lossless codec: the stored values are compared to 1e-4 (the default codec's bound is tested below)
    config = ExtractConfig(model=name, top_k=K, max_length=MAX_LENGTH, batch_tokens=512, codec="raw")
    manifest = run_extract(ExtractJob([str(corpus)], str(out), config, quiet=True, log=lambda m: None))

    # the conversion was checked against the recorded perplexity
    folder = cache_root() / name
    marker = json.loads((folder / "fusedata_check.json").read_text())
    expected = BUNDLED[name].expected_ppl
    assert marker["model"] == name
    assert math.isfinite(marker["perplexity"])
    assert abs(marker["perplexity"] - expected) / expected <= 0.05, marker
    assert manifest.run["model_path"] == str(folder.resolve())

    table = pa.concat_tables([pq.read_table(out / s.name) for s in manifest.shards])
    rows = table.to_pylist()
    assert len(rows) >= 3  # several windows
    topk = codec_from_schema(table.schema).decode(table, K)
    windows = [topk.window(i) for i in range(len(rows))]

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    full = tok(text)["input_ids"]
    bos = tok.bos_token_id if full[0] == tok.bos_token_id else None
    rebuilt: list[int] = []
    for w, (row, got) in enumerate(zip(rows, windows, strict=True)):
        ids = row["input_ids"]
        assert row["window"] == w and len(ids) <= MAX_LENGTH
        if bos is not None:
            assert ids[0] == bos  # re-prepended on every window
        else:
            assert w == 0 or ids[0] == rebuilt[-1]  # consecutive windows share one token
        rebuilt += ids if w == 0 else ids[1:]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]  # [n-1, V]
        lp = torch.log_softmax(logits.double(), dim=-1)
        want_vals, want_ids = lp.topk(K, dim=-1)
        np.testing.assert_array_equal(got.ids, want_ids.numpy())
        np.testing.assert_allclose(got.logprobs, want_vals.numpy(), atol=1e-4, rtol=0)
        gold = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(got.gold_logprob, gold, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.tail_mass, 1.0 - np.exp(want_vals.numpy()).sum(axis=1), atol=1e-4)
        assert row["ce"] == pytest.approx(float(-gold.mean()), abs=1e-4)
    assert rebuilt == full  # the windows cover the whole text
    # a real model on real prose: a sane cross-entropy, well under the uniform log(V)
    mean_ce = manifest.stats["mean_ce"]
    assert 1.0 < mean_ce < 0.5 * math.log(manifest.run["vocab_size"])
    assert manifest == Manifest.read(out)
