"""ULD, ALM and byte-aligned chunks against plain reference computations on small tensors, and
both losses through the trainer on a fused dataset of the tiny models."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fusedata.chunks import TokenLikelihoods, window_chunks
from fusedata.losses import alm_loss, binary_kl, uld_loss
from fusedata.stages.fuse import FuseConfig, FuseJob, run_fuse
from fusedata.train import TrainConfig, collate, compute_loss, shard_windows, train

QUIET = {"quiet": True, "log": lambda m: None}


# -- ULD -----------------------------------------------------------------------------------------
def _uld_reference(logits: torch.Tensor, q: torch.Tensor, tail: torch.Tensor) -> float:
    """Per position: sort both probability vectors, keep the k largest, add the rest as one bucket,
    sum the absolute differences; plain Python over rows."""
    total = 0.0
    k = q.shape[1]
    for r in range(logits.shape[0]):
        p = sorted(torch.softmax(logits[r].double(), -1).tolist(), reverse=True)[:k]
        t = sorted(q[r].tolist(), reverse=True)
        total += sum(abs(a - b) for a, b in zip(p, t, strict=True)) + abs((1 - sum(p)) - float(tail[r]))
    return total


def test_uld_equals_plain_reference():
    torch.manual_seed(0)
    n, v, k = 7, 40, 5
    logits = torch.randn(n, v) * 2
    q = torch.rand(n, k)
    q = q / q.sum(1, keepdim=True) * (0.5 + 0.5 * torch.rand(n, 1))  # listed mass < 1, any order
    q[1, -2:] = 0.0  # padding entries
    tail = 1 - q.sum(1)
    got = uld_loss(torch.log_softmax(logits, -1), q, tail)
    assert float(got) == pytest.approx(_uld_reference(logits, q, tail), rel=1e-5)


def test_uld_ignores_ids_and_is_zero_on_the_students_own_sorted_distribution():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    logp = torch.log_softmax(logits, -1)
    top = torch.exp(logp).topk(6, -1).values  # [4, 6]
    shuffled = top[:, torch.randperm(6)]  # the order (and so the ids) the teacher lists them in
    assert float(uld_loss(logp, shuffled, 1 - top.sum(1))) == pytest.approx(0.0, abs=1e-6)
    assert float(uld_loss(logp, torch.roll(top, 1, 0), 1 - torch.roll(top, 1, 0).sum(1))) > 0.01


# -- ALM -----------------------------------------------------------------------------------------
def test_binary_kl_equals_plain_formula():
    teacher = torch.tensor([-0.1, -2.0, -7.0, -0.5, -30.0])
    student = torch.tensor([-0.3, -1.0, -7.0, -4.0, -0.01])
    for tau in (1.0, 3.0):
        got = binary_kl(teacher, student, tau)
        for t, s, g in zip(teacher.tolist(), student.tolist(), got.tolist(), strict=True):
            pt, ps = math.exp(t / tau), math.exp(s / tau)
            want = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
            assert g == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert float(binary_kl(teacher, teacher).abs().max()) < 1e-6  # 0 at a match
    assert bool((binary_kl(teacher, student) >= -1e-7).all())


def test_alm_loss_equals_plain_reference():
    torch.manual_seed(2)
    token_ll = -torch.rand(12) * 3
    chunk_of = torch.tensor([0, 0, 1, -1, 2, 2, 2, 3, -1, 4, 4, 5])
    teacher = -torch.rand(6) * 4
    got = alm_loss(token_ll, chunk_of, teacher, temperature=2.0)
    want = 0.0
    for c in range(6):
        s = sum(float(token_ll[i]) for i in range(12) if int(chunk_of[i]) == c)
        pt, ps = math.exp(float(teacher[c]) / 2), math.exp(s / 2)
        want += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    assert float(got) == pytest.approx(want, rel=1e-4)


# -- chunks --------------------------------------------------------------------------------------
def _spans(cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(cuts[:-1]), np.array(cuts[1:])


def _chunks_reference(ts, te, src_s, src_e, src_lp):
    """Walk the target's predicted tokens; close a chunk when a source token ends where the
    target token does; keep it if contiguous target tokens and the source's tokens inside tile it."""
    out = []
    first = 0
    for p in range(len(ts) - 1):
        if te[p + 1] not in set(src_e.tolist()):
            continue
        a, b = ts[first + 1], te[p + 1]
        target_ok = all(ts[j + 1] == te[j] for j in range(first + 1, p + 1)) and b > a
        inside = sorted((s, e, lp) for s, e, lp in zip(src_s, src_e, src_lp, strict=True) if s >= a and e <= b)
        source_ok = bool(inside) and inside[0][0] == a and inside[-1][1] == b and all(
            inside[i + 1][0] == inside[i][1] for i in range(len(inside) - 1))
        if target_ok and source_ok:
            out.append((first, p + 1, sum(lp for _, _, lp in inside)))
        first = p + 1
    return out


@pytest.mark.parametrize("seed", range(30))
def test_window_chunks_equal_plain_reference(seed):
    rng = random.Random(seed)
    length = rng.randint(5, 60)
    target_cuts = sorted({0, length, *rng.sample(range(1, length), rng.randint(1, length - 1))})
    source_cuts = sorted({0, length, *rng.sample(range(1, length), rng.randint(1, length - 1))})
    ts, te = _spans(target_cuts)
    if rng.random() < 0.3 and len(ts) > 3:  # a target gap (e.g. an empty-span special token between)
        j = rng.randrange(2, len(ts))
        ts[j] = te[j - 1] + (1 if te[j - 1] + 1 < te[j] else 0)
    ss, se = _spans(source_cuts)
    lp = -np.array([rng.random() * 3 for _ in ss])
    keep = np.ones(len(ss), bool)
    keep[0] = False  # the document's first source token is never predicted
    if rng.random() < 0.5 and len(ss) > 2:
        keep[rng.randrange(1, len(ss))] = False  # a source token without a gold log-prob
    start = rng.randrange(0, max(1, len(ts) - 2))  # a window starting anywhere in the document
    wts, wte = ts[start:], te[start:]
    src = TokenLikelihoods(ss[keep], se[keep], lp[keep])
    got = list(zip(*window_chunks(wts, wte, src), strict=True))
    want = _chunks_reference(wts, wte, ss[keep], se[keep], lp[keep])
    assert [(int(a), int(b)) for a, b, _ in got] == [(a, b) for a, b, _ in want]
    assert np.allclose([c for _, _, c in got], [c for _, _, c in want], atol=1e-5)


def test_same_tokenisation_gives_one_token_chunks():
    ts, te = np.array([0, 3, 5, 9]), np.array([3, 5, 9, 12])
    src = TokenLikelihoods(ts[1:], te[1:], np.array([-1.0, -2.0, -0.5]))
    starts, ends, ll = window_chunks(ts, te, src)
    assert starts.tolist() == [0, 1, 2] and ends.tolist() == [1, 2, 3]
    assert ll.tolist() == [-1.0, -2.0, -0.5]


# -- through fuse and the trainer ----------------------------------------------------------------
@pytest.fixture(scope="module")
def alm_data(spine, tmp_path_factory) -> dict[str, Path]:
    """The spine's target fused with itself as the ALM source (every chunk is one token) and
    with the Gemma-architecture source (a different tokenizer)."""
    root = tmp_path_factory.mktemp("alm")
    out = {}
    for name, source in (("self", spine / "topk/llama"), ("gemma", spine / "topk/gemma")):
        out[name] = root / f"fused-{name}"
        run_fuse(FuseJob(str(spine / "topk/llama"), [str(spine / "aligned/gemma")], str(out[name]),
                         FuseConfig(method="mince", alm_source=str(source)), **QUIET))
    return out


def test_fuse_alm_chunks_against_itself_are_its_own_gold_log_probs(spine, alm_data):
    from fusedata.codec import decode_topk

    for shard in sorted((spine / "topk/llama").glob("shard-*.parquet")):
        target = pq.read_table(shard)
        gold = decode_topk(target).gold_logprob
        off = np.concatenate([[0], np.cumsum([len(x) - 1 for x in target.column("input_ids").to_pylist()])])
        fused = pq.read_table(alm_data["self"] / shard.name)
        for w, (s, e, ll) in enumerate(zip(*(fused.column(c).to_pylist()
                                             for c in ("chunk_start", "chunk_end", "chunk_teacher_ll")), strict=True)):
            assert all(b - a == 1 for a, b in zip(s, e, strict=True))
            assert np.allclose(ll, gold[off[w] + np.array(s, dtype=int)], atol=1e-6)
    from schemas.manifest import Manifest

    stats = Manifest.read(str(alm_data["gemma"])).stats["alm"]
    assert stats["chunks"] > 0 and 0.3 < stats["positions_in_chunks"] <= 1.0
    assert Manifest.read(str(alm_data["self"])).stats["alm"]["tokens_per_chunk"] == 1.0


def test_compute_loss_uld_and_alm_match_reference(tiny_llama, alm_data):
    from fusedata.models.spec import ModelRef, load_model

    model = load_model(ModelRef("tiny", str(tiny_llama)))
    rows = shard_windows(str(alm_data["gemma"]), "shard-00000.parquet", need_topk=True, need_chunks=True)[:3]
    batch = collate(rows, with_topk=True, with_chunks=True)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention).logits[:, :-1].double()
    logp = torch.log_softmax(logits, -1)  # [B, T-1, V]
    clm_sum = uld_sum = 0.0
    n = 0
    alm_terms = []
    for b, r in enumerate(rows):
        m = len(r["labels"])
        gold = [float(logp[b, p, r["labels"][p]]) for p in range(m)]
        clm_sum -= sum(gold)
        n += m
        q = torch.from_numpy(np.exp(r["topk_lp"].astype(np.float64)))
        uld_sum += _uld_reference(logits[b, :m], q, torch.from_numpy(r["tail"].astype(np.float64)))
        for s, e, ll in zip(*r["chunks"], strict=True):
            pt, ps = math.exp(ll), math.exp(sum(gold[s:e]))
            alm_terms.append(pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))
    assert alm_terms
    lam = 0.7
    loss, parts = compute_loss(model, batch, lam, "uld")
    assert parts["clm"] == pytest.approx(clm_sum / n, rel=1e-5)
    assert parts["distill"] == pytest.approx(uld_sum / n, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(lam * parts["clm"] + (1 - lam) * parts["distill"], rel=1e-5)
    _, parts = compute_loss(model, batch, lam, "alm")
    assert parts["distill"] == pytest.approx(sum(alm_terms) / len(alm_terms), rel=1e-3)


@pytest.mark.parametrize("loss", ["uld", "alm"])
def test_train_with_uld_and_alm(tiny_llama, alm_data, tmp_path, loss):
    cfg = TrainConfig(data=str(alm_data["gemma"]), model=str(tiny_llama), output=str(tmp_path / "ckpt"), lam=0.5,
                      lr=3e-3, warmup_steps=1, max_steps=3, batch_tokens=64, log_every=0, loss=loss)
    result = train(cfg, log=lambda m: None)
    assert result["steps"] == 3 and all(math.isfinite(h["distill"]) and h["distill"] > 0 for h in result["history"])


def test_alm_needs_chunk_columns(tiny_llama, spine, tmp_path):
    from fusedata.errors import OptionError, UsageError

    cfg = TrainConfig(data=str(spine / "fused"), model=str(tiny_llama), output=str(tmp_path / "c"), lam=0.5,
                      max_steps=1, batch_tokens=64, log_every=0, loss="alm")
    with pytest.raises(UsageError, match="--alm-source"):
        train(cfg, log=lambda m: None)
    with pytest.raises(OptionError, match="loss"):
        TrainConfig(data="d", model="m", output="o", loss="kl")
    with pytest.raises(OptionError, match="alm_temperature"):
        TrainConfig(data="d", model="m", output="o", alm_temperature=0.0)
