"""The compact top-k codec "zq": quantised, delta-coded log-probs and byte-plane ids.

Why this shape: top-k rows dominate a fusion dataset, and Parquet's zstd is an order-0
byte coder plus LZ. So the codec does no compression itself; it turns the numbers into
byte streams whose bytes are individually predictable and lets the Parquet column
compression (zstd, one column per stream, pages span many windows so the entropy tables
are amortised) do the rest. Everything is vectorised numpy; the only Python loop is one
crc32 per row (window).

Quantiser (documented error bound). A log-prob `lp <= 0` maps to the integer code
    c = round(x / step)                                  for x = -lp <= coarse_from
    c = round(coarse_from / step) + round((x - coarse_from) / coarse_step)   below that
and decodes to the grid point, so |lp - lp_hat| <= step / 2 for lp >= -coarse_from and
<= coarse_step / 2 below (tokens that far down carry < e^-coarse_from of the mass each).
Positive log-probs (float noise) are clamped to 0. The gold log-prob uses the same grid;
the tail mass t is coded as round(-ln t / tail_step), so |ln t - ln t_hat| <= tail_step / 2,
and t < TAIL_ZERO decodes to exactly 0. Ids are lossless.

Layout: one struct column `topk_zq` with binary children, one value per window:
    hdr      24 bytes: magic b"FDZQ", u8 version, u8 reserved, u16 k, u32 n positions,
             u32 n lp escapes, u32 n gold-outside, u32 crc32 of the other children's bytes
    ids_lo   uint16 LE low 16 bits of the ids, [n, k] row-major (kept interleaved: zstd finds
             repeated tokens as 2-byte matches, measured smaller than separate byte planes)
    ids_hi   uint8 bits 16..23 of the ids, [n, k] (all zero, so nearly free, when V <= 65536)
    lp0_b0, lp0_b1  byte planes of the uint16 code of the top-1 log-prob, [n]
    lp_delta        uint8 code deltas c[j] - c[j-1] >= 0, [n, k-1]; 255 = escape
    lp_esc          uint32 LE (delta - 255) for every escape, in order
    gold_rank       uint8 [n]: j + 1 when the gold code equals top-k code j, else 0
    gold_out        uint32 LE zigzag(gold code - code of rank k-1) for every 0 rank
    tail_b0, tail_b1  byte planes of the uint16 tail code, [n]; 0xFFFF = zero
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.codec.base import Codec, CodecError, register
from fusedata.topk import PAD_ID, TopK

MAGIC = b"FDZQ"
HDR = struct.Struct("<4sBBHIIII")  # magic, version, reserved, k, n, n_esc, n_gold_out, crc32
COLUMN = "topk_zq"
CHILDREN = (
    "hdr", "ids_lo", "ids_hi", "lp0_b0", "lp0_b1", "lp_delta", "lp_esc",
    "gold_rank", "gold_out", "tail_b0", "tail_b1",
)
PAYLOAD = CHILDREN[1:]  # covered by the crc32, in this order
ESC = 255
MAX_K = 254  # entries per position a zq column can hold
TAIL_ZERO = 1e-30
TAIL_ZERO_CODE = 0xFFFF
MAX_ID = 1 << 24
PAD_CODE = MAX_ID - 1  # how a padding id is stored; real ids are below it


class Quantiser:
    """The piecewise-uniform log-prob grid described in the module docstring."""

    def __init__(self, step: float, coarse_from: float, coarse_step: float) -> None:
        if not (step > 0 and coarse_step >= step and coarse_from >= 0):
            raise ValueError("need step > 0, coarse_step >= step, coarse_from >= 0")
        self.step, self.coarse_step = float(step), float(coarse_step)
        self.c_t = int(round(coarse_from / step))  # code of the boundary
        self.x_t = self.c_t * self.step  # boundary on the grid, so both pieces meet exactly

    def encode(self, lp: np.ndarray) -> np.ndarray:
        """Codes (int64, same shape) of log-probs; larger code = less likely."""
        if not np.all(np.isfinite(lp)):
            raise CodecError("zq: log-probs must be finite")
        x = np.maximum(-lp.astype(np.float64), 0.0)
        fine = np.rint(x / self.step)
        coarse = self.c_t + np.rint((x - self.x_t) / self.coarse_step)
        return np.where(x <= self.x_t, fine, coarse).astype(np.int64)

    def decode(self, code: np.ndarray) -> np.ndarray:
        """Log-probs (float32) of grid codes."""
        c = code.astype(np.float64)
        x = np.where(c <= self.c_t, c * self.step, self.x_t + (c - self.c_t) * self.coarse_step)
        return (-x).astype(np.float32)

    def bound(self, lp: np.ndarray) -> np.ndarray:
        """The documented max |lp - decode(encode(lp))| for each value."""
        return np.where(-lp <= self.x_t + self.step / 2, self.step / 2, self.coarse_step / 2)


def _planes(v: np.ndarray, n: int) -> list[np.ndarray]:
    """The low `n` byte planes of non-negative ints: n arrays uint8 of v's shape."""
    u = v.astype("<u4")
    return [((u >> (8 * b)) & 0xFF).astype(np.uint8) for b in range(n)]


def _unplane(planes: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(planes[0].shape, dtype=np.int64)
    for b, p in enumerate(planes):
        out |= p.astype(np.int64) << (8 * b)
    return out


def _zigzag(v: np.ndarray) -> np.ndarray:
    return np.where(v >= 0, 2 * v, -2 * v - 1)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def _binary(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A binary array whose row i is data[offsets[i]:offsets[i+1]] (bytes)."""
    return pa.Array.from_buffers(
        pa.binary(), len(offsets) - 1,
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(data).view(np.uint8))],
    )


def _unbinary(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint8 data and int64 row offsets [W+1] of a binary array (handles slices)."""
    if arr.null_count:
        raise CodecError("zq: null top-k value")
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    if len(off) and (off[-1] > data.size or np.any(np.diff(off) < 0)):
        raise CodecError("zq: malformed binary column")
    base = int(off[0]) if len(off) else 0
    return data[base : int(off[-1]) if len(off) else 0], off - base


@register
class ZqCodec(Codec):
    """Quantised log-probs (bounded error, see module docstring) and lossless byte-plane ids."""

    name = "zq"
    version = 1

    def __init__(
        self,
        step: float = 1 / 16,
        coarse_from: float = 8.0,
        coarse_step: float = 0.25,
        tail_step: float = 1 / 32,
        vocab_size: int | None = None,
        **extra: Any,
    ) -> None:
        if extra:
            raise CodecError(f"zq v{self.version}: unknown params {sorted(extra)}")
        super().__init__(
            step=step, coarse_from=coarse_from, coarse_step=coarse_step, tail_step=tail_step,
            vocab_size=vocab_size,
        )
        self.q = Quantiser(step, coarse_from, coarse_step)
        self.tail_step = float(tail_step)
        self.vocab_size = vocab_size

    def fields(self) -> list[pa.Field]:
        return [pa.field(COLUMN, pa.struct([pa.field(c, pa.binary(), nullable=False) for c in CHILDREN]))]

    def check_k(self, k: int) -> None:
        if not 1 <= k <= MAX_K:
            raise CodecError(f"zq: k={k} outside 1..{MAX_K}")

    # -- encode ------------------------------------------------------------------------
    def encode(self, topk: TopK) -> dict[str, pa.Array]:
        n, k = topk.ids.shape
        self.check_k(k)
        ids = topk.ids.astype(np.int64)  # [n, k]
        pad = ids == PAD_ID  # padding entries (a merged distribution with fewer than k ids)
        if np.any(pad[:, :-1] & ~pad[:, 1:]):
            raise CodecError("zq: padding entries must come last in a position")
        ids = np.where(pad, PAD_CODE, ids)
        limit = self.vocab_size or PAD_CODE
        if n and (ids.min() < 0 or ids[~pad].max(initial=0) >= limit):
            raise CodecError(f"zq: token ids outside [0, {limit})")
        lps = topk.logprobs.astype(np.float64)
        if pad.any():  # a pad repeats the previous log-prob (delta 0); decoded back to -inf
            if np.any(pad[:, 0]):
                raise CodecError("zq: a position needs at least one real entry")
            lps = np.where(pad, np.nan, lps)
            idx = np.where(pad, 0, np.arange(k)[None, :])
            np.maximum.accumulate(idx, axis=1, out=idx)
            lps = np.take_along_axis(lps, idx, axis=1)
        codes = self.q.encode(lps)  # [n, k] non-decreasing along k
        if k > 1 and np.any(np.diff(lps, axis=1) > 0):
            raise CodecError("zq: log-probs must be sorted descending within a position")
        if n and codes[:, 0].max() > 0xFFFF:
            raise CodecError("zq: top-1 log-prob below the grid's range")
        delta = np.diff(codes, axis=1)  # [n, k-1] >= 0
        esc_mask = delta >= ESC  # [n, k-1]
        lp_delta = np.minimum(delta, ESC).astype(np.uint8)
        gold = self.q.encode(topk.gold_logprob)  # [n]
        eq = codes == gold[:, None]  # [n, k]
        inside = eq.any(axis=1)
        gold_rank = np.where(inside, eq.argmax(axis=1) + 1, 0).astype(np.uint8)  # [n]
        gold_out = _zigzag(gold - codes[:, -1])[~inside]  # [n_out]
        tail = topk.tail_mass.astype(np.float64)
        if not np.all(np.isfinite(tail)):
            raise CodecError("zq: tail mass must be finite")
        t_code = np.rint(-np.log(np.clip(tail, TAIL_ZERO, 1.0)) / self.tail_step)
        t_code = np.where(tail < TAIL_ZERO, TAIL_ZERO_CODE, t_code)
        if np.any(t_code > TAIL_ZERO_CODE):
            raise CodecError("zq: tail_step too small for the tail range")

        # per-window offsets of every stream
        pos_off = topk.offsets()  # [W+1]
        win = np.repeat(np.arange(len(topk.lengths)), topk.lengths)  # [n] window of each position
        n_esc = np.bincount(win, weights=esc_mask.sum(axis=1), minlength=len(topk.lengths)).astype(np.int64)
        n_out = np.bincount(win[~inside], minlength=len(topk.lengths)).astype(np.int64)
        streams: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        streams["ids_lo"] = ((ids & 0xFFFF).astype("<u2").ravel().view(np.uint8), pos_off * k * 2)
        streams["ids_hi"] = ((ids >> 16).astype(np.uint8).ravel(), pos_off * k)
        for b, plane in enumerate(_planes(codes[:, 0], 2)):
            streams[f"lp0_b{b}"] = (plane, pos_off)
        streams["lp_delta"] = (lp_delta.ravel(), pos_off * (k - 1))
        esc_vals = (delta[esc_mask] - ESC).astype("<u4")
        streams["lp_esc"] = (esc_vals.view(np.uint8), np.concatenate([[0], np.cumsum(n_esc)]) * 4)
        streams["gold_rank"] = (gold_rank, pos_off)
        if np.any(gold_out > 0xFFFFFFFF):
            raise CodecError("zq: gold log-prob outside the grid's range")
        streams["gold_out"] = (gold_out.astype("<u4").view(np.uint8), np.concatenate([[0], np.cumsum(n_out)]) * 4)
        for b, plane in enumerate(_planes(t_code.astype(np.int64), 2)):
            streams[f"tail_b{b}"] = (plane, pos_off)

        hdr = bytearray()
        for w in range(len(topk.lengths)):  # one loop step per window: crc32 and header
            crc = 0
            for c in PAYLOAD:
                data, off = streams[c]
                crc = zlib.crc32(data[off[w] : off[w + 1]], crc)
            hdr += HDR.pack(MAGIC, self.version, 0, k, int(topk.lengths[w]), int(n_esc[w]), int(n_out[w]), crc)
        hdr_arr = np.frombuffer(bytes(hdr), dtype=np.uint8)
        children = [_binary(hdr_arr, np.arange(len(topk.lengths) + 1) * HDR.size)]
        children += [_binary(*streams[c]) for c in PAYLOAD]
        return {COLUMN: pa.StructArray.from_arrays(children, fields=list(self.fields()[0].type))}

    # -- decode ------------------------------------------------------------------------
    def decode(self, columns: pa.Table, k: int) -> TopK:
        if COLUMN not in columns.column_names:
            raise CodecError(f"zq: column {COLUMN!r} missing")
        col = columns[COLUMN]
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        if names[: len(CHILDREN)] != list(CHILDREN):
            raise CodecError(f"zq: column {COLUMN!r} has children {names}, expected {list(CHILDREN)}")
        flat = {c: _unbinary(arr.field(c)) for c in CHILDREN}
        hdr_data, hdr_off = flat["hdr"]
        w_count = len(arr)
        if not np.array_equal(np.diff(hdr_off), np.full(w_count, HDR.size)):
            raise CodecError("zq: truncated or malformed header")
        rec = np.frombuffer(
            hdr_data.tobytes(),
            dtype=np.dtype([("magic", "S4"), ("version", "u1"), ("res", "u1"), ("k", "<u2"), ("n", "<u4"),
                            ("n_esc", "<u4"), ("n_out", "<u4"), ("crc", "<u4")]),
        )
        if np.any(rec["magic"] != MAGIC):
            raise CodecError("zq: bad magic; not a zq top-k column or corrupted")
        bad = rec["version"] != self.version
        if np.any(bad):
            raise CodecError(f"zq: data version {int(rec['version'][bad][0])}, this reader is v{self.version}")
        if np.any(rec["k"] != k):
            raise CodecError(f"zq: stored k={int(rec['k'][0])} but caller expects k={k}")
        lengths = rec["n"].astype(np.int64)
        expect = {
            "lp0_b0": lengths, "lp0_b1": lengths, "gold_rank": lengths, "tail_b0": lengths, "tail_b1": lengths,
            "ids_lo": lengths * k * 2, "ids_hi": lengths * k, "lp_delta": lengths * (k - 1),
            "lp_esc": rec["n_esc"].astype(np.int64) * 4, "gold_out": rec["n_out"].astype(np.int64) * 4,
        }
        for c, want in expect.items():
            if not np.array_equal(np.diff(flat[c][1]), want):
                raise CodecError(f"zq: stream {c} has the wrong length (truncated or corrupted)")
        for w in range(w_count):  # one loop step per window
            crc = 0
            for c in PAYLOAD:
                data, off = flat[c]
                crc = zlib.crc32(data[off[w] : off[w + 1]], crc)
            if crc != int(rec["crc"][w]):
                raise CodecError(f"zq: checksum mismatch in row {w} (corrupted data)")

        n = int(lengths.sum())
        lo = flat["ids_lo"][0].view("<u2").astype(np.int64)  # [n * k]
        ids = (lo | flat["ids_hi"][0].astype(np.int64) << 16).reshape(n, k)  # [n, k]
        c0 = _unplane([flat["lp0_b0"][0], flat["lp0_b1"][0]])  # [n]
        delta = flat["lp_delta"][0].astype(np.int64).reshape(n, k - 1)  # [n, k-1]
        esc_mask = delta == ESC
        esc_vals = flat["lp_esc"][0].view("<u4").astype(np.int64)
        if esc_vals.size != int(esc_mask.sum()):
            raise CodecError("zq: escape count disagrees with the header")
        delta[esc_mask] += esc_vals
        codes = np.concatenate([c0[:, None], c0[:, None] + np.cumsum(delta, axis=1)], axis=1)  # [n, k]
        rank = flat["gold_rank"][0].astype(np.int64)  # [n]
        if np.any(rank > k):
            raise CodecError("zq: gold rank out of range (corrupted)")
        out = rank == 0
        gold_out = flat["gold_out"][0].view("<u4").astype(np.int64)
        if gold_out.size != int(out.sum()):
            raise CodecError("zq: gold count disagrees with the header")
        gold = codes[np.arange(n), np.maximum(rank - 1, 0)]
        gold[out] = codes[out, -1] + _unzigzag(gold_out)
        t_code = _unplane([flat["tail_b0"][0], flat["tail_b1"][0]])
        tail = np.where(t_code == TAIL_ZERO_CODE, 0.0, np.exp(-t_code * self.tail_step))
        pad = ids == PAD_CODE
        lp = self.q.decode(codes)
        lp[pad] = -np.inf
        return TopK(
            np.where(pad, PAD_ID, ids).astype(np.int32), lp, self.q.decode(gold), tail.astype(np.float32), lengths,
        )
