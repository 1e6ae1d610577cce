"""A static-model range ANS (rANS) coder in numba, and the integer helpers its models need.

Why hand-written: the models here are static tables (one per shard, see zq2.py), so every
symbol's (start, freq) can be looked up with vectorised numpy before coding; what is left is
a tight loop per row that numba compiles (numba is already a dependency, see dtw.py). The
libraries considered either code one symbol per Python call for non-trivial models
(constriction's Python API takes whole arrays but one model per call) or are byte coders
with no notion of a symbol model (zstd, also for dictionaries).

The coder is rANS with a 64-bit state and 32-bit renormalisation (state in [2^31, 2^63), so
plain int64 arithmetic suffices): a symbol with frequency `f` of `2^scale` and cumulative
start `s` costs log2(2^scale / f) bits. The encoder runs over a row's symbols backwards and
writes words from the end of its buffer; the decoder then reads forwards. Every model's
frequencies are made from counts by `normalise`, integer arithmetic only, so encoder and
decoder rebuild the same table bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

L = np.int64(1 << 31)  # lower bound of the coder state
MASK32 = np.int64(0xFFFFFFFF)
SCALE = 24  # frequency precision of every model: frequencies sum to 2^SCALE
RAW_CHUNK = 16  # raw (uniformly coded) bits are sent in chunks of at most this many


def normalise(counts: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """int64 frequencies summing to 2^scale - 1, >= 1 wherever counts > 0, 0 elsewhere; the
    largest symbol absorbs the rounding. Integer-only, so deterministic across machines. (One
    short of 2^scale so that even a table of one symbol has f < 2^scale: the encoder's bound
    (L >> scale << 32) * f must stay below 2^63.)"""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    m = (1 << scale) - 1
    if total == 0:
        return np.zeros_like(counts)
    if int((counts > 0).sum()) > m // 2:
        raise ValueError(f"rans: {int((counts > 0).sum())} symbols do not fit {scale}-bit frequencies")
    f = np.where(counts > 0, np.maximum(1, (counts * m) // total), 0)  # counts * m < 2^63 for counts < 2^39
    top = int(np.argmax(f))
    f[top] += m - int(f.sum())
    if f[top] < 1:  # many rare symbols each rounded up to 1: take the excess from the largest ones
        f[top] = 1
        excess = int(f.sum()) - m
        for i in np.argsort(-f, kind="stable"):
            take = min(excess, int(f[i]) - 1)
            f[i] -= take
            excess -= take
            if not excess:
                break
    return f


def cumulative(freq: np.ndarray) -> np.ndarray:
    """int64 [n+1] cumulative starts of a frequency table."""
    return np.concatenate([[0], np.cumsum(freq)]).astype(np.int64)


@njit(cache=True)
def encode_rows(start, freq, scale, row_sym_off):  # pragma: no cover - compiled
    """rANS-encode each row's symbols (flat int64 arrays start/freq/scale, rows split by
    row_sym_off [R+1]). Returns the flat uint32 words and int64 row word offsets [R+1]."""
    n_rows = row_sym_off.size - 1
    out = np.empty(row_sym_off[-1] + 2 * n_rows, np.uint32)  # at most one word per symbol, plus the state
    row_word_off = np.zeros(n_rows + 1, np.int64)
    pos = 0
    for r in range(n_rows):
        lo, hi = row_sym_off[r], row_sym_off[r + 1]
        buf = np.empty(hi - lo + 2, np.uint32)
        p = buf.size
        x = L
        for i in range(hi - 1, lo - 1, -1):
            f, sc = freq[i], scale[i]
            x_max = ((L >> sc) << 32) * f
            if x >= x_max:
                p -= 1
                buf[p] = np.uint32(x & MASK32)
                x >>= 32
            x = ((x // f) << sc) + (x % f) + start[i]
        p -= 1
        buf[p] = np.uint32(x >> 32)
        p -= 1
        buf[p] = np.uint32(x & MASK32)
        m = buf.size - p
        out[pos : pos + m] = buf[p:]
        pos += m
        row_word_off[r + 1] = pos
    return out[:pos], row_word_off


@njit(cache=True)
def rans_init(words, p):  # pragma: no cover - compiled
    """The decoder state from the two words at p: (x, next word index)."""
    return np.int64(words[p]) | (np.int64(words[p + 1]) << 32), p + 2


@njit(cache=True)
def rans_take(x, words, p, end, f, c, sc):  # pragma: no cover - compiled
    """Advance the state past a symbol of frequency f whose slot c = x & (2^sc - 1) was
    already looked up (cum = start of that symbol). Returns (x, p, ok)."""
    x = f * (x >> sc) + c
    if x < L:
        if p >= end:
            return x, p, False
        x = (x << 32) | np.int64(words[p])
        p += 1
    return x, p, True


@njit(cache=True)
def lookup(cum, slot):  # pragma: no cover - compiled
    """Index of the symbol whose [cum[i], cum[i+1]) holds slot."""
    return np.searchsorted(cum, slot, side="right") - 1


@njit(cache=True)
def rans_symbol(x, words, p, end, cum):  # pragma: no cover - compiled
    """Decode one symbol of the table `cum` (cumulative frequencies scaled to 2^SCALE):
    (symbol index, x, p, ok); ok is False on a slot no symbol holds or a stream that ends early."""
    slot = x & ((np.int64(1) << SCALE) - 1)
    i = lookup(cum, slot)
    if i < 0 or i >= cum.size - 1 or cum[i + 1] == cum[i]:
        return i, x, p, False
    x, p, ok = rans_take(x, words, p, end, cum[i + 1] - cum[i], slot - cum[i], SCALE)
    return i, x, p, ok


@njit(cache=True)
def varint_encode(values):  # pragma: no cover - compiled
    """LEB128 bytes of non-negative int64 values."""
    out = np.empty(values.size * 10, np.uint8)
    p = 0
    for v in values:
        while v >= 128:
            out[p] = np.uint8((v & 127) | 128)
            v >>= 7
            p += 1
        out[p] = np.uint8(v)
        p += 1
    return out[:p]


@njit(cache=True)
def varint_decode(data, p, n):  # pragma: no cover - compiled
    """n LEB128 values from data at p: (int64 values, next index); index -1 if truncated."""
    out = np.empty(n, np.int64)
    for i in range(n):
        v = np.int64(0)
        shift = 0
        while True:
            if p >= data.size or shift > 56:
                return out, -1
            b = np.int64(data[p])
            p += 1
            v |= (b & 127) << shift
            shift += 7
            if b < 128:
                break
        out[i] = v
    return out, p
