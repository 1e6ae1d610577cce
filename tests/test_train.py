"""The trainer: the sparse distillation loss against a dense reference, λ=1 is plain CLM, a short
real run lowers the loss, and an interrupted run resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusedata.errors import UsageError
from fusedata.extract import ExtractConfig
from fusedata.run_extract import ExtractJob, run_extract
from fusedata.run_fuse import FuseJob, run_fuse
from fusedata.train import STATE_NAME, TrainConfig, collate, compute_loss, sparse_distill_loss, train


def test_sparse_distill_loss_equals_dense_reference():
    torch.manual_seed(0)
    n, v, k = 6, 30, 4
    logits = torch.randn(n, v)
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(n)])  # [n, k]
    q = torch.rand(n, k)
    q = q / q.sum(1, keepdim=True) * torch.rand(n, 1) * 0.9  # listed mass < 1
    q[0, -1] = 0.0  # a padding entry
    tail = 1 - q.sum(1)
    got = sparse_distill_loss(torch.log_softmax(logits, -1).gather(1, ids), q, tail)
    # dense reference: the target as a distribution over [listed ids..., "everything else"], and the
    # model's dense probabilities summed into the same buckets
    p = torch.softmax(logits.double(), -1)  # [n, V]
    want = 0.0
    for r in range(n):
        listed = [int(i) for i, qq in zip(ids[r], q[r], strict=True) if qq > 0]
        target = [float(qq) for qq in q[r] if qq > 0] + [float(tail[r])]
        model = [float(p[r, i]) for i in listed] + [1 - float(p[r, listed].sum())]
        want += -sum(t * np.log(m) for t, m in zip(target, model, strict=True))
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def fused_dir(tiny_llama, corpus_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    config = ExtractConfig(model=str(tiny_llama), top_k=5, max_length=24)
    run_extract(ExtractJob([str(corpus_file)], str(root / "topk"), config, docs_per_shard=2, quiet=True,
                           log=lambda m: None))
    run_fuse(FuseJob(str(root / "topk"), [], str(root / "fused"), quiet=True, log=lambda m: None))
    return root / "fused"


def _cfg(data: Path, model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_tokens=64, seed=3, log_every=0)
    base.update(kw)
    return TrainConfig(data=str(data), model=str(model), output=str(out), **base)


def test_lambda_one_is_plain_clm(tiny_llama, fused_dir):
    from fusedata.models.spec import ModelRef, load_model
    from fusedata.train import shard_windows

    model = load_model(ModelRef("tiny", str(tiny_llama)))
    rows = shard_windows(str(fused_dir), "shard-00000.parquet", need_topk=True)[:2]
    batch = collate(rows, with_topk=True)
    loss, parts = compute_loss(model, batch, lam=1.0)
    labels = batch.input_ids.masked_fill(batch.attention == 0, -100)
    plain = model(input_ids=batch.input_ids, attention_mask=batch.attention, labels=labels).loss
    assert float(loss.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    assert "distill" not in parts
    mixed, parts = compute_loss(model, batch, lam=0.9)
    assert float(mixed.detach()) == pytest.approx(0.9 * parts["clm"] + 0.1 * parts["distill"], rel=1e-5)


def test_short_run_lowers_the_loss_and_writes_a_checkpoint(tiny_llama, fused_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = train(_cfg(fused_dir, tiny_llama, out, max_steps=30, warmup_steps=3), log=lambda m: None)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / STATE_NAME).read_text())["step"] == 30


def test_resume_continues_exactly(tiny_llama, fused_dir, tmp_path):
    whole = tmp_path / "whole"
    reference = train(_cfg(fused_dir, tiny_llama, whole), log=lambda m: None)

    class Stop(Exception):
        pass

    def stop_at_step_4(msg: str) -> None:
        if msg.startswith("step 4/"):
            raise Stop

    broken = tmp_path / "broken"
    cfg = _cfg(fused_dir, tiny_llama, broken, save_every=3, log_every=1)
    with pytest.raises(Stop):
        train(cfg, log=stop_at_step_4)
    assert json.loads((broken / STATE_NAME).read_text())["step"] == 3
    resumed = train(cfg, log=lambda m: None)
    assert resumed["history"] == reference["history"]
    a, b = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_refuses_foreign_output_and_another_runs_checkpoint(tiny_llama, fused_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a fusedata checkpoint"):
        train(_cfg(fused_dir, tiny_llama, foreign), log=lambda m: None)
    out = tmp_path / "ckpt"
    train(_cfg(fused_dir, tiny_llama, out, max_steps=1), log=lambda m: None)
    with pytest.raises(UsageError, match="different training run"):
        train(_cfg(fused_dir, tiny_llama, out, max_steps=1, lam=0.5), log=lambda m: None)
