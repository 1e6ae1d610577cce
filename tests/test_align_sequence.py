"""Sequence alignment: DTW equals the plain reference (property tests, tie-heavy alphabets),
byte-offset alignment and the position rule on hand cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedata.align.sequence import (
    FALLBACK,
    MANY_TO_ONE,
    ONE_TO_MANY,
    ONE_TO_ONE,
    Alignment,
    byte_align,
    dtw_align,
    dtw_align_tokens,
    dtw_engines,
    dtw_reference,
    levenshtein,
    match_from_alignment,
    match_positions,
    match_predictions,
)

# few distinct characters and short tokens: many equal costs, so tie-breaking is exercised
token = st.text(alphabet="ab ", max_size=3)
tokens = st.lists(token, max_size=14)


@settings(max_examples=300, deadline=None)
@given(tokens, tokens)
def test_dtw_equals_plain_reference(target, source):
    ref = dtw_reference(target, source, distance=levenshtein)
    for engine in dtw_engines():
        assert dtw_align(target, source, engine=engine).to_lists() == ref


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="abcdé ", min_size=1, max_size=6), min_size=20, max_size=60),
       st.integers(0, 2**31))
def test_dtw_equals_reference_on_retokenised_text(words, seed):
    """Two random segmentations of the same text: the realistic case."""
    text = "".join(words)
    rng = np.random.default_rng(seed)

    def cut(s: str) -> list[str]:
        marks = sorted(set(rng.integers(1, len(s), size=len(s) // 2).tolist())) if len(s) > 1 else []
        return [s[i:j] for i, j in zip([0, *marks], [*marks, len(s)], strict=True)]

    target, source = cut(text), cut(text)
    ref = dtw_reference(target, source)
    for engine in dtw_engines():
        assert dtw_align(target, source, engine=engine).to_lists() == ref


def test_dtw_reference_orientation_and_ties():
    # FuseLLM's orientation: rows = source; on ties the backtrack prefers diagonal, then up
    # (previous source token), then left (previous target token)
    assert dtw_reference(["a", "a"], ["a"]) == [[0], [0]]
    assert dtw_reference(["a"], ["a", "a"]) == [[0, 1]]
    assert dtw_reference(["ab", "c"], ["a", "bc"]) == dtw_align(["ab", "c"], ["a", "bc"]).to_lists()
    assert dtw_reference([" the", " cat"], ["the", "cat"]) == [[0], [1]]  # spaces do not count
    assert dtw_align([], ["a"]).to_lists() == [] and dtw_align(["a"], []).to_lists() == [[]]


def test_dtw_tokens_leave_specials_out():
    al = dtw_align_tokens(["Hello", " world"], [None, "Hello", " wor", "ld"])  # source <bos>
    assert al.to_lists() == [[1], [2, 3]]
    assert dtw_align_tokens([None], ["a"]).to_lists() == [[]]


def test_byte_align_overlaps():
    # text "Hello world": target [<bos>][Hello][ world]; source [Hel][lo][ wo][rld]
    tgt = np.array([[0, 0], [0, 5], [5, 11]])
    src = np.array([[0, 3], [3, 5], [5, 8], [8, 11]])
    al = byte_align(tgt[:, 0], tgt[:, 1], src[:, 0], src[:, 1])
    assert al.to_lists() == [[], [0, 1], [2, 3]]
    assert byte_align(src[:, 0], src[:, 1], tgt[:, 0], tgt[:, 1]).to_lists() == [[1], [1], [2], [2]]


def test_match_rule_hand_cases():
    """Text "unbelievable news": target tokens [un][believ][able][ news];
    source tokens [unbeliev][able][ ne][ws]."""
    tgt = np.array([[0, 2], [2, 8], [8, 12], [12, 17]])
    src = np.array([[0, 8], [8, 12], [12, 15], [15, 17]])
    m = match_positions(tgt[:, 0], tgt[:, 1], src[:, 0], src[:, 1])
    # t=0 predicts "believ" (starts at 2, inside the source's "unbeliev"): fallback
    # t=1 predicts "able": the source position 0 predicts "able" too: 1:1
    # t=2 predicts " news": the source position 1 predicts " ne": many:1, its distribution
    assert m.src_pos.tolist() == [-1, 0, 1]
    assert m.kind.tolist() == [FALLBACK, ONE_TO_ONE, MANY_TO_ONE]
    # the other way round: source position 2 predicts "ws" inside the target's " news"
    r = match_positions(src[:, 0], src[:, 1], tgt[:, 0], tgt[:, 1])
    assert r.src_pos.tolist() == [1, 2, -1] and r.kind.tolist() == [ONE_TO_ONE, ONE_TO_MANY, FALLBACK]
    # the same rule through a token alignment
    for a, b in ((tgt, src), (src, tgt)):
        via = match_from_alignment(byte_align(a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
        direct = match_positions(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
        assert via.src_pos.tolist() == direct.src_pos.tolist() and via.kind.tolist() == direct.kind.tolist()


def test_match_with_bos_and_windows():
    # target without <bos>: [The][ cat]; source with <bos> (zero width): [<bos>][The][ cat]
    tgt = np.array([[0, 3], [3, 7]])
    src = np.array([[0, 0], [0, 3], [3, 7]])
    m = match_positions(tgt[:, 0], tgt[:, 1], src[:, 0], src[:, 1])
    assert m.src_pos.tolist() == [1] and m.kind.tolist() == [ONE_TO_ONE]
    # the other way: the target's <bos> position predicts "The", which the source (no bos) never predicts
    r = match_positions(src[:, 0], src[:, 1], tgt[:, 0], tgt[:, 1])
    assert r.src_pos.tolist() == [-1, 0] and r.kind.tolist() == [FALLBACK, ONE_TO_ONE]
    # predictions of a document gathered from several windows, in any order
    pm = match_predictions(np.array([3, 0]), np.array([7, 3]), np.array([3, 0, 0]), np.array([7, 3, 0]))
    assert pm.src_pos.tolist() == [0, 1]
    assert match_predictions(np.array([0]), np.array([3]), np.zeros(0), np.zeros(0)).kind.tolist() == [FALLBACK]


def test_alignment_from_pairs():
    al = Alignment.from_pairs(np.array([2, 0, 0]), np.array([5, 4, 3]), 3, 6)
    assert al.to_lists() == [[3, 4], [], [5]] and al.rows().tolist() == [0, 0, 2]


@pytest.mark.parametrize("engine", ["numpy", "auto"])
def test_dtw_engines_agree_on_long_sequences(engine):
    rng = np.random.default_rng(1)
    vocab = ["the", " cat", " sat", "s", " on", " mat", ".", "\n", " ", "ca", "t"]
    target = [vocab[i] for i in rng.integers(0, len(vocab), 300)]
    source = [vocab[i] for i in rng.integers(0, len(vocab), 280)]
    assert dtw_align(target, source, engine=engine).to_lists() == dtw_reference(target, source)
