"""Vocabulary mapping: token normalisation across tokenizer families, EM, MinED against a
brute-force minimum over the whole target vocabulary, and the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import converted_model_dir
from transformers import AutoTokenizer

import fusedata.vocab
from fusedata.vocab import exact_map, mined_map, token_bytes, token_texts, tokenizer_family, vocab_map


def _dp(a: str, b: str) -> int:
    """Plain dynamic-programming Levenshtein distance (independent of the library's)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def _brute_mined(s: str, tgt: list[str | None], dist=_dp) -> int:
    """argmin over every target token of (distance, id); special tokens (None) never match."""
    return min((dist(s, t), i) for i, t in enumerate(tgt) if t is not None)[1]


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def gemma_tok(tiny_gemma):
    return AutoTokenizer.from_pretrained(tiny_gemma)


# --- normalisation ---------------------------------------------------------------------------

def test_tokenizer_family(llama_tok, gemma_tok):
    assert tokenizer_family(llama_tok) == "byte_level"
    assert tokenizer_family(gemma_tok) == "sentencepiece"


def test_tokenizer_family_plain():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert tokenizer_family(fast) == "plain"
    assert token_bytes(fast) == [None, b"hello", b"world"]


def test_token_bytes_byte_level(llama_tok):
    out = token_bytes(llama_tok)
    assert len(out) == len(llama_tok)
    vocab = llama_tok.get_vocab()
    assert out[vocab["<|endoftext|>"]] is None and out[vocab["<|pad|>"]] is None  # special tokens
    assert out[vocab["Ġthe"]] == b" the"  # Ġ = space
    assert out[vocab["Ċ"]] == b"\n"  # Ċ = newline
    assert out[vocab["he"]] == b"he"
    assert out[vocab["Ã"]] == bytes([0xC3])  # the byte-to-unicode table: a lone UTF-8 lead byte
    # the bytes of a text's tokens spell the text exactly, multi-byte characters included
    text = "Le café coûte 3 € 😀 the dog"
    ids = llama_tok(text, add_special_tokens=False).input_ids
    assert b"".join(out[i] for i in ids) == text.encode()
    assert token_texts(llama_tok)[vocab["Ġthe"]] == " the"


def test_token_bytes_sentencepiece(gemma_tok):
    out = token_bytes(gemma_tok)
    vocab = gemma_tok.get_vocab()
    for special in ("<pad>", "<eos>", "<bos>", "<unk>"):
        assert out[vocab[special]] is None
    assert out[vocab["<0x41>"]] == b"A"  # byte fallback
    assert out[vocab["<0x0A>"]] == b"\n"
    assert out[vocab["<0xE2>"]] == bytes([0xE2])
    assert out[vocab["▁the"]] == b" the"  # ▁ = space
    assert out[vocab["he"]] == b"he"
    text = "Le café coûte 3 € 😀 the dog"
    ids = gemma_tok(text).input_ids
    assert ids[0] == vocab["<bos>"] and out[ids[0]] is None
    assert b"".join(out[i] for i in ids[1:]) == text.encode()
    # latin-1 strings: one character per byte, so both families share an alphabet
    assert token_texts(gemma_tok)[vocab["<0xE2>"]] == "\xe2"
    assert token_texts(gemma_tok)[vocab["<bos>"]] is None


# --- EM / MinED -------------------------------------------------------------------------------

def test_exact_map_hand_cases():
    src = ["a", " the", None, "x", "", "b"]
    tgt = [None, " the", "a", "a", "b", None]
    got = exact_map(src, tgt, 8)
    # duplicate target strings: the smallest id; specials (None) never match; size pads with -1
    assert got.dtype == np.int32
    assert got.tolist() == [2, 1, -1, -1, -1, 4, -1, -1]
    # a special target token does not match a source token with the same text
    assert exact_map(["<s>"], [None, "x"], 1).tolist() == [-1]


def test_mined_map_hand_cases():
    tgt = [None, "zz", "b", "a", " the", "the", "ab"]
    src = ["ab", "ac", " th", "thee", "q", None, "ba"]
    got = mined_map(src, tgt, 7)
    # "ab": exact (6); "ac": "a"(3) and "ab"(6) both at 1 -> 3; " th": " the"(4) at 1, "the"(5) at 2 -> 4;
    # "thee": "the" at 1; "q": every 1-char token at 1 and "zz" at 2 -> "b"(2) (smallest id); None: -1;
    # "ba": "b"(2), "a"(3), "ab"(6) at 1... and "zz" at 2 -> 2
    assert got.tolist() == [6, 3, 4, 5, 2, -1, 2]
    assert got.tolist() == [_brute_mined(s, tgt) if s else -1 for s in src]


def test_mined_tie_break_is_smallest_id():
    # every candidate at distance 1: whatever the order of the strings, the smallest id wins
    assert mined_map(["y"], ["b", "a", "c"], 1).tolist() == [0]
    assert mined_map(["y"], ["c", "b", "a"], 1).tolist() == [0]
    assert mined_map(["y"], [None, "xy", "a", "b"], 1).tolist() == [1]
    assert mined_map(["y"], ["xx", "b", "a"], 1).tolist() == [1]  # "xx" is at 2
    # ties across cdist chunks and workers do not change the answer
    src = ["y", "q", "ab", "zzz"] * 10
    tgt = ["xx", "b", "a", "ab", "ba", "zz", "z"]
    want = [_brute_mined(s, tgt) for s in src]
    assert mined_map(src, tgt, len(src), chunk=3).tolist() == want
    assert mined_map(src, tgt, len(src), workers=1).tolist() == want


def test_mined_map_equals_brute_force_tiny(llama_tok, gemma_tok):
    """Every source token of the tiny Gemma tokenizer against the whole tiny Llama vocabulary, and back."""
    for s_tok, t_tok in ((gemma_tok, llama_tok), (llama_tok, gemma_tok)):
        src, tgt = token_texts(s_tok), token_texts(t_tok)
        got = mined_map(src, tgt, len(src) + 3, chunk=64)  # small chunks: several cdist blocks
        want = [_brute_mined(s, tgt) if s is not None else -1 for s in src] + [-1] * 3
        assert got.tolist() == want
        em = exact_map(src, tgt, len(src))
        assert np.array_equal(got[: len(src)][em >= 0], em[em >= 0])  # MinED agrees with EM where EM matches


def test_mined_map_equals_brute_force_real():
    """Sampled Gemma-3 tokens against the whole SmolLM2 vocabulary (tokenizers only)."""
    from rapidfuzz.distance import Levenshtein

    smol, gemma = converted_model_dir("smollm2-135m"), converted_model_dir("gemma3-270m")
    if smol is None or gemma is None:
        pytest.skip("the SmolLM2/Gemma-3 tokenizers are not in the model cache")
    tgt = token_texts(AutoTokenizer.from_pretrained(smol))
    src_all = token_texts(AutoTokenizer.from_pretrained(gemma))
    assert len(tgt) == 49152 and len(src_all) == 262144
    em = exact_map(src_all, tgt, len(src_all))
    rng = np.random.default_rng(0)
    unmatched = np.flatnonzero((em < 0) & np.array([s is not None for s in src_all]))
    matched = np.flatnonzero(em >= 0)
    sample = np.concatenate([rng.choice(unmatched, 30, replace=False), rng.choice(matched, 5, replace=False)])
    src = [src_all[i] for i in sample]
    got = mined_map(src, tgt, len(src))
    want = [_brute_mined(s, tgt, Levenshtein.distance) for s in src]
    assert got.tolist() == want
    assert np.array_equal(got[30:], em[sample[30:]])


# --- cache ------------------------------------------------------------------------------------

def test_vocab_map_cache(llama_tok, gemma_tok, tmp_path, monkeypatch):
    size = len(gemma_tok) + 4  # the model's vocabulary may be larger than the tokenizer's
    said: list[str] = []
    first = vocab_map(gemma_tok, llama_tok, "mined", size, tmp_path, log=said.append)
    assert len(said) == 1 and said[0].startswith(f"building the MinED vocabulary map: {size:,} source x")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("vocab-mined-") and files[0].endswith(".npy")
    assert first.shape == (size,) and first.dtype == np.int32 and (first[-4:] == -1).all()
    assert np.array_equal(first, mined_map(token_texts(gemma_tok) + [None] * 4, token_texts(llama_tok), size))

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(fusedata.vocab, "mined_map", boom)
    monkeypatch.setattr(fusedata.vocab, "exact_map", boom)
    assert np.array_equal(vocab_map(gemma_tok, llama_tok, "mined", size, tmp_path, log=said.append), first)  # loaded
    assert len(said) == 1  # a cached map is not announced
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    # another tokenizer (or direction, or method) is another key: it is computed, not loaded
    with pytest.raises(AssertionError, match="recomputed"):
        vocab_map(llama_tok, gemma_tok, "mined", len(llama_tok), tmp_path)
    with pytest.raises(AssertionError, match="recomputed"):
        vocab_map(gemma_tok, llama_tok, "exact", size, tmp_path)
    other = AutoTokenizer.from_pretrained(llama_tok.name_or_path)
    other.add_tokens(["fusedata"])  # same family, one more token: a different tokenizer hash
    with pytest.raises(AssertionError, match="recomputed"):
        vocab_map(gemma_tok, other, "mined", size, tmp_path)
    monkeypatch.undo()
    third = vocab_map(gemma_tok, other, "mined", size, tmp_path)
    assert len(list(tmp_path.glob("vocab-mined-*.npy"))) == 2
    assert not list(tmp_path.glob("*.tmp*"))
    assert np.array_equal(third, first)  # the added token is not a source token: same map


def test_vocab_map_rejects_unknown_method(llama_tok, gemma_tok, tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        vocab_map(gemma_tok, llama_tok, "fuzzy", len(gemma_tok), tmp_path)


def test_byte_fallback_pieces_lose_ties(llama_tok, gemma_tok, tmp_path):
    """A SentencePiece target has both `A` and `<0x41>` (same bytes), but only ever emits `A` for
    "A": a source token must map to the piece the target's tokenizer produces, not the byte token."""
    from fusedata.vocab import byte_fallback_ids

    vocab = gemma_tok.get_vocab()
    fallback = byte_fallback_ids(gemma_tok)
    assert len(fallback) == 256 and vocab["<0x41>"] in fallback and vocab["A"] not in fallback
    assert byte_fallback_ids(llama_tok) == []
    assert vocab["<0x41>"] < vocab["A"]  # the smallest id alone would pick the byte token
    for method in ("exact", "mined"):
        vmap = vocab_map(llama_tok, gemma_tok, method, len(llama_tok), tmp_path)
        lv = llama_tok.get_vocab()
        for piece, text in (("A", "A"), ("Ċ", "\n"), ("=", "=")):
            emitted = gemma_tok(text, add_special_tokens=False).input_ids
            assert len(emitted) == 1 and vmap[lv[piece]] == emitted[0], (method, piece)
        # a byte the target has no piece for still maps to its byte-fallback token
        assert vmap[lv["Ã"]] == vocab["<0xC3>"]
    # over a whole text: a mapped id is a byte-fallback token only for bytes no regular piece spells
    texts = token_texts(gemma_tok)
    regular = {t for i, t in enumerate(texts) if t is not None and i not in set(fallback)}
    text = "The café (A=1; B=2)\nCounter() == 42 — done. 😀"
    for method in ("exact", "mined"):
        vmap = vocab_map(llama_tok, gemma_tok, method, len(llama_tok), tmp_path)
        used = [int(vmap[i]) for i in llama_tok(text).input_ids]
        assert all(u >= 0 for u in used)
        assert all(texts[u] not in regular for u in used if u in set(fallback)), method
    # the tie rule in mined_map directly: distance ties also prefer the regular piece
    assert mined_map(["AB"], ["<0x41>-as-A", "A"], 1, last=[0]).tolist() == [1]
    assert mined_map(["AB"], ["A", "A"], 1, last=[0]).tolist() == [1]
    assert exact_map(["A"], ["A", "A"], 1, last=[0]).tolist() == [1]
    assert exact_map(["A"], ["A", "B"], 1, last=[0]).tolist() == [0]  # the byte token when it is the only one
