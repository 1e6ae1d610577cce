"""DTW alignment: the compiled `dtw_align` equals the plain O(n·m) reference `dtw_reference`
(FuseLLM's semantics) on random token lists built to provoke ties, and on the real token
sequences of two different tokenizers over the same paragraph."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import converted_model_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedata.dtw import dtw_align, dtw_reference, levenshtein, strip_markers

PARAGRAPH = (
    "Rain fell on the city for three days. The streets filled with water and the buses stopped running, so "
    "people walked to work under black umbrellas, and the river rose over the old stone bridge by Thursday. "
    "The committee met on Tuesday to discuss the budget for the coming year. Ms. Ngozi O'Brien-Smith, "
    "who chairs it, said the new library's roof (repaired in 2019 for $1,250,000) leaks again; "
    "\"unacceptable,\" she wrote. Le café coûte 3 € — très bon! naïve façade. Values: x_1=0.5, y2 += 42."
)


def _rows(off: np.ndarray, col: np.ndarray) -> list[list[int]]:
    return [col[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]


def _check_csr(off: np.ndarray, col: np.ndarray, n: int, m: int) -> None:
    """Structural properties of any DTW path: every target and source index is covered, the
    path starts at (0, 0), ends at (n-1, m-1) and is monotone."""
    assert off.dtype == np.int64 and col.dtype == np.int64
    assert off.shape == (n + 1,) and off[0] == 0 and off[-1] == col.size
    rows = _rows(off, col)
    assert all(r for r in rows)  # every target token gets at least one source token
    assert rows[0][0] == 0 and rows[-1][-1] == m - 1
    assert sorted(set(col.tolist())) == list(range(m))  # every source token is used
    for a, b in zip(rows, rows[1:], strict=False):
        assert a == sorted(a) and a[-1] <= b[0]  # monotone


def test_levenshtein_reference():
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("é", "e") == 1


def test_hand_checked_example():
    # cost: the/th=1 the/e=2 the/cat=3; cat/th=3 cat/e=3 cat/cat=0
    # D = [[1, 3, 6], [4, 4, 3]]; back from (1,2): diag D[0,1]=3 < left D[1,1]=4 -> (0,1) -> left -> (0,0)
    assert dtw_reference(["the", "cat"], ["th", "e", "cat"]) == [[0, 1], [2]]
    off, col = dtw_align(["the", "cat"], ["th", "e", "cat"])
    assert _rows(off, col) == [[0, 1], [2]]
    # one source token covering two target tokens
    assert dtw_reference(["ab", "cd", "e"], ["abcd", "e"]) == [[0], [0], [1]]
    assert _rows(*dtw_align(["ab", "cd", "e"], ["abcd", "e"])) == [[0], [0], [1]]


def test_all_ties_go_diagonal_then_up():
    # identical tokens everywhere: every cell costs 0, all moves tie -> diagonal first, then up
    a, b = ["x"] * 4, ["x"] * 2
    assert dtw_reference(a, b) == [[0], [0], [0], [1]]
    assert _rows(*dtw_align(a, b)) == [[0], [0], [0], [1]]
    # and left when the target is shorter: diagonal to row 0, then left along it
    assert dtw_reference(["x"] * 2, ["x"] * 4) == [[0, 1, 2], [3]]
    assert _rows(*dtw_align(["x"] * 2, ["x"] * 4)) == [[0, 1, 2], [3]]


def test_empty_sequences():
    off, col = dtw_align([], ["a"])
    assert off.tolist() == [0] and col.size == 0
    off, col = dtw_align(["a", "b"], [])
    assert off.tolist() == [0, 0, 0] and col.size == 0


# Short pieces with spaces, empty strings, repeats and non-ASCII: many equal costs, many ties.
TOKENS = st.sampled_from(["", " ", "a", "b", "ab", "ba", " a", "a ", "aa", "abc", " the", "the", "é", "x"])


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKENS, min_size=1, max_size=9), st.lists(TOKENS, min_size=1, max_size=9))
def test_dtw_align_equals_reference_random(a, b):
    off, col = dtw_align(a, b)
    _check_csr(off, col, len(a), len(b))
    assert _rows(off, col) == dtw_reference(a, b)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab c", max_size=4), min_size=1, max_size=14),
       st.lists(st.text(alphabet="ab c", max_size=4), min_size=1, max_size=14))
def test_dtw_align_equals_reference_random_stripped(a, b):
    a, b = strip_markers(a), strip_markers(b)
    assert _rows(*dtw_align(a, b)) == dtw_reference(a, b)


@pytest.fixture(scope="module", params=["real", "tiny"])
def tokenizer_pair(request, tiny_llama, tiny_gemma):
    """(target, source) tokenizers: the real SmolLM2 and Gemma-3 ones (when the model cache has
    them; only their tokenizers are loaded), and the tiny test models' byte-level BPE and
    SentencePiece-style ones (always)."""
    from transformers import AutoTokenizer

    if request.param == "real":
        smol, gemma = converted_model_dir("smollm2-135m"), converted_model_dir("gemma3-270m")
        if smol is None or gemma is None:
            pytest.skip("the SmolLM2/Gemma-3 tokenizers are not in the model cache")
        return AutoTokenizer.from_pretrained(smol), AutoTokenizer.from_pretrained(gemma)
    return AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_gemma)


@pytest.fixture(scope="module")
def texts_pair(tokenizer_pair):
    """fusedata's normalised token strings (bytes as latin-1) of both tokenizers."""
    from fusedata.vocab import token_texts

    return tuple(token_texts(t) for t in tokenizer_pair)


def _normalised_tokens(tok, texts: list, text: str) -> list[str]:
    """The token strings fusedata's DTW compares (as in run_align.match_by_dtw): space markers stripped."""
    ids = tok(text, add_special_tokens=False).input_ids
    assert all(texts[i] is not None for i in ids)
    return strip_markers([texts[i] for i in ids])


def test_dtw_align_equals_reference_real_tokens(tokenizer_pair, texts_pair):
    (target, source), (tt, st_) = tokenizer_pair, texts_pair
    a_all, b_all = _normalised_tokens(target, tt, PARAGRAPH), _normalised_tokens(source, st_, PARAGRAPH)
    # both tokenisations spell the same text (without spaces)
    assert "".join(a_all) == "".join(b_all) == PARAGRAPH.replace(" ", "").encode().decode("latin-1")
    a, b = a_all[:200], b_all[:200]
    assert a != b  # two genuinely different tokenisations
    off, col = dtw_align(a, b)
    _check_csr(off, col, len(a), len(b))
    assert _rows(off, col) == dtw_reference(a, b)
    # on real text most target tokens align to exactly one identical source token
    rows = _rows(off, col)
    same = sum(len(r) == 1 and b[r[0]] == a[i] for i, r in enumerate(rows))
    assert same / len(a) > 0.5


def test_dtw_align_real_tokens_shifted_windows(tokenizer_pair, texts_pair):
    """Windows that do not start on the same text (a source window starting mid-paragraph)."""
    (target, source), (tt, st_) = tokenizer_pair, texts_pair
    a = _normalised_tokens(target, tt, PARAGRAPH)
    b = _normalised_tokens(source, st_, PARAGRAPH)
    for sa, sb in [(slice(0, 60), slice(5, 70)), (slice(10, 80), slice(0, 50)), (slice(30, 31), slice(20, 90))]:
        assert _rows(*dtw_align(a[sa], b[sb])) == dtw_reference(a[sa], b[sb])
