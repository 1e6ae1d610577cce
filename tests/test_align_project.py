"""Projection of source top-k onto target positions and ids: merge by adding, label fallback,
a hand-checked many:1 example, stats."""

from __future__ import annotations

import numpy as np
import pytest

from fusedata.align.project import PAD_ID, merge_rows, project
from fusedata.align.sequence import (
    FALLBACK,
    MANY_TO_ONE,
    ONE_TO_MANY,
    ONE_TO_ONE,
    PositionMatch,
    match_positions,
)
from fusedata.topk import TopK


def _topk(ids, probs, lengths=None) -> TopK:
    ids = np.asarray(ids, dtype=np.int32)
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lp = np.log(p).astype(np.float32)
    n = len(ids)
    return TopK(ids, lp, lp[:, 0].copy(), (1 - p.sum(axis=1)).astype(np.float32),
                np.asarray(lengths if lengths is not None else [n], dtype=np.int64))


def test_merge_by_adding_keeps_mass():
    # source ids 10, 11, 12 all map to target 3 (e.g. "get", "gets", "Get" under MinED)
    src = _topk([[10, 11, 12, 13]], [[0.4, 0.3, 0.1, 0.05]])
    vmap = np.full(20, -1, np.int32)
    vmap[[10, 11, 12, 13]] = [3, 3, 3, 7]
    out = project(src, PositionMatch(np.array([0]), np.array([ONE_TO_ONE], np.int8)), np.array([3]), vmap, 50)
    assert out.topk.ids.tolist() == [[3, 7, PAD_ID, PAD_ID]]
    np.testing.assert_allclose(np.exp(out.topk.logprobs[0, :2]), [0.8, 0.05], rtol=1e-6)
    assert out.topk.logprobs[0, 2] == -np.inf
    np.testing.assert_allclose(out.topk.tail_mass, [0.15], rtol=1e-5)
    np.testing.assert_allclose(out.topk.gold_logprob, [np.log(0.8)], rtol=1e-6)
    np.testing.assert_allclose(out.mass_kept, [1.0])


def test_unmapped_ids_drop_mass_into_the_tail():
    src = _topk([[1, 2]], [[0.6, 0.3]])
    vmap = np.array([-1, 5, -1], np.int32)
    out = project(src, PositionMatch(np.array([0]), np.array([ONE_TO_ONE], np.int8)), np.array([9]), vmap, 10)
    assert out.topk.ids.tolist() == [[5, PAD_ID]]
    np.testing.assert_allclose(out.topk.tail_mass, [0.4], rtol=1e-5)
    np.testing.assert_allclose(out.mass_kept, [0.6 / 0.9], rtol=1e-6)
    # label 9 not listed: its share of the tail, spread over the 9 unlisted ids
    np.testing.assert_allclose(out.topk.gold_logprob, [np.log(0.4 / 9)], rtol=1e-5)


def test_fallback_is_a_one_hot_on_the_target_label():
    """Target text "unbelievable": target [un][believ][able], source [unbeliev][able].
    Target position 0 predicts "believ", which starts inside the source token "unbeliev":
    no source position predicts text from there, so the label (the *next* target token,
    "believ" = id 21) gets all the mass, not the current token "un" (FuseAI issue 27)."""
    tgt_ids = np.array([20, 21, 22])  # un, believ, able
    m = match_positions(np.array([0, 2, 8]), np.array([2, 8, 12]), np.array([0, 8]), np.array([8, 12]))
    assert m.src_pos.tolist() == [-1, 0] and m.kind.tolist() == [FALLBACK, ONE_TO_ONE]
    src = _topk([[7, 8]], [[0.7, 0.2]])  # source position 0 (after "unbeliev"): "able" 0.7
    vmap = np.full(10, -1, np.int32)
    vmap[7], vmap[8] = 22, 23
    out = project(src, m, tgt_ids[1:], vmap, 100)
    assert out.topk.ids[0].tolist() == [21, PAD_ID] and out.topk.logprobs[0, 0] == 0.0
    assert out.topk.tail_mass[0] == 0.0 and out.topk.gold_logprob[0] == 0.0 and np.isnan(out.mass_kept[0])
    assert out.topk.ids[1].tolist() == [22, 23]


def test_many_to_one_uses_the_distribution_with_the_same_prefix():
    """Text "I get it": target [I][ get][ it]; source [I][ g][et][ it].
    Target position 0 (after "I") predicts " get"; the source needs " g" + "et" for it. The
    source position with the same prefix "I" is position 0 (it predicts " g"): many:1, and its
    distribution is used. Source position 1 (after "I g") has seen part of the token: unused.
    Target position 1 (after "I get") matches source position 2 (after "I get"), 1:1."""
    tgt = np.array([[0, 1], [1, 5], [5, 8]])
    src = np.array([[0, 1], [1, 3], [3, 5], [5, 8]])
    m = match_positions(tgt[:, 0], tgt[:, 1], src[:, 0], src[:, 1])
    assert m.src_pos.tolist() == [0, 2] and m.kind.tolist() == [MANY_TO_ONE, ONE_TO_ONE]
    # source vocabulary: 0 " g", 1 " get", 2 "et", 3 " it", 4 " is"; target: 10 " get", 11 " it", 12 " is"
    vmap = np.array([10, 10, -1, 11, 12], np.int32)  # MinED: " g" and " get" both -> " get"
    src_topk = _topk([[0, 1, 4], [2, 3, 4], [3, 4, 0]], [[0.5, 0.3, 0.1], [0.9, 0.05, 0.01], [0.6, 0.3, 0.05]])
    out = project(src_topk, m, np.array([10, 11]), vmap, 13, lengths=[2])
    assert out.topk.ids.tolist() == [[10, 12, PAD_ID], [11, 12, 10]]
    np.testing.assert_allclose(np.exp(out.topk.logprobs[0, :2]), [0.8, 0.1], rtol=1e-6)
    totals = out.stats.totals()
    assert (totals["1:1"], totals["many:1"], totals["1:many"], totals["fallback"]) == (1, 1, 0, 0)


def test_window_stats_and_k_out():
    src = _topk([[1, 2], [2, 1], [1, 1]], [[0.5, 0.2], [0.6, 0.1], [0.3, 0.3]])
    vmap = np.array([-1, 4, 5], np.int32)
    match = PositionMatch(np.array([0, -1, 1, 2]), np.array([ONE_TO_ONE, FALLBACK, ONE_TO_MANY, MANY_TO_ONE], np.int8))
    out = project(src, match, np.array([4, 5, 4, 4]), vmap, 6, lengths=[1, 3], k_out=1)
    assert out.topk.k == 1 and out.topk.ids[:, 0].tolist() == [4, 5, 5, 4]
    np.testing.assert_allclose(np.exp(out.topk.logprobs[:, 0]), [0.5, 1.0, 0.6, 0.6], rtol=1e-6)
    s = out.stats
    assert s.one_to_one.tolist() == [1, 0] and s.fallback.tolist() == [0, 1]
    assert s.one_to_many.tolist() == [0, 1] and s.many_to_one.tolist() == [0, 1]
    np.testing.assert_allclose(s.mass_kept, [1.0, 1.0])
    assert out.topk.lengths.tolist() == [1, 3]


@pytest.mark.parametrize("k_out", [1, 3, 6])
def test_merge_rows_equals_a_dictionary(k_out):
    rng = np.random.default_rng(k_out)
    ids = rng.integers(-1, 6, size=(200, 4))
    probs = rng.random((200, 4)) * (rng.random((200, 4)) > 0.2)
    out_ids, out_p = merge_rows(ids, probs, k_out)
    assert out_ids.shape == (200, k_out)
    for r in range(200):
        want: dict[int, float] = {}
        for i, p in zip(ids[r].tolist(), probs[r].tolist(), strict=True):
            if i >= 0 and p > 0:
                want[i] = want.get(i, 0.0) + p
        exp = sorted(want.items(), key=lambda x: (-x[1], x[0]))[:k_out]
        got = [(i, p) for i, p in zip(out_ids[r].tolist(), out_p[r].tolist(), strict=True) if i != PAD_ID]
        assert [i for i, _ in got] == [i for i, _ in exp]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in exp])
