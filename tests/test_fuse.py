"""Fusion math: hand-computed cases for MinCE/AvgCE by window and by token, and the vectorised
mixture against a plain per-position dictionary reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusedata.fuse import AVGCE_TEMPERATURE, fuse, token_metric_ce
from fusedata.stages.fuse import FuseConfig
from fusedata.topk import PAD_ID, TopK, label_logprob, merge_sparse


def topk(ids, probs, lengths, tail=None):
    ids = np.asarray(ids, dtype=np.int32)
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lps = np.where(ids == PAD_ID, -np.inf, np.log(np.where(probs > 0, probs, 1))).astype(np.float32)
    tail = 1 - probs.sum(1) if tail is None else np.asarray(tail)
    n = ids.shape[0]
    return TopK(ids, lps, np.zeros(n, np.float32), tail.astype(np.float32), np.asarray(lengths, np.int64))


def test_merge_sparse_adds_duplicates_and_breaks_ties_by_id():
    rows = np.array([0, 0, 0, 1])
    ids = np.array([5, 3, 5, 2])
    probs = np.array([0.25, 0.375, 0.125, 0.5])  # exact binary fractions: 5 and 3 tie at 0.375
    out_ids, out_p = merge_sparse(rows, ids, probs, n_rows=2, k_out=2)
    assert out_ids.tolist() == [[3, 5], [2, PAD_ID]]
    np.testing.assert_allclose(out_p, [[0.375, 0.375], [0.5, 0.0]])


def test_label_logprob_inside_and_outside_topk():
    t = topk([[1, 2], [1, 2]], [[0.5, 0.3], [0.5, 0.3]], [2])
    lp = label_logprob(t, np.array([2, 7]), vocab_size=10)
    assert lp[0] == pytest.approx(math.log(0.3), abs=1e-6)
    assert lp[1] == pytest.approx(math.log(0.2 / 8), abs=1e-6)  # tail 0.2 over the 8 unlisted ids


def test_mince_window_takes_lowest_ce_candidate():
    tgt = topk([[1, 2], [3, 4]], [[0.6, 0.3], [0.5, 0.4]], [2])
    src = topk([[2, 1], [4, 5]], [[0.7, 0.2], [0.8, 0.1]], [2])
    res = fuse([tgt, src], np.array([2, 4]), np.array([[1.0, 0.5]]), vocab_size=10, method="mince")
    assert res.topk.ids.tolist() == [[2, 1], [4, 5]]
    np.testing.assert_allclose(np.exp(res.topk.logprobs), [[0.7, 0.2], [0.8, 0.1]], rtol=1e-6)
    assert res.winner.tolist() == [1, 1]
    assert res.weights.tolist() == [[0.0, 1.0]]
    np.testing.assert_allclose(np.exp(res.topk.gold_logprob), [0.7, 0.8], rtol=1e-6)


def test_mince_tie_goes_to_target():
    tgt = topk([[1, 2]], [[0.6, 0.3]], [1])
    src = topk([[2, 1]], [[0.7, 0.2]], [1])
    res = fuse([tgt, src], np.array([1]), np.array([[0.7, 0.7]]), vocab_size=10)
    assert res.winner.tolist() == [0]


def test_avgce_default_temperature_lets_a_typical_ce_difference_matter():
    """A median window-CE difference between two teachers (0.05 nats/byte) weights them e:1 by default;
    the old default (T = 1) made it 0.49/0.51, an average whatever the CE said."""
    tgt, src = topk([[1, 2]], [[0.6, 0.3]], [1]), topk([[2, 3]], [[0.5, 0.4]], [1])
    res = fuse([tgt, src], np.array([2]), np.array([[0.70, 0.75]]), vocab_size=10, method="avgce")
    np.testing.assert_allclose(res.weights, [[math.e / (math.e + 1), 1 / (math.e + 1)]], rtol=1e-6)
    assert FuseConfig().temperature == AVGCE_TEMPERATURE == 0.05


def test_avgce_window_is_softmax_weighted_mixture():
    tgt = topk([[1, 2]], [[0.6, 0.3]], [1])
    src = topk([[2, 3]], [[0.5, 0.4]], [1])
    ce = np.array([[1.0, 2.0]])
    res = fuse([tgt, src], np.array([2]), ce, vocab_size=10, method="avgce", k_out=3, temperature=1.0)
    w0 = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0))
    w1 = 1 - w0
    want = {1: 0.6 * w0, 2: 0.3 * w0 + 0.5 * w1, 3: 0.4 * w1}
    got = dict(zip(res.topk.ids[0].tolist(), np.exp(res.topk.logprobs[0]).tolist(), strict=True))
    assert got.keys() == want.keys()
    for key, val in want.items():
        assert got[key] == pytest.approx(val, rel=1e-6)
    assert res.topk.tail_mass[0] == pytest.approx(1 - sum(want.values()), abs=1e-6)
    assert res.winner.tolist() == [-1]
    np.testing.assert_allclose(res.weights, [[w0, w1]], rtol=1e-6)


def test_mince_token_unit_chooses_per_position():
    tgt = topk([[1, 2], [3, 4]], [[0.6, 0.3], [0.5, 0.4]], [2])
    src = topk([[2, 1], [4, 3]], [[0.7, 0.2], [0.8, 0.1]], [2])
    labels = np.array([1, 4])  # target better at position 0 (0.6 vs 0.2), source at 1 (0.8 vs 0.4)
    res = fuse([tgt, src], labels, np.zeros((1, 2)), vocab_size=10, method="mince", unit="token")
    assert res.winner.tolist() == [0, 1]
    assert res.topk.ids.tolist() == [[1, 2], [4, 3]]
    np.testing.assert_allclose(res.weights, [[0.5, 0.5]])


def test_token_metric_ce_is_mean_negative_label_logprob():
    t = topk([[1, 2], [1, 2], [3, 4]], [[0.5, 0.25], [0.5, 0.25], [0.5, 0.5]], [2, 1])
    ce = token_metric_ce([t], np.array([1, 2, 4]), vocab_size=10)
    np.testing.assert_allclose(ce[:, 0], [-(math.log(0.5) + math.log(0.25)) / 2, -math.log(0.5)], rtol=1e-6)


def _reference_mixture(cands, weights, k_out):
    """Per position: dict of id -> summed weighted probability, top k_out by (prob desc, id asc)."""
    out = []
    for n in range(cands[0].n_positions):
        acc: dict[int, float] = {}
        for j, c in enumerate(cands):
            for i, lp in zip(c.ids[n], c.logprobs[n], strict=True):
                if i != PAD_ID and weights[n, j] > 0:
                    acc[int(i)] = acc.get(int(i), 0.0) + weights[n, j] * math.exp(float(lp))
        out.append(sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:k_out])
    return out


@pytest.mark.parametrize("method,unit", [("mince", "window"), ("avgce", "window"), ("mince", "token"), ("avgce", "token")])
def test_fuse_matches_reference_on_random_data(method, unit):
    rng = np.random.default_rng(0)
    lengths = np.array([3, 1, 4])
    n, k, vocab = int(lengths.sum()), 4, 12
    cands = []
    for _ in range(3):
        ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
        p = rng.dirichlet(np.ones(k + 1), size=n)[:, :k]
        order = np.argsort(-p, axis=1)
        cands.append(topk(np.take_along_axis(ids, order, 1), np.take_along_axis(p, order, 1), lengths))
    labels = rng.integers(0, vocab, size=n)
    window_ce = rng.uniform(0.5, 2.0, size=(3, 3))
    res = fuse(cands, labels, window_ce, vocab, method, unit, k_out=5)
    if unit == "window":
        ce = np.repeat(window_ce, lengths, axis=0)
    else:
        ce = -np.stack([label_logprob(c, labels, vocab) for c in cands], axis=1)
    if method == "mince":
        w = np.eye(3)[ce.argmin(1)]
    else:
        w = np.exp(-ce / AVGCE_TEMPERATURE) / np.exp(-ce / AVGCE_TEMPERATURE).sum(1, keepdims=True)
    ref = _reference_mixture(cands, w, 5)
    for pos, entries in enumerate(ref):
        got = [(int(i), float(np.exp(lp))) for i, lp in zip(res.topk.ids[pos], res.topk.logprobs[pos], strict=True) if i != PAD_ID]
        assert [i for i, _ in got] == [i for i, _ in entries]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in entries], rtol=1e-5)


# -- run identity -----------------------------------------------------------------------------------
def test_mince_identity_ignores_the_unused_temperature_and_keeps_old_records(spine, tmp_path):
    """MinCE does not use AvgCE's temperature: changing it keeps the dataset (a rerun is a no-op);
    a record written before the fix (temperature in a MinCE identity) is still the same run; AvgCE's
    temperature is part of its identity."""
    import json

    from fusedata.dataset import same_run
    from fusedata.stages.base import run_stage
    from fusedata.stages.fuse import FuseJob, FuseStage, fuse_identity

    assert "temperature" not in fuse_identity(FuseConfig(method="mince"))
    assert fuse_identity(FuseConfig(method="mince", temperature=3.0)) == fuse_identity(FuseConfig(method="mince"))
    assert fuse_identity(FuseConfig(method="avgce", temperature=3.0))["temperature"] == 3.0
    assert fuse_identity(FuseConfig(method="avgce", temperature=3.0)) != fuse_identity(FuseConfig(method="avgce"))

    quiet = {"quiet": True, "log": lambda m: None}
    out = tmp_path / "fused"

    def stage(**cfg) -> FuseStage:
        return FuseStage(FuseJob(str(spine / "topk/llama"), [str(spine / "aligned/gemma")], str(out),
                                 FuseConfig(**cfg), **quiet))

    assert run_stage(stage(method="mince"), quiet=True, log=lambda m: None).status == "ran"
    assert run_stage(stage(method="mince", temperature=2.0), quiet=True, log=lambda m: None).status == "skipped"
    # a record as written before the fix: the temperature in a MinCE identity
    for name in ("_run.json", "_manifest.json"):
        doc = json.loads((out / name).read_text())
        run = doc if name == "_run.json" else doc["run"]
        run["fuse"]["temperature"] = 1.0
        (out / name).write_text(json.dumps(doc))
    assert same_run(json.loads((out / "_run.json").read_text()), stage(method="mince").identity())
    assert run_stage(stage(method="mince"), quiet=True, log=lambda m: None).status == "skipped"
    assert not same_run(stage(method="avgce").identity(), stage(method="avgce", temperature=2.0).identity())
