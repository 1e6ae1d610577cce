"""zq v2: lossless ids and KL-shaped log-prob codes, entropy-coded with a per-shard model.

Why: zq v1 leaves the entropy coding to Parquet's zstd, an order-0 byte coder that sees a
17-bit id as two or three unrelated bytes and a small log-prob delta as a whole byte, and
its log-prob grid is uniform, so it spends most codes on improbable entries that cost no KL.
v2 quantises on a grid uniform in sqrt(p) (`GridQuantiser`), counts the symbols of the batch
it is given (one shard: extract, align and fuse encode a shard at a time) into static
frequency tables, and rANS-codes each position's symbols (fusedata/codec/rans.py):

    c0          code of the top-1 log-prob               table over 0..max
    d_j         code delta c[j] - c[j-1], j = 1..k-1     one table per rank j
    id_j        the k ids, PAD included                  one table over the shard's distinct ids
    gold rank   j + 1 when the gold code equals c[j]     table over 0..k (0: outside the top-k)
    gold out    zigzag(gold code - c[k-1]) if rank 0     bit-length table + raw bits
    tail        zigzag(tail code - predicted code)       bit-length table + raw bits

The tail is predicted from the decoded log-probs (1 - sum exp), so extract output, whose tail
is exactly that, pays only for the quantisation error. It is coded on the log-prob grid
(tail_step 0, the default) or uniformly in ln t at tail_step (v1's rule). Ids and the number
of entries are exact; log-prob, gold and tail errors are bounded by the grid (`bound`).

Sampled targets (`extract --targets sampled:N`: an exact top-1 and entries of probability
(1 − p₁)·c/N, tail 0) are recognised per shard and get a layout of their own (`Sampled`): the
counts are coded exactly instead of each value on the grid, padding costs nothing, and the zero
tail is not coded; the model's magic (FDS2 instead of FDM2) says which layout a row has.

Where the model lives: in the `model` child of every row. All rows of a shard hold the same
bytes, which Parquet's dictionary encoding stores once per column chunk, so the file pays for
the model once; a row stays self-contained, so readers that filter or concatenate rows of
several shards (align reads source rows by document) decode them as before.

Layout: struct column `topk_zq2`, binary children, one value per window:
    hdr     24 bytes: magic b"FDZ2", u8 version, u8 reserved, u16 k, u32 n positions,
            u32 n words, u32 crc32 of the model, u32 crc32 of the stream
    model   b"FDM2" + LEB128 varints [k, (len, counts) of c0, d_1..d_{k-1}, gold rank,
            gold bits, tail bits; n ids, first id, id gaps, id counts] + u32 crc32
            (sampled: b"FDS2", tables exact code, exact index, rest residual, count_1..count_{k-1},
            gold rank, gold bits)
    stream  uint32 LE words of the row's rANS stream: its positions in order, each position's
            symbols in the order of the table above
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from fusedata.codec.base import Codec, CodecError, register
from fusedata.codec.rans import (
    RAW_CHUNK,
    SCALE,
    cumulative,
    encode_rows,
    normalise,
    rans_init,
    rans_symbol,
    rans_take,
    varint_decode,
    varint_encode,
)
from fusedata.codec.zq import MAX_ID, PAD_CODE, TAIL_ZERO, TAIL_ZERO_CODE, _binary, _unbinary
from fusedata.topk import PAD_ID, TopK

MAGIC = b"FDZ2"
MODEL_MAGIC = b"FDM2"  # the tables of a shard of top-k targets
SAMPLED_MAGIC = b"FDS2"  # the tables of a shard of sampled targets (`Sampled`)
HDR = struct.Struct("<4sBBHIIII")  # magic, version, reserved, k, n, n words, model crc32, stream crc32
COLUMN = "topk_zq2"
CHILDREN = ("hdr", "model", "stream")
MAX_K = 1024
MAX_CODE = 1 << 22  # log-prob codes beyond this (log-prob below ~ -1e6) are refused
GRID_END = 64.0  # the grid is uniform at coarse_step below lp = -GRID_END in any case


def _zigzag(v: np.ndarray) -> np.ndarray:
    return np.where(v >= 0, 2 * v, -2 * v - 1)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def _bit_length(z: np.ndarray) -> np.ndarray:
    """int64 bit length of non-negative ints (0 for 0)."""
    out = np.zeros(z.shape, np.int64)
    v = z.astype(np.int64).copy()
    while np.any(v):
        nz = v > 0
        out += nz
        v >>= 1
    return out


@njit(cache=True)
def _tail_of(lp, pad):  # pragma: no cover - compiled
    """float64 [n]: 1 - sum exp(lp [n, k]) over the non-pad entries, summed left to right
    (encoder and decoder run this same loop on the same decoded log-probs)."""
    n, k = lp.shape
    out = np.empty(n, np.float64)
    for i in range(n):
        s = 0.0
        for j in range(k):
            if not pad[i, j]:
                s += np.exp(np.float64(lp[i, j]))
        out[i] = 1.0 - s
    return out


class GridQuantiser:
    """Log-prob grid whose spacing follows the KL each value can cost.

    A top-k entry of probability p whose log-prob is off by d moves KL by about p * d^2 / 2,
    so a uniform log grid (v1) spends most of its codes on improbable entries that cost no KL.
    This grid is uniform in sqrt(p) instead, step `sqrt_step`: the log-prob spacing at p is
    2 * sqrt_step / sqrt(p), clamped to [step, coarse_step]. Codes count down from lp = 0;
    below the point where the spacing reaches coarse_step (or lp = -64) the grid is uniform. A value decodes
    to its nearest grid point, so |lp - lp_hat| <= half the spacing around it (`bound`).
    """

    def __init__(self, sqrt_step: float, step: float, coarse_step: float) -> None:
        if not (sqrt_step >= 0 and step > 0 and coarse_step >= step):
            raise ValueError("need sqrt_step >= 0, step > 0, coarse_step >= step")
        x = [0.0]  # -lp of the grid points, ascending
        while True:
            spacing = min(max(2 * sqrt_step * math.exp(x[-1] / 2), step), coarse_step)
            if spacing >= coarse_step or x[-1] >= GRID_END:
                break
            x.append(x[-1] + spacing)
        self.x = np.array(x)  # [G] the non-uniform part
        self.coarse_step = float(coarse_step)

    def encode(self, lp: np.ndarray) -> np.ndarray:
        """int64 codes (same shape) of log-probs; larger code = less likely."""
        if not np.all(np.isfinite(lp)):
            raise CodecError("zq v2: log-probs must be finite")
        x = np.maximum(-np.asarray(lp, np.float64), 0.0)
        g, last = self.x, self.x[-1]
        i = np.clip(np.searchsorted(g, x), 1, max(g.size - 1, 1)) if g.size > 1 else np.zeros(x.shape, np.int64)
        near = np.where(x - g[i - 1] <= g[i] - x, i - 1, i) if g.size > 1 else i
        beyond = g.size - 1 + np.rint((x - last) / self.coarse_step)
        return np.where(x >= last, np.maximum(beyond, g.size - 1), near).astype(np.int64)

    def decode(self, code: np.ndarray) -> np.ndarray:
        """float32 log-probs of codes."""
        c = np.asarray(code, np.int64)
        g = self.x
        inner = g[np.clip(c, 0, g.size - 1)]
        x = np.where(c < g.size, inner, g[-1] + (c - (g.size - 1)) * self.coarse_step)
        return (-x).astype(np.float32)

    def spacing(self, code: np.ndarray) -> np.ndarray:
        """float64 max distance from grid point `code` to either neighbour."""
        c = np.asarray(code, np.int64)
        here = -self.decode(c).astype(np.float64)
        up = np.where(c > 0, here + self.decode(np.maximum(c - 1, 0)).astype(np.float64), 0.0)
        down = -self.decode(c + 1).astype(np.float64) - here
        return np.maximum(up, down)

    def bound(self, lp: np.ndarray) -> np.ndarray:
        """The documented max |lp - decode(encode(lp))| for each value: half the spacing around it."""
        return self.spacing(self.encode(lp)) / 2 + 1e-6


class Model:
    """The frequency tables of one shard, with their cumulative starts at SCALE bits."""

    def __init__(self, k: int, dense: list[np.ndarray], id_values: np.ndarray, id_counts: np.ndarray,
                 sampled: bool = False) -> None:
        self.k, self.sampled = k, sampled
        # top-k: [c0, d_1..d_{k-1}, gold rank, gold bits, tail bits] counts; sampled targets (`Sampled`):
        # [exact code, exact index, rest residual, count_1..count_{k-1}, gold rank, gold bits]
        self.dense = dense
        self.id_values, self.id_counts = id_values.astype(np.int64), id_counts.astype(np.int64)
        try:
            self.freq = [normalise(c) for c in dense]
            self.id_freq = normalise(self.id_counts)
        except ValueError as exc:
            raise CodecError(f"zq v2: {exc}") from None
        self.cum = [cumulative(f) for f in self.freq]
        self.id_cum = cumulative(self.id_freq)

    @classmethod
    def count(cls, codes: np.ndarray, ids: np.ndarray, rank: np.ndarray, gold_z: np.ndarray,
              tail_z: np.ndarray) -> Model:
        k = codes.shape[1]
        dense = [np.bincount(codes[:, 0], minlength=1)]
        delta = np.diff(codes, axis=1)  # [n, k-1]
        dense += [np.bincount(delta[:, j], minlength=1) for j in range(k - 1)]
        dense += [np.bincount(rank, minlength=k + 1), np.bincount(_bit_length(gold_z), minlength=1),
                  np.bincount(_bit_length(tail_z), minlength=1)]
        values, counts = np.unique(ids, return_counts=True)
        return cls(k, dense, values, counts)

    def to_bytes(self) -> bytes:
        parts: list[np.ndarray] = [np.array([self.k])]
        for c in self.dense:
            parts += [np.array([c.size]), c]
        gaps = np.diff(self.id_values, prepend=0)
        parts += [np.array([self.id_values.size]), gaps, self.id_counts]
        magic = SAMPLED_MAGIC if self.sampled else MODEL_MAGIC
        body = magic + varint_encode(np.concatenate(parts).astype(np.int64)).tobytes()
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> Model:
        if len(blob) < 8 or blob[:4] not in (MODEL_MAGIC, SAMPLED_MAGIC):
            raise CodecError("zq v2: bad model magic (not a zq v2 column, or corrupted)")
        sampled = blob[:4] == SAMPLED_MAGIC
        if zlib.crc32(blob[:-4]) != struct.unpack("<I", blob[-4:])[0]:
            raise CodecError("zq v2: model checksum mismatch (corrupted data)")
        data = np.frombuffer(blob[4:-4], np.uint8)
        p = 0

        def take(n: int) -> np.ndarray:
            nonlocal p
            v, p = varint_decode(data, p, n)
            if p < 0:
                raise CodecError("zq v2: truncated model")
            return v

        k = int(take(1)[0])
        if not 1 <= k <= MAX_K or (sampled and k < 2):
            raise CodecError("zq v2: model k out of range (corrupted)")
        dense = []
        for _ in range(k + 4 if sampled else k + 3):
            dense.append(take(int(take(1)[0])))
        d = int(take(1)[0])
        values = np.cumsum(take(d))
        counts = take(d)
        if p != data.size:
            raise CodecError("zq v2: model has trailing bytes (corrupted)")
        return cls(k, dense, values, counts, sampled)


class Slots:
    """Every position's symbols in decode order, one column per symbol slot: (start, freq, scale)
    for rANS, a mask of the positions that send it, and the field group it codes (field_bits)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.group: list[str] = []
        self.start: list[np.ndarray] = []
        self.freq: list[np.ndarray] = []
        self.scale: list[np.ndarray] = []
        self.used: list[np.ndarray] = []

    def add(self, group: str, start: np.ndarray, freq: np.ndarray, scale: np.ndarray,
            used: np.ndarray | None = None) -> None:
        self.group.append(group)
        self.start.append(start)
        self.freq.append(freq)
        self.scale.append(scale)
        self.used.append(np.ones(start.shape, bool) if used is None else used)

    def table(self, group: str, t: int, sym: np.ndarray, used: np.ndarray | None = None) -> None:
        """A symbol of dense table t (positions outside `used` send nothing)."""
        sym = sym if used is None else np.where(used, sym, 0)
        self.add(group, self.model.cum[t][sym], self.model.freq[t][sym], np.full(sym.shape, SCALE, np.int64), used)

    def ids(self, ids: np.ndarray, used: np.ndarray | None = None) -> None:
        m = self.model
        idx = np.searchsorted(m.id_values, ids if used is None else np.where(used, ids, m.id_values[0]))
        self.add("ids", m.id_cum[idx], m.id_freq[idx], np.full(ids.shape, SCALE, np.int64), used)

    def zigzag(self, group: str, t: int, z: np.ndarray, used: np.ndarray | None = None) -> None:
        """A zigzag value: its bit length from table t, then the bits below the leading one, raw."""
        b = _bit_length(z)
        self.table(group, t, b, used)
        val, width, sent = _raw_slots(z, b)
        for c in range(2):
            self.add(group, val[:, c], np.ones(z.shape, np.int64), width[:, c],
                     sent[:, c] if used is None else sent[:, c] & used)


class Sampled:
    """The layout of sampled targets (`extract --targets sampled:N`, fusedata/stages/extract.py):
    per position one exact entry (the model's top-1, probability p) and entries whose probabilities
    are R·c/N, c >= 1 draws of N = k − 1, R = 1 − p; tail 0; padding after them.

    Coding their log-probs on the grid (the top-k layout) would round each R·c/N on its own, pay for
    the padding's ids and deltas, and code the zero tail against 1 − Σ of rounded values (~17 bits at
    half the positions). Here a position codes: the exact entry's grid code `g` and its index `e` in
    the list, the grid code of R as its difference from the code of 1 − p̂, the counts in order (one
    table per rank; the decoder stops when they reach N, so padding costs nothing), the ids of the
    real entries, then the gold rank / distance as in the top-k layout. The counts are exact, so the
    ratios between sampled entries are kept exactly and the only error is the grid's on p and R.
    """

    def __init__(self, codec: ZqV2Codec) -> None:
        self.q = codec.q

    @staticmethod
    def detect(topk: TopK) -> tuple[np.ndarray, np.ndarray] | None:
        """(exact index e [n], counts [n, k-1] of the other entries, 0 = padding) when every position
        has the sampled shape, else None."""
        n, k = topk.ids.shape
        if n == 0 or k < 2 or np.any(topk.tail_mass != 0):
            return None
        pad = topk.ids == PAD_ID  # [n, k]
        if np.any(pad[:, 0]) or np.any(pad[:, :-1] & ~pad[:, 1:]):
            return None
        lp = np.where(pad, 0.0, topk.logprobs.astype(np.float64))
        if not np.all(np.isfinite(lp)):
            return None
        p = np.where(pad, 0.0, np.exp(lp))  # [n, k]
        total, draws, slot = p.sum(axis=1), k - 1, np.arange(k)
        found = np.full(n, -1)
        counts = np.zeros((n, k), np.int64)
        for e in range(k):  # is entry e the exact one? then the others are whole multiples of R / N
            rest = total - p[:, e]  # [n]
            with np.errstate(divide="ignore", invalid="ignore"):
                c = p * draws / rest[:, None]  # [n, k]
            cr = np.rint(np.nan_to_num(c, nan=-1.0, posinf=-1.0))
            other = (slot != e)[None, :] & ~pad
            whole = np.where(other, (np.abs(c - cr) <= 1e-3) & (cr >= 1), True).all(axis=1)
            ok = (found < 0) & ~pad[:, e] & (rest > 0) & whole & (np.where(other, cr, 0).sum(axis=1) == draws)
            found[ok] = e
            counts[ok] = np.where(other[ok], cr[ok], 0).astype(np.int64)
        if np.any(found < 0):
            return None
        keep = slot[None, :] != found[:, None]
        others = counts[keep].reshape(n, k - 1)  # [n, k-1] in list order
        if np.any(np.diff(others, axis=1) > 0):
            return None
        return found, others

    def rest_prediction(self, g: np.ndarray) -> np.ndarray:
        """Grid code of 1 − p̂ (p̂: the exact entry as decoded), which R's code is coded against."""
        p = np.exp(self.q.decode(g).astype(np.float64))
        return self.q.encode(np.log(np.maximum(1.0 - p, 1e-30)))

    def values(self, e: np.ndarray, g: np.ndarray, r: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """float32 log-probs [n, k] as decoded: the exact entry at e, R̂·c/N at the others (in order),
        -inf padding; the exact entry clamped between its neighbours, so the list stays sorted."""
        n, draws = counts.shape
        k = draws + 1
        rest = np.exp(self.q.decode(r).astype(np.float64))  # [n]
        with np.errstate(divide="ignore"):
            other = np.where(counts > 0, np.log(rest[:, None] * counts / draws), -np.inf)  # [n, k-1]
        slot = np.arange(k)[None, :]
        src = np.clip(np.where(slot < e[:, None], slot, slot - 1), 0, k - 2)  # [n, k] index into other
        lp = np.take_along_axis(other, src, axis=1)
        rows, m = np.arange(n), (counts > 0).sum(axis=1)
        prev = np.where(e > 0, lp[rows, np.maximum(e - 1, 0)], np.inf)
        nxt = np.where(e < m, lp[rows, np.minimum(e + 1, k - 1)], -np.inf)
        lp[rows, e] = np.clip(self.q.decode(g).astype(np.float64), nxt, prev)
        return lp.astype(np.float32)

    def reference_codes(self, lp: np.ndarray) -> np.ndarray:
        """Grid codes [n, k] of decoded log-probs, padding repeating the last real entry: what the
        gold log-prob's rank and distance refer to."""
        real = np.isfinite(lp)
        idx = np.where(real, np.arange(lp.shape[1])[None, :], 0)
        np.maximum.accumulate(idx, axis=1, out=idx)
        return self.q.encode(np.take_along_axis(lp, idx, axis=1))

    def plan(self, topk: TopK, e: np.ndarray, counts: np.ndarray) -> tuple[Model, Slots]:
        n, k = topk.ids.shape
        rows = np.arange(n)
        lp = topk.logprobs.astype(np.float64)
        g = self.q.encode(lp[rows, e])  # [n]
        p = np.where(topk.ids == PAD_ID, 0.0, np.exp(np.where(topk.ids == PAD_ID, 0.0, lp)))
        r = self.q.encode(np.log(p.sum(axis=1) - p[rows, e]))  # [n] grid code of R
        rz = _zigzag(r - self.rest_prediction(g))
        ref = self.reference_codes(self.values(e, g, r, counts))
        gold = self.q.encode(topk.gold_logprob)
        if n and max(int(ref.max()), int(gold.max()), int(g.max()), int(r.max())) >= MAX_CODE:
            raise CodecError("zq v2: log-prob below the grid's range")
        eq = ref == gold[:, None]
        inside = eq.any(axis=1)
        rank = np.where(inside, eq.argmax(axis=1) + 1, 0).astype(np.int64)
        gold_z = np.where(inside, 0, _zigzag(gold - ref[:, -1]))
        ids = np.where(topk.ids == PAD_ID, PAD_CODE, topk.ids.astype(np.int64))
        real = topk.ids != PAD_ID
        dense = [np.bincount(g, minlength=1), np.bincount(e, minlength=k), np.bincount(rz, minlength=1)]
        dense += [np.bincount(counts[:, j][counts[:, j] > 0], minlength=1) for j in range(k - 1)]
        dense += [np.bincount(rank, minlength=k + 1), np.bincount(_bit_length(gold_z[~inside]), minlength=1)]
        values, id_counts = np.unique(ids[real], return_counts=True)
        model = Model(k, dense, values, id_counts, sampled=True)
        slots = Slots(model)
        slots.table("logprobs.exact_index", 1, e)
        slots.table("logprobs.exact", 0, g)
        slots.table("logprobs.rest", 2, rz)
        for j in range(k - 1):
            slots.table("logprobs.counts", 3 + j, counts[:, j], counts[:, j] > 0)
        for j in range(k):
            slots.ids(ids[:, j], real[:, j])
        slots.table("gold.rank", k + 2, rank)
        slots.zigzag("gold.outside", k + 3, gold_z, ~inside)
        return model, slots


def _raw_slots(z: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, ...]:
    """The raw bits below the leading one of each z (bit length `bits`), as two chunks
    (hi, lo): values, widths and a mask of the chunks that are sent. Each [n, 2]."""
    nraw = np.maximum(bits - 1, 0)  # [n]
    rest = z - np.where(bits > 0, np.int64(1) << np.maximum(bits - 1, 0), 0)
    w_hi = np.maximum(nraw - RAW_CHUNK, 0)
    w_lo = np.minimum(nraw, RAW_CHUNK)
    val = np.stack([rest >> w_lo, rest & ((np.int64(1) << w_lo) - 1)], axis=1)
    width = np.stack([w_hi, w_lo], axis=1)
    return val, width, width > 0


@njit(cache=True)
def _read_magnitude(x, words, p, end, i):  # pragma: no cover - compiled
    """The value whose bit-length symbol `i` was just decoded (0, or 2**(i-1) plus i-1 raw bits,
    read in at most two chunks of RAW_CHUNK): returns (value, x, p, ok)."""
    z = np.int64(0) if i == 0 else np.int64(1) << (i - 1)
    nraw = max(i - 1, 0)
    rest = np.int64(0)
    for w in (max(nraw - RAW_CHUNK, 0), min(nraw, RAW_CHUNK)):
        if w == 0:
            continue
        v = x & ((np.int64(1) << w) - 1)
        x, p, ok = rans_take(x, words, p, end, np.int64(1), np.int64(0), w)
        if not ok:
            return z, x, p, False
        rest = (rest << w) | v
    return z + rest, x, p, True


@njit(cache=True)
def _decode_rows(words, row_word_off, row_n, k, cum_flat, cum_off, id_cum, id_values,
                 codes, ids, rank, gold_z, tail_z, pos0):  # pragma: no cover - compiled
    """Decode rows into the output arrays from position pos0 on; returns the first bad row or -1."""
    pos = pos0
    for r in range(row_n.size):
        p, end = row_word_off[r], row_word_off[r + 1]
        if end - p < 2:
            return r
        x, p = rans_init(words, p)
        for _ in range(row_n[r]):
            for s in range(k):  # c0, then the k-1 deltas, each from its own table (tables 0..k-1)
                i, x, p, ok = rans_symbol(x, words, p, end, cum_flat[cum_off[s] : cum_off[s + 1]])
                if not ok:
                    return r
                codes[pos, s] = i if s == 0 else codes[pos, s - 1] + i
            for j in range(k):
                i, x, p, ok = rans_symbol(x, words, p, end, id_cum)
                if not ok:
                    return r
                ids[pos, j] = id_values[i]
            for field in range(3):  # gold rank, gold bits (rank 0 only), tail bits
                if field == 1 and rank[pos] != 0:
                    continue
                t = k + field
                i, x, p, ok = rans_symbol(x, words, p, end, cum_flat[cum_off[t] : cum_off[t + 1]])
                if not ok:
                    return r
                if field == 0:
                    rank[pos] = i
                    continue
                value, x, p, ok = _read_magnitude(x, words, p, end, i)
                if not ok:
                    return r
                if field == 1:
                    gold_z[pos] = value
                else:
                    tail_z[pos] = value
            pos += 1
        if x != (np.int64(1) << 31) or p != end:  # a clean stream ends in the initial state
            return r
    return -1


@njit(cache=True)
def _decode_rows_sampled(words, row_word_off, row_n, k, cum_flat, cum_off, id_cum, id_values,
                         e, g, rz, counts, ids, rank, gold_z, pos0):  # pragma: no cover - compiled
    """Decode rows of sampled targets (`Sampled`) from position pos0 on; returns the first bad row or -1."""
    draws = k - 1
    pos = pos0
    for r in range(row_n.size):
        p, end = row_word_off[r], row_word_off[r + 1]
        if end - p < 2:
            return r
        x, p = rans_init(words, p)
        for _ in range(row_n[r]):
            for t in (1, 0, 2):  # the exact entry's index and grid code, the rest mass's residual
                i, x, p, ok = rans_symbol(x, words, p, end, cum_flat[cum_off[t] : cum_off[t + 1]])
                if not ok:
                    return r
                if t == 1:
                    e[pos] = i
                elif t == 0:
                    g[pos] = i
                else:
                    rz[pos] = i
            left, m = draws, 0
            for j in range(draws):  # the counts, until they add up to the draws
                if left == 0:
                    break
                t = 3 + j
                i, x, p, ok = rans_symbol(x, words, p, end, cum_flat[cum_off[t] : cum_off[t + 1]])
                if not ok or i < 1 or i > left:
                    return r
                counts[pos, j] = i
                left -= i
                m += 1
            if left != 0 or e[pos] > m:
                return r
            for j in range(k):
                if j > m:
                    ids[pos, j] = PAD_CODE
                    continue
                i, x, p, ok = rans_symbol(x, words, p, end, id_cum)
                if not ok:
                    return r
                ids[pos, j] = id_values[i]
            t = k + 2
            i, x, p, ok = rans_symbol(x, words, p, end, cum_flat[cum_off[t] : cum_off[t + 1]])
            if not ok:
                return r
            rank[pos] = i
            if i == 0:  # gold below the list: bit length, then raw bits
                t = k + 3
                i, x, p, ok = rans_symbol(x, words, p, end, cum_flat[cum_off[t] : cum_off[t + 1]])
                if not ok:
                    return r
                gold_z[pos], x, p, ok = _read_magnitude(x, words, p, end, i)
                if not ok:
                    return r
            pos += 1
        if x != (np.int64(1) << 31) or p != end:  # a clean stream ends in the initial state
            return r
    return -1


@register
class ZqV2Codec(Codec):
    """zq v1's quantiser and lossless ids, rANS-coded with per-shard frequency tables."""

    name = "zq"
    version = 2
    opt_in = True  # --codec zq@2; not the default until it meets the 16 B/token goal (benchmarks/RESULTS-codec.md)

    def __init__(
        self,
        sqrt_step: float = 0.02,
        step: float = 1 / 32,
        coarse_step: float = 0.5,
        tail_step: float = 0.0,
        vocab_size: int | None = None,
        **extra: Any,
    ) -> None:
        if extra:
            raise CodecError(f"zq v{self.version}: unknown params {sorted(extra)}")
        super().__init__(sqrt_step=sqrt_step, step=step, coarse_step=coarse_step, tail_step=tail_step,
                         vocab_size=vocab_size)
        try:
            self.q = GridQuantiser(sqrt_step, step, coarse_step)
        except ValueError as exc:
            raise CodecError(f"zq v2: {exc}") from None
        if not tail_step >= 0:
            raise CodecError("zq v2: tail_step must be >= 0 (0: the log-prob grid)")
        self.tail_step = float(tail_step)
        self.vocab_size = vocab_size

    def _tail_codes(self, tail: np.ndarray) -> np.ndarray:
        """int64 codes of tail masses: on the log-prob grid (tail_step 0) or uniform in ln t at
        tail_step (v1's rule); TAIL_ZERO_CODE for t < 1e-30."""
        t = np.clip(np.asarray(tail, np.float64), TAIL_ZERO, 1.0)
        if self.tail_step:
            code = np.rint(-np.log(t) / self.tail_step).astype(np.int64)
        else:
            code = self.q.encode(np.log(t))
        return np.where(np.asarray(tail) < TAIL_ZERO, TAIL_ZERO_CODE, np.minimum(code, TAIL_ZERO_CODE - 1))

    def _tail_values(self, code: np.ndarray) -> np.ndarray:
        if np.any((code < 0) | (code > TAIL_ZERO_CODE)):
            raise CodecError("zq v2: tail code out of range (corrupted)")
        c = np.minimum(code, TAIL_ZERO_CODE - 1)
        t = np.exp(-c * self.tail_step) if self.tail_step else np.exp(self.q.decode(c).astype(np.float64))
        return np.where(code == TAIL_ZERO_CODE, 0.0, t)

    def fields(self) -> list[pa.Field]:
        return [pa.field(COLUMN, pa.struct([pa.field(c, pa.binary(), nullable=False) for c in CHILDREN]))]

    def check_k(self, k: int) -> None:
        if not 1 <= k <= MAX_K:
            raise CodecError(f"zq v2: k={k} outside 1..{MAX_K}")

    # -- encode ------------------------------------------------------------------------
    def _symbols(self, topk: TopK) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """codes [n, k], stored ids [n, k], gold rank [n], gold zigzag [n], tail zigzag [n]."""
        n, k = topk.ids.shape
        ids = topk.ids.astype(np.int64)  # [n, k]
        pad = ids == PAD_ID
        if np.any(pad[:, :-1] & ~pad[:, 1:]):
            raise CodecError("zq v2: padding entries must come last in a position")
        if np.any(pad[:, 0]):
            raise CodecError("zq v2: a position needs at least one real entry")
        ids = np.where(pad, PAD_CODE, ids)
        limit = min(self.vocab_size or PAD_CODE, PAD_CODE)
        if n and (ids.min() < 0 or ids[~pad].max(initial=0) >= limit):
            raise CodecError(f"zq v2: token ids outside [0, {limit})")
        lps = topk.logprobs.astype(np.float64)
        if pad.any():  # a pad repeats the previous log-prob (delta 0); decoded back to -inf
            lps = np.where(pad, np.nan, lps)
            idx = np.where(pad, 0, np.arange(k)[None, :])
            np.maximum.accumulate(idx, axis=1, out=idx)
            lps = np.take_along_axis(lps, idx, axis=1)
        if k > 1 and np.any(np.diff(lps, axis=1) > 0):
            raise CodecError("zq v2: log-probs must be sorted descending within a position")
        codes = self.q.encode(lps)  # [n, k] non-decreasing along k
        gold = self.q.encode(topk.gold_logprob)  # [n]
        if n and max(int(codes.max()), int(gold.max())) >= MAX_CODE:
            raise CodecError("zq v2: log-prob below the grid's range")
        eq = codes == gold[:, None]  # [n, k]
        inside = eq.any(axis=1)
        rank = np.where(inside, eq.argmax(axis=1) + 1, 0).astype(np.int64)  # [n]
        gold_z = np.where(inside, 0, _zigzag(gold - codes[:, -1]))  # [n]
        tail = topk.tail_mass.astype(np.float64)
        if not np.all(np.isfinite(tail)):
            raise CodecError("zq v2: tail mass must be finite")
        t_code = self._tail_codes(tail)
        pred = self._tail_codes(_tail_of(self.q.decode(codes), pad))
        tail_z = _zigzag(t_code - pred)
        return codes, ids, rank, gold_z, tail_z

    def _plan(self, topk: TopK) -> tuple[Model, Slots]:
        """The shard's model and every position's symbols in decode order (`Slots`): the sampled
        targets' layout (`Sampled`) when every position has their shape, else the top-k one."""
        shape = Sampled.detect(topk)
        if shape is not None:
            return Sampled(self).plan(topk, *shape)
        codes, ids, rank, gold_z, tail_z = self._symbols(topk)
        model = Model.count(codes, ids, rank, gold_z, tail_z)
        k = codes.shape[1]
        slots = Slots(model)
        slots.table("logprobs.top1", 0, codes[:, 0])
        delta = np.diff(codes, axis=1)
        for j in range(k - 1):
            slots.table("logprobs.deltas", 1 + j, delta[:, j])
        for j in range(k):
            slots.ids(ids[:, j])
        slots.table("gold.rank", k, rank)
        slots.zigzag("gold.outside", k + 1, gold_z, rank == 0)
        slots.zigzag("tail", k + 2, tail_z)
        return model, slots

    def encode(self, topk: TopK) -> dict[str, pa.Array]:
        self.check_k(topk.ids.shape[1])
        model, slots = self._plan(topk)
        model_bytes = model.to_bytes()
        used_m = np.stack(slots.used, axis=1)  # [n, S]
        start = np.stack(slots.start, axis=1)[used_m]
        freq = np.stack(slots.freq, axis=1)[used_m]
        scale = np.stack(slots.scale, axis=1)[used_m]
        per_pos = used_m.sum(axis=1)  # symbols per position
        pos_off = topk.offsets()
        sym_off = np.concatenate([[0], np.cumsum(per_pos)])[pos_off].astype(np.int64)  # [W+1]
        words, word_off = encode_rows(start.astype(np.int64), freq.astype(np.int64), scale.astype(np.int64), sym_off)
        stream = words.astype("<u4").view(np.uint8)

        w_count = len(topk.lengths)
        model_crc = zlib.crc32(model_bytes)
        byte_off = word_off * 4
        hdr = bytearray()
        for w in range(w_count):  # one loop step per window: crc32 and header
            crc = zlib.crc32(stream[byte_off[w] : byte_off[w + 1]])
            hdr += HDR.pack(MAGIC, self.version, 0, topk.k, int(topk.lengths[w]),
                            int(word_off[w + 1] - word_off[w]), model_crc, crc)
        children = [
            _binary(np.frombuffer(bytes(hdr), np.uint8), np.arange(w_count + 1) * HDR.size),
            pa.array([model_bytes] * w_count, pa.binary()),
            _binary(stream, byte_off),
        ]
        return {COLUMN: pa.StructArray.from_arrays(children, fields=list(self.fields()[0].type))}

    def field_bits(self, topk: TopK, fine: bool = False) -> dict[str, float]:
        """Ideal code length (bits) of each field group of `topk` under the model encode() would
        store: how the single rANS stream divides between ids, log-probs, gold and tail (the
        benchmark reports them apart; `fine`: their parts, e.g. "logprobs.deltas"). The stream is
        within a few bytes per row of the sum."""
        _, slots = self._plan(topk)
        out = {} if fine else dict.fromkeys(("ids", "logprobs", "gold", "tail"), 0.0)
        for group, freq, scale, used in zip(slots.group, slots.freq, slots.scale, slots.used, strict=True):
            name = group if fine else group.partition(".")[0]
            bits = float((scale[used] - np.log2(freq[used].astype(np.float64))).sum()) if used.any() else 0.0
            out[name] = out.get(name, 0.0) + bits
        return out

    def model_bytes(self, topk: TopK) -> dict[str, int]:
        """Uncompressed bytes of the stored model: the id table and the other tables."""
        model, _ = self._plan(topk)
        ids = varint_encode(np.concatenate([np.diff(model.id_values, prepend=0), model.id_counts]).astype(np.int64))
        return {"ids": int(ids.size), "other": len(model.to_bytes()) - int(ids.size)}

    # -- decode ------------------------------------------------------------------------
    def decode(self, columns: pa.Table, k: int) -> TopK:
        if COLUMN not in columns.column_names:
            raise CodecError(f"zq v2: column {COLUMN!r} missing")
        col = columns[COLUMN]
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        if names[: len(CHILDREN)] != list(CHILDREN):
            raise CodecError(f"zq v2: column {COLUMN!r} has children {names}, expected {list(CHILDREN)}")
        try:
            hdr_data, hdr_off = _unbinary(arr.field("hdr"))
            stream, s_off = _unbinary(arr.field("stream"))
        except CodecError as exc:
            raise CodecError(str(exc).replace("zq:", "zq v2:")) from None
        w_count = len(arr)
        if not np.array_equal(np.diff(hdr_off), np.full(w_count, HDR.size)):
            raise CodecError("zq v2: truncated or malformed header")
        rec = np.frombuffer(
            hdr_data.tobytes(),
            dtype=np.dtype([("magic", "S4"), ("version", "u1"), ("res", "u1"), ("k", "<u2"), ("n", "<u4"),
                            ("words", "<u4"), ("model_crc", "<u4"), ("crc", "<u4")]),
        )
        if np.any(rec["magic"] != MAGIC):
            raise CodecError("zq v2: bad magic; not a zq v2 top-k column or corrupted")
        bad = rec["version"] != self.version
        if np.any(bad):
            raise CodecError(f"zq v2: data version {int(rec['version'][bad][0])}, this reader is v{self.version}")
        if np.any(rec["k"] != k):
            raise CodecError(f"zq v2: stored k={int(rec['k'][0])} but caller expects k={k}")
        lengths = rec["n"].astype(np.int64)
        if not np.array_equal(np.diff(s_off), rec["words"].astype(np.int64) * 4):
            raise CodecError("zq v2: stream has the wrong length (truncated or corrupted)")
        for w in range(w_count):  # one loop step per window
            if zlib.crc32(stream[s_off[w] : s_off[w + 1]]) != int(rec["crc"][w]):
                raise CodecError(f"zq v2: checksum mismatch in row {w} (corrupted data)")

        n = int(lengths.sum())
        codes = np.zeros((n, k), np.int64)
        ids = np.zeros((n, k), np.int64)
        rank = np.zeros(n, np.int64)
        gold_z = np.zeros(n, np.int64)
        tail_z = np.zeros(n, np.int64)
        words = stream.view("<u4").astype(np.uint32) if stream.size else np.zeros(0, np.uint32)
        word_off = s_off // 4
        pos_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        sampled = np.zeros(n, bool)  # positions decoded with a sampled-targets model
        s_arrays = None  # their exact index, exact code, rest residual, counts
        models = pc.dictionary_encode(arr.field("model"))  # the rows of a shard share one model
        which = models.indices.to_numpy(zero_copy_only=False)
        for m, blob in enumerate(models.dictionary.to_pylist()):
            rows = np.flatnonzero(which == m)
            if np.any(rec["model_crc"][rows] != zlib.crc32(blob)):
                raise CodecError("zq v2: a row's model checksum disagrees with its header (corrupted data)")
            model = Model.from_bytes(blob)
            if model.k != k:
                raise CodecError(f"zq v2: model k={model.k} but caller expects k={k}")
            if model.sampled and s_arrays is None:
                s_arrays = (np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
                            np.zeros((n, k - 1), np.int64))
            cum_off = np.concatenate([[0], np.cumsum([c.size for c in model.cum])]).astype(np.int64)
            cum_flat = np.concatenate(model.cum).astype(np.int64)
            # rows of one model are decoded in runs of consecutive rows (usually one run)
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for run in np.split(rows, breaks):
                if not run.size:
                    continue
                r0, r1 = int(run[0]), int(run[-1]) + 1
                if model.sampled:
                    sampled[pos_off[r0] : pos_off[r1]] = True
                    bad_row = _decode_rows_sampled(words, word_off[r0 : r1 + 1], lengths[r0:r1], k, cum_flat,
                                                   cum_off, model.id_cum, model.id_values, *s_arrays, ids, rank,
                                                   gold_z, int(pos_off[r0]))
                else:
                    bad_row = _decode_rows(words, word_off[r0 : r1 + 1], lengths[r0:r1], k, cum_flat, cum_off,
                                           model.id_cum, model.id_values, codes, ids, rank, gold_z, tail_z,
                                           int(pos_off[r0]))
                if bad_row >= 0:
                    raise CodecError(f"zq v2: row {r0 + bad_row} does not decode (corrupted data)")

        if np.any(rank > k):
            raise CodecError("zq v2: gold rank out of range (corrupted)")
        pad = ids == PAD_CODE
        lp = self.q.decode(codes)
        inside = rank > 0
        gold = np.where(inside, codes[np.arange(n), np.maximum(rank - 1, 0)], codes[:, -1] + _unzigzag(gold_z))
        t_code = self._tail_codes(_tail_of(lp, pad)) + _unzigzag(tail_z)
        tail = self._tail_values(t_code)
        gold_lp = self.q.decode(gold)
        if s_arrays is not None and sampled.any():
            e, g, rz, counts = (a[sampled] for a in s_arrays)
            smp = Sampled(self)
            vals = smp.values(e, g, smp.rest_prediction(g) + _unzigzag(rz), counts)
            ref = smp.reference_codes(vals)
            rk = rank[sampled]
            s_gold = np.where(rk > 0, ref[np.arange(rk.size), np.maximum(rk - 1, 0)], ref[:, -1] + _unzigzag(gold_z[sampled]))
            lp[sampled], gold_lp[sampled], tail[sampled] = vals, self.q.decode(s_gold), 0.0
        lp[pad] = -np.inf
        return TopK(np.where(pad, PAD_ID, ids).astype(np.int32), lp, gold_lp, tail.astype(np.float32), lengths)


__all__ = ["COLUMN", "CHILDREN", "HDR", "MAX_ID", "Model", "ZqV2Codec"]
