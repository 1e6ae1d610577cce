"""Alignment on the real SmolLM2 (byte-level BPE) and Gemma-3 (SentencePiece, byte fallback)
tokenizers and real news text. Only the tokenizers are loaded (~3 s); skipped when the
converted model folders are absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusedata.align.sequence import (
    byte_align,
    dtw_align,
    dtw_align_tokens,
    dtw_reference,
    match_from_alignment,
    match_positions,
)
from fusedata.align.tokens import BYTE_LEVEL, METASPACE, TokenTable, surface_bytes, token_table
from fusedata.align.vocab import exact_map, mined_brute_force, mined_map

MODELS = Path("/tmp/fdcache/models")
NEWS = Path(__file__).parents[1] / ".venv/lib/python3.11/site-packages/gensim/test/test_data/lee_background.cor"

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not (MODELS / "smollm2-135m/tokenizer.json").is_file()
                       or not (MODELS / "gemma3-270m/tokenizer.json").is_file() or not NEWS.is_file(),
                       reason="real tokenizers or text not available"),
]


@pytest.fixture(scope="module")
def real():
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(MODELS / "smollm2-135m")
    gemma = AutoTokenizer.from_pretrained(MODELS / "gemma3-270m")
    text = " ".join(NEWS.read_text().splitlines()[:6]) + " naïve 日本 🤗\n\n\tend"
    return smol, gemma, token_table(smol), token_table(gemma), text


def spans(table: TokenTable, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans from the surfaces (special tokens: zero width)."""
    lengths = np.array([len(s) if s is not None else 0 for s in table.text(ids)], dtype=np.int64)
    end = np.cumsum(lengths)
    return end - lengths, end


def test_families_and_surfaces(real):
    smol, gemma, ts, tg, text = real
    assert ts.family == BYTE_LEVEL and tg.family == METASPACE and tg.byte_fallback.sum() == 256
    for tok, table in ((smol, ts), (gemma, tg)):
        ids = tok(text)["input_ids"]
        assert b"".join(surface_bytes(s) or b"" for s in table.text(ids)) == text.encode()
    assert tg.surface[gemma.bos_token_id] is None and tg.special[gemma.bos_token_id]


def test_dtw_equals_reference_on_real_tokens(real):
    smol, gemma, ts, tg, text = real
    a = [s for s in ts.text(smol(text)["input_ids"]) if s is not None][:160]
    b = [s for s in tg.text(gemma(text)["input_ids"]) if s is not None][:150]
    assert dtw_align(a, b).to_lists() == dtw_reference(a, b)
    assert dtw_align(a, b, engine="numpy").to_lists() == dtw_reference(a, b)


def test_bytes_and_dtw_agree_on_real_text(real):
    smol, gemma, ts, tg, text = real
    t_ids, s_ids = smol(text)["input_ids"], gemma(text)["input_ids"]
    (t0, t1), (s0, s1) = spans(ts, t_ids), spans(tg, s_ids)
    direct = match_positions(t0, t1, s0, s1)
    via = match_from_alignment(byte_align(t0, t1, s0, s1))
    assert (direct.src_pos == via.src_pos).all() and (direct.kind == via.kind).all()
    dtw = match_from_alignment(dtw_align_tokens(ts.text(t_ids), tg.text(s_ids)))
    agree = float((dtw.src_pos == direct.src_pos).mean())
    assert agree > 0.9, agree
    # where both match, the source token predicted starts at the same byte
    both = (dtw.src_pos >= 0) & (direct.src_pos >= 0)
    assert (s0[dtw.src_pos[both] + 1] == t0[np.flatnonzero(both) + 1]).mean() > 0.97


def test_mined_equals_brute_force_on_sampled_real_tokens(real):
    _, _, ts, tg, _ = real
    rng = np.random.default_rng(0)
    ids = [i for i in rng.choice(len(tg), 600, replace=False).tolist() if tg.surface[i] is not None][:200]
    sample = TokenTable([tg.surface[i] for i in ids], tg.special[ids], tg.byte_fallback[ids], {}, tg.family)
    got = mined_map(sample, ts)
    assert got.tolist() == mined_brute_force(sample.surface, ts).tolist()
    em = exact_map(sample, ts)
    assert all(ts.surface[em[i]] == sample.surface[i] for i in range(len(ids)) if em[i] >= 0)
