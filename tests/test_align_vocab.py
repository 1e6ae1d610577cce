"""Vocabulary maps: EM hand cases, MinED equals the brute-force minimum (tie-break included),
special-token roles, the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

import fusedata.align.vocab as vocab
from fusedata.align.sequence import levenshtein
from fusedata.align.tokens import TokenTable, token_table
from fusedata.align.vocab import exact_map, mined_brute_force, mined_map, vocab_map


def _table(surfaces, fallback=(), special=(), roles=None) -> TokenTable:
    n = len(surfaces)
    fb, sp = np.zeros(n, bool), np.zeros(n, bool)
    fb[list(fallback)] = True
    sp[list(special)] = True
    return TokenTable(list(surfaces), sp, fb, roles or {}, "test")


def _python_mined(s: str, target: TokenTable) -> int:
    """argmin of (distance, byte fallback, id) with an all-Python Levenshtein."""
    return min((levenshtein(s, t), bool(target.byte_fallback[i]), i)
               for i, t in enumerate(target.surface) if t is not None)[2]


def test_exact_and_mined_hand_cases():
    # target: 0 <s> (special), 1 " get", 2 " now", 3 " gets", 4 "A" byte piece, 5 "A", 6 " immediate"
    target = _table([None, " get", " now", " gets", "A", "A", " immediate"], fallback=[4], special=[0],
                    roles={"eos": 0})
    # source: 0 </s> (special, eos), 1 " now", 2 " immediately", 3 " gets", 4 "A", 5 " obtains"
    source = _table([None, " now", " immediately", " gets", "A", " obtains"], special=[0], roles={"eos": 0})
    assert exact_map(source, target).tolist() == [0, 2, -1, 3, 5, -1]  # "A": the regular piece wins
    mined = mined_map(source, target)
    assert mined.tolist()[:5] == [0, 2, 6, 3, 5]  # " immediately" -> " immediate" (the slides' example)
    assert mined[5] == _python_mined(" obtains", target)


def test_mined_tie_break_smallest_id_and_byte_pieces_last():
    target = _table(["ab", "ba", "x", "\x00"], fallback=[2])
    source = _table(["aa", "y", "xx"])
    # "aa": distance 1 to "ab" (id 0) and "ba" (id 1) -> 0, the smaller id
    # "y": distance 1 to "x" (id 2, a byte piece) and "\x00" (id 3) -> 3, regular pieces first
    # "xx": distance 1 only to "x" -> 2
    assert mined_map(source, target).tolist() == [0, 3, 2]


def test_mined_equals_brute_force_on_random_vocabularies():
    rng = np.random.default_rng(0)
    alphabet = list("ab c\n")

    def words(n):
        return ["".join(rng.choice(alphabet, size=rng.integers(1, 9))) for _ in range(n)]

    target = _table(words(300), fallback=range(0, 300, 17))
    source = _table(words(400) + [None])
    got = mined_map(source, target, max_cells=5000)  # small chunks: exercise the chunk loop
    assert got[-1] == -1
    want = mined_brute_force(source.surface[:-1], target)
    assert got[:-1].tolist() == want.tolist()
    for i in range(0, 400, 40):
        assert got[i] == _python_mined(source.surface[i], target)


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny_llama, tiny_gemma):
    return AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_gemma)


def test_tiny_tokenizers_both_directions(tiny_tokenizers):
    llama, gemma = (token_table(t) for t in tiny_tokenizers)
    for src, tgt in ((gemma, llama), (llama, gemma)):
        em, mined = exact_map(src, tgt), mined_map(src, tgt)
        ordinary = [i for i, s in enumerate(src.surface) if s is not None]
        assert (mined[ordinary] >= 0).all()  # MinED maps every ordinary token
        hit = [i for i in ordinary if em[i] >= 0]
        assert (mined[hit] == em[hit]).all()
        assert all(tgt.surface[em[i]] == src.surface[i] for i in hit)
        assert mined[ordinary].tolist() == mined_brute_force([src.surface[i] for i in ordinary], tgt).tolist()
        assert all(mined[i] < 0 or tgt.surface[mined[i]] is not None or tgt.special[mined[i]]
                   for i in range(len(src)))


def test_vocab_map_cache(tiny_tokenizers, tmp_path, monkeypatch):
    llama, gemma = tiny_tokenizers
    first = vocab_map(gemma, llama, "mined", cache_dir=tmp_path, size=len(gemma) + 3)
    assert first.dtype == np.int32 and len(first) == len(gemma) + 3 and (first[-3:] == -1).all()
    files = list(tmp_path.glob("vocab-mined-*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp*"))

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(vocab, "mined_map", boom)
    assert (vocab_map(gemma, llama, "mined", cache_dir=tmp_path, size=len(gemma) + 3) == first).all()
    exact = vocab_map(gemma, llama, "exact", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vocab-*.npy"))) == 2 and len(exact) == len(gemma)
    with pytest.raises(ValueError, match="unknown vocabulary map"):
        vocab_map(gemma, llama, "fuzzy")
