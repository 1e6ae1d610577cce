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
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from fusedata.stages.fuse import FuseJob, run_fuse
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


def test_warmup_ratio_is_a_share_of_the_run():
    from fusedata.train import lr_at

    cfg = TrainConfig(data="d", model="m", output="o", lr=1.0, warmup_steps=50, warmup_ratio=0.1, min_lr_ratio=0.0)
    assert cfg.warmup(200) == 20 and cfg.warmup(3) == 1
    assert lr_at(0, cfg, 200) == pytest.approx(1 / 20)
    assert lr_at(19, cfg, 200) == pytest.approx(1.0)  # peak at the end of the warm-up, not at step 50
    assert lr_at(20, cfg, 200) == pytest.approx(1.0)
    assert lr_at(199, cfg, 200) == pytest.approx(0.5 * (1 + np.cos(np.pi * 179 / 180)))
    steps_only = TrainConfig(data="d", model="m", output="o", warmup_steps=7)
    assert steps_only.warmup(200) == 7


@pytest.mark.parametrize(("field", "value", "message"), [
    ("warmup_ratio", 1.0, "warmup_ratio: must be in"), ("warmup_ratio", -0.1, "warmup_ratio: must be in"),
    ("lam", 1.5, "lam: must be between 0 and 1"), ("lr", -1e-3, "lr: must be >= 0"),
    ("min_lr_ratio", 2.0, "min_lr_ratio: must be between"), ("grad_accum", 0, "grad_accum: must be >= 1"),
])
def test_config_refuses_bad_values_by_name(field, value, message):
    from fusedata.errors import OptionError

    with pytest.raises(OptionError, match=message) as err:
        TrainConfig(data="d", model="m", output="o", **{field: value})
    assert err.value.named("--").startswith("--" + field.replace("_", "-") + ":")
    assert err.value.named("train.").startswith(f"train.{field}:")


def test_warns_when_the_warm_up_outlasts_the_run(tiny_llama, fused_dir, tmp_path):
    said: list[str] = []
    train(_cfg(fused_dir, tiny_llama, tmp_path / "a", max_steps=3, warmup_steps=10), log=said.append)
    assert any("warm-up (10 steps) is not shorter than the run (3 steps)" in m for m in said)
    said.clear()
    train(_cfg(fused_dir, tiny_llama, tmp_path / "b", max_steps=3, warmup_ratio=0.3), log=said.append)
    assert not any("warm-up" in m for m in said)


def _student_config(path: Path) -> Path:
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "tie_word_embeddings": True, "max_position_embeddings": 64}))
    return path


def test_student_from_config_is_seeded_and_trains(tiny_llama, fused_dir, tmp_path):
    from transformers import AutoConfig

    conf = _student_config(tmp_path / "student.json")
    seen: dict[str, dict[int, float]] = {}

    def first_weights(name):
        def hook(step, tokens, model):
            seen.setdefault(name, {})[step] = float(model.get_input_embeddings().weight.detach().abs().sum())
        return hook

    a = train(_cfg(fused_dir, tiny_llama, tmp_path / "a", init_config=str(conf), max_steps=20, lr=1e-2),
              log=lambda m: None, on_step=first_weights("a"))
    train(_cfg(fused_dir, tiny_llama, tmp_path / "b", init_config=str(conf), max_steps=2, lam=0.5, lr=1e-2),
          log=lambda m: None, on_step=first_weights("b"))
    train(_cfg(fused_dir, tiny_llama, tmp_path / "c", init_config=str(conf), max_steps=2, seed=4, lr=1e-2),
          log=lambda m: None, on_step=first_weights("c"))
    assert seen["a"][0] == seen["b"][0]  # two arms of one seed start from the very same student
    assert seen["a"][0] != seen["c"][0]  # another seed draws another student
    assert sorted(seen["a"]) == list(range(21))  # the hook ran before the first step and after each
    saved = AutoConfig.from_pretrained(tmp_path / "a")
    tiny = AutoConfig.from_pretrained(tiny_llama)
    assert (saved.hidden_size, saved.num_hidden_layers, saved.vocab_size) == (16, 1, tiny.vocab_size)
    losses = [h["loss"] for h in a["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_bad_student_config_is_refused(tiny_llama, fused_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 16}')
    with pytest.raises(UsageError, match="model_type"):
        train(_cfg(fused_dir, tiny_llama, tmp_path / "x", init_config=str(bad)), log=lambda m: None)


def test_heldout_text_scores_like_heldout(tiny_model, corpus_file):
    """The in-process learning-curve evaluator gives eval's own figures (same windows, same bytes)."""
    from fusedata.corpus import read_corpus
    from fusedata.evaluate import HeldOutText, heldout
    from fusedata.models.spec import ModelRef, load_model, load_tokenizer

    ref = ModelRef("tiny", str(tiny_model))
    docs, _ = read_corpus([str(corpus_file)])
    text = HeldOutText.from_texts(load_tokenizer(ref), docs.column("text").to_pylist(), max_length=24)
    model = load_model(ref).train()
    got = text.score(model, batch_tokens=64)
    want = heldout(str(tiny_model), [str(corpus_file)], max_length=24)
    assert model.training  # put back in the mode it was in
    assert (got["tokens"], got["bytes"]) == (want["tokens"], want["bytes"])
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-4)
