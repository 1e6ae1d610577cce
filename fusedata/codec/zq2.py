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

Where the model lives: in the `model` child of every row. All rows of a shard hold the same
bytes, which Parquet's dictionary encoding stores once per column chunk, so the file pays for
the model once; a row stays self-contained, so readers that filter or concatenate rows of
several shards (align reads source rows by document) decode them as before.

Layout: struct column `topk_zq2`, binary children, one value per window:
    hdr     24 bytes: magic b"FDZ2", u8 version, u8 reserved, u16 k, u32 n positions,
            u32 n words, u32 crc32 of the model, u32 crc32 of the stream
    model   b"FDM2" + LEB128 varints [k, (len, counts) of c0, d_1..d_{k-1}, gold rank,
            gold bits, tail bits; n ids, first id, id gaps, id counts] + u32 crc32
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
MODEL_MAGIC = b"FDM2"
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

    def __init__(self, k: int, dense: list[np.ndarray], id_values: np.ndarray, id_counts: np.ndarray) -> None:
        self.k = k
        self.dense = dense  # [c0, d_1..d_{k-1}, gold rank, gold bits, tail bits] counts
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
        body = MODEL_MAGIC + varint_encode(np.concatenate(parts).astype(np.int64)).tobytes()
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> Model:
        if len(blob) < 8 or blob[:4] != MODEL_MAGIC:
            raise CodecError("zq v2: bad model magic (not a zq v2 column, or corrupted)")
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
        dense = []
        for _ in range(k + 3):
            dense.append(take(int(take(1)[0])))
        d = int(take(1)[0])
        values = np.cumsum(take(d))
        counts = take(d)
        if p != data.size:
            raise CodecError("zq v2: model has trailing bytes (corrupted)")
        return cls(k, dense, values, counts)


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
                z = np.int64(0) if i == 0 else np.int64(1) << (i - 1)
                nraw = max(i - 1, 0)
                w_hi = max(nraw - RAW_CHUNK, 0)
                w_lo = min(nraw, RAW_CHUNK)
                rest = np.int64(0)
                for w in (w_hi, w_lo):
                    if w == 0:
                        continue
                    v = x & ((np.int64(1) << w) - 1)
                    x, p, ok = rans_take(x, words, p, end, np.int64(1), np.int64(0), w)
                    if not ok:
                        return r
                    rest = (rest << w) | v
                if field == 1:
                    gold_z[pos] = z + rest
                else:
                    tail_z[pos] = z + rest
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

    def encode(self, topk: TopK) -> dict[str, pa.Array]:
        n, k = topk.ids.shape
        self.check_k(k)
        codes, ids, rank, gold_z, tail_z = self._symbols(topk)
        model = Model.count(codes, ids, rank, gold_z, tail_z)
        model_bytes = model.to_bytes()

        # every position's symbols in decode order, as (start, freq, scale) slots [n, S]
        cols_start, cols_freq, cols_scale, cols_used = [], [], [], []

        def add(table: int, sym: np.ndarray, used: np.ndarray | None = None) -> None:
            cum, freq = model.cum[table], model.freq[table]
            cols_start.append(cum[sym])
            cols_freq.append(freq[sym])
            cols_scale.append(np.full(sym.shape, SCALE, np.int64))
            cols_used.append(np.ones(sym.shape, bool) if used is None else used)

        def add_raw(val: np.ndarray, width: np.ndarray, used: np.ndarray) -> None:
            for c in range(2):
                cols_start.append(val[:, c])
                cols_freq.append(np.ones(val.shape[0], np.int64))
                cols_scale.append(width[:, c])
                cols_used.append(used[:, c])

        add(0, codes[:, 0])
        delta = np.diff(codes, axis=1)
        for j in range(k - 1):
            add(1 + j, delta[:, j])
        id_idx = np.searchsorted(model.id_values, ids)  # [n, k] index of each id in the table
        for j in range(k):
            cols_start.append(model.id_cum[id_idx[:, j]])
            cols_freq.append(model.id_freq[id_idx[:, j]])
            cols_scale.append(np.full(n, SCALE, np.int64))
            cols_used.append(np.ones(n, bool))
        add(k, rank)
        outside = rank == 0
        gb = _bit_length(gold_z)
        add(k + 1, gb, outside)
        val, width, used = _raw_slots(gold_z, gb)
        add_raw(val, width, used & outside[:, None])
        tb = _bit_length(tail_z)
        add(k + 2, tb)
        add_raw(*_raw_slots(tail_z, tb))

        used_m = np.stack(cols_used, axis=1)  # [n, S]
        start = np.stack(cols_start, axis=1)[used_m]
        freq = np.stack(cols_freq, axis=1)[used_m]
        scale = np.stack(cols_scale, axis=1)[used_m]
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
            hdr += HDR.pack(MAGIC, self.version, 0, k, int(topk.lengths[w]),
                            int(word_off[w + 1] - word_off[w]), model_crc, crc)
        children = [
            _binary(np.frombuffer(bytes(hdr), np.uint8), np.arange(w_count + 1) * HDR.size),
            pa.array([model_bytes] * w_count, pa.binary()),
            _binary(stream, byte_off),
        ]
        return {COLUMN: pa.StructArray.from_arrays(children, fields=list(self.fields()[0].type))}

    def field_bits(self, topk: TopK) -> dict[str, float]:
        """Ideal code length (bits) of each field group of `topk` under the model encode() would
        store: how the single rANS stream divides between ids, log-probs, gold and tail (the
        benchmark reports them apart). The stream is within a few bytes per row of the sum."""
        codes, ids, rank, gold_z, tail_z = self._symbols(topk)
        model = Model.count(codes, ids, rank, gold_z, tail_z)
        k = codes.shape[1]

        def bits(freq: np.ndarray, sym: np.ndarray) -> float:
            return float(-np.log2(freq[sym] / float(1 << SCALE)).sum()) if sym.size else 0.0

        def zig(table: int, z: np.ndarray) -> float:
            b = _bit_length(z)
            return bits(model.freq[table], b) + float(np.maximum(b - 1, 0).sum())

        delta = np.diff(codes, axis=1)
        return {
            "ids": bits(model.id_freq, np.searchsorted(model.id_values, ids)),
            "logprobs": bits(model.freq[0], codes[:, 0]) + sum(bits(model.freq[j], delta[:, j - 1]) for j in range(1, k)),
            "gold": bits(model.freq[k], rank) + zig(k + 1, gold_z[rank == 0]),
            "tail": zig(k + 2, tail_z),
        }

    def model_bytes(self, topk: TopK) -> dict[str, int]:
        """Uncompressed bytes of the stored model: the id table and the other tables."""
        model = Model.count(*self._symbols(topk))
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
        models = pc.dictionary_encode(arr.field("model"))  # the rows of a shard share one model
        which = models.indices.to_numpy(zero_copy_only=False)
        for m, blob in enumerate(models.dictionary.to_pylist()):
            rows = np.flatnonzero(which == m)
            if np.any(rec["model_crc"][rows] != zlib.crc32(blob)):
                raise CodecError("zq v2: a row's model checksum disagrees with its header (corrupted data)")
            model = Model.from_bytes(blob)
            if model.k != k:
                raise CodecError(f"zq v2: model k={model.k} but caller expects k={k}")
            cum_off = np.concatenate([[0], np.cumsum([c.size for c in model.cum])]).astype(np.int64)
            cum_flat = np.concatenate(model.cum).astype(np.int64)
            # rows of one model are decoded in runs of consecutive rows (usually one run)
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for run in np.split(rows, breaks):
                if not run.size:
                    continue
                r0, r1 = int(run[0]), int(run[-1]) + 1
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
        lp[pad] = -np.inf
        return TopK(np.where(pad, PAD_ID, ids).astype(np.int32), lp, self.q.decode(gold), tail.astype(np.float32),
                    lengths)


__all__ = ["COLUMN", "CHILDREN", "HDR", "MAX_ID", "Model", "ZqV2Codec"]
