"""Token surfaces across tokenizer families: GPT-2 byte level, SentencePiece/Metaspace with
byte fallback, WordPiece, plain; special tokens; the tiny in-process tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from fusedata.align.tokens import (
    BYTE_LEVEL,
    METASPACE,
    PLAIN,
    WORDPIECE,
    byte_level_table,
    decoding_from_json,
    piece_bytes,
    strip_space,
    surface_bytes,
    token_table,
)

TEXT = "The naïve café — 日本語 🤗 costs $3.50.\n\n\tIndented  twice   spaced.\n"


def test_byte_level_table_is_a_bijection_onto_bytes():
    table = byte_level_table()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["ĉ"] == 0x09 and table["A"] == 0x41


def test_decoding_families_from_the_pipeline():
    byte_level = decoding_from_json({"pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"}})
    assert byte_level.family == BYTE_LEVEL
    assert piece_bytes("ĠwÃ¯", byte_level) == " wï".encode()
    gemma_like = decoding_from_json({
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "byte_fallback": True}})
    assert gemma_like.family == METASPACE and gemma_like.byte_fallback
    assert piece_bytes("▁the", gemma_like) == b" the"
    assert piece_bytes("<0x20>", gemma_like) == b" " and piece_bytes("<0xC3>", gemma_like) == b"\xc3"
    assert piece_bytes("▁日本", gemma_like) == " 日本".encode()
    metaspace = decoding_from_json({"decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}})
    assert metaspace.family == METASPACE and not metaspace.byte_fallback
    assert piece_bytes("<0x20>", metaspace) == b"<0x20>"  # no byte fallback: a literal piece
    wordpiece = decoding_from_json({"decoder": {"type": "WordPiece", "prefix": "##"}, "model": {"type": "WordPiece"}})
    assert wordpiece.family == WORDPIECE and piece_bytes("##ing", wordpiece) == b"ing"
    assert decoding_from_json({"model": {"vocab": {"ĠA": 0, "Ġb": 1, "c": 2}}}).family == BYTE_LEVEL
    assert decoding_from_json({"model": {"vocab": {"a": 0, "b": 1}}}).family == PLAIN


def test_strip_space():
    assert strip_space(" the") == "the" and strip_space("\n") == "\n" and strip_space("  ") == ""


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny_llama, tiny_gemma):
    return AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_gemma)


@pytest.mark.parametrize("which", [0, 1])
def test_surfaces_spell_the_text(tiny_tokenizers, which):
    """Concatenated surfaces of a tokenised text are its UTF-8 bytes; specials have none."""
    tok = tiny_tokenizers[which]
    table = token_table(tok)
    assert table.family == (BYTE_LEVEL, METASPACE)[which]
    ids = tok(TEXT)["input_ids"]
    assert b"".join(surface_bytes(s) or b"" for s in table.text(ids)) == TEXT.encode()
    special = sorted(set(tok.all_special_ids))
    assert all(table.surface[i] is None for i in special) and table.special[special].all()
    if tok.bos_token_id is not None:
        assert table.roles["bos"] == tok.bos_token_id


def test_table_padded_to_the_model_vocabulary(tiny_tokenizers):
    tok = tiny_tokenizers[0]
    table = token_table(tok, size=len(tok) + 5)
    assert len(table) == len(tok) + 5 and table.surface[-5:] == [None] * 5
    assert not table.special[-5:].any() and table.text([-1, len(tok) + 100]) == [None, None]


def test_stripped_removes_only_spaces(tiny_tokenizers):
    table = token_table(tiny_tokenizers[1])
    stripped = table.stripped()
    for s, t in zip(table.surface, stripped, strict=True):
        assert (s is None and t is None) or t == s.replace(" ", "")
    assert np.count_nonzero([s is not None and " " in s for s in table.surface]) > 0
