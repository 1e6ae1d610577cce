"""Top-k codecs: round trips, the documented error bound, and clear errors on bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusedata.codec import CodecError, codec_from_schema, decode_topk, get_codec, zq2
from fusedata.codec.rans import SCALE, normalise
from fusedata.codec.zq import CHILDREN, COLUMN, HDR, PAYLOAD, Quantiser
from fusedata.topk import TopK


def synthetic_topk(
    n_windows: int = 6, k: int = 10, vocab: int = 50_000, seed: int = 0, max_len: int = 300
) -> TopK:
    """Realistic-ish top-k: Zipf ids (distinct within a position), sorted log-softmax values."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, n_windows).astype(np.int64)
    n = int(lengths.sum())
    ranks = rng.zipf(1.2, size=(n, 3 * k)) % vocab  # [n, 3k] draws, keep the first k distinct per row
    perm = rng.permutation(vocab)  # frequent tokens at arbitrary ids
    ids = np.empty((n, k), dtype=np.int32)
    for i in range(n):  # test data only
        _, first = np.unique(ranks[i], return_index=True)
        u = ranks[i][np.sort(first)]
        if len(u) < k:
            u = np.concatenate([u, np.setdiff1d(rng.choice(vocab, 3 * k, replace=False), u)])
        ids[i] = perm[u[:k]]
    logits = rng.normal(0, 3, size=(n, k)) * rng.uniform(0.3, 2.0, size=(n, 1))  # [n, k]
    logits = -np.sort(-logits, axis=1)
    tail_logit = logits[:, -1:] + np.log(rng.uniform(1, 5e4, size=(n, 1)))  # mass of the rest of the vocab
    z = np.logaddexp(np.logaddexp.reduce(logits, axis=1, keepdims=True), tail_logit)
    lp = (logits - z).astype(np.float32)  # [n, k] full-vocab log-softmax, descending
    tail = (1 - np.exp(lp.astype(np.float64)).sum(1)).astype(np.float32)
    gold = np.where(rng.random(n) < 0.7, lp[np.arange(n), rng.integers(0, k, n)], lp[:, -1] - rng.exponential(3, n))
    return TopK(ids, lp, gold.astype(np.float32), tail, lengths)


def roundtrip_parquet(codec, topk: TopK) -> TopK:
    table = pa.table(codec.encode(topk)).replace_schema_metadata(codec.metadata())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    read = pq.read_table(io.BytesIO(buf.getvalue()))
    return codec_from_schema(read.schema).decode(read, topk.k)


@pytest.mark.parametrize("k", [1, 2, 10, 64])
@pytest.mark.parametrize("name", ["raw", "zq"])
def test_roundtrip_ids_exact_and_error_bounded(name: str, k: int) -> None:
    t = synthetic_topk(k=k, vocab=262_144, seed=k)
    codec = get_codec(name)
    r = roundtrip_parquet(codec, t)
    assert np.array_equal(r.ids, t.ids) and r.ids.dtype == np.int32
    assert np.array_equal(r.lengths, t.lengths)
    if name == "raw":
        assert np.array_equal(r.logprobs, t.logprobs)
        return
    q = codec.q
    assert np.all(np.abs(r.logprobs - t.logprobs) <= q.bound(t.logprobs) + 1e-6)
    assert np.all(np.abs(r.gold_logprob - t.gold_logprob) <= q.bound(t.gold_logprob) + 1e-6)
    ok = t.tail_mass >= 1e-30
    assert np.all(np.abs(np.log(r.tail_mass[ok]) - np.log(t.tail_mass[ok])) <= codec.tail_step / 2 + 1e-6)
    assert np.all(np.diff(r.logprobs, axis=1) <= 0)  # still sorted


def test_kl_small_at_default_step() -> None:
    t = synthetic_topk(k=10)
    r = get_codec("zq").decode(pa.table(get_codec("zq").encode(t)), 10)
    p = np.exp(t.logprobs.astype(np.float64))
    p /= p.sum(1, keepdims=True)
    ph = np.exp(r.logprobs.astype(np.float64))
    ph /= ph.sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(ph))).sum(1)
    assert kl.mean() < 1e-3


def test_hand_computed_small_case() -> None:
    # step 0.5: codes of -x are round(x / 0.5); below x = 2 the step is 1
    codec = get_codec("zq", step=0.5, coarse_from=2.0, coarse_step=1.0, tail_step=0.5)
    lp = np.array([[-0.1, -0.6, -1.6, -4.4]], dtype=np.float32)
    assert codec.q.encode(lp).tolist() == [[0, 1, 3, 6]]  # 0.2->0, 1.2->1, 3.2->3, 4 + round(2.4)=6
    t = TopK(np.array([[7, 3, 70000, 1]], np.int32), lp, np.array([-1.6], np.float32),
             np.array([np.exp(-3.0)], np.float32), np.array([1]))
    col = codec.encode(t)[COLUMN]
    assert col.field("ids_lo")[0].as_py() == struct.pack("<4H", 7, 3, 70000 & 0xFFFF, 1)
    assert col.field("ids_hi")[0].as_py() == bytes([0, 0, 1, 0])
    assert col.field("lp0_b0")[0].as_py() == b"\x00"
    assert col.field("lp_delta")[0].as_py() == bytes([1, 2, 3])
    assert col.field("gold_rank")[0].as_py() == b"\x03"  # gold equals rank-3 code
    assert col.field("tail_b0")[0].as_py() == b"\x06"  # -ln t / 0.5 = 6
    r = codec.decode(pa.table({COLUMN: col}), 4)
    assert r.logprobs.tolist() == [[0.0, -0.5, -1.5, -4.0]]
    assert r.gold_logprob.tolist() == [-1.5]
    assert r.tail_mass[0] == pytest.approx(np.exp(-3.0))


def test_escapes_and_gold_far_below() -> None:
    codec = get_codec("zq", step=1 / 64, coarse_from=1000.0)
    lp = np.array([[-0.01, -30.0, -31.0], [-0.5, -0.6, -0.7]], dtype=np.float32)  # delta 1919 > 255
    gold = np.array([-80.0, -0.1], dtype=np.float32)  # both outside the top-k, one above it
    t = TopK(np.array([[1, 2, 3], [4, 5, 6]], np.int32), lp, gold, np.zeros(2, np.float32), np.array([2]))
    r = codec.decode(pa.table(codec.encode(t)), 3)
    assert np.abs(r.logprobs - lp).max() <= 1 / 128 + 1e-6
    assert np.abs(r.gold_logprob - gold).max() <= 1 / 128 + 1e-6
    assert r.tail_mass.tolist() == [0.0, 0.0]


def reference_decode(codec, columns: pa.Table, k: int) -> TopK:
    """A plain per-position decoder written from the layout description (no vectorisation)."""
    col = columns[COLUMN].combine_chunks()
    q = codec.q
    out_ids, out_lp, out_gold, out_tail, lengths = [], [], [], [], []
    for w in range(len(col)):
        row = {c: col.field(c)[w].as_py() for c in CHILDREN}
        _, _, _, _, n, _, _, _ = HDR.unpack(row["hdr"])
        esc = iter(struct.unpack(f"<{len(row['lp_esc']) // 4}I", row["lp_esc"]))
        gout = iter(struct.unpack(f"<{len(row['gold_out']) // 4}I", row["gold_out"]))
        for i in range(n):
            lo = struct.unpack_from(f"<{k}H", row["ids_lo"], 2 * i * k)
            ids = [lo[j] | row["ids_hi"][i * k + j] << 16 for j in range(k)]
            codes = [row["lp0_b0"][i] | row["lp0_b1"][i] << 8]
            for j in range(k - 1):
                d = row["lp_delta"][i * (k - 1) + j]
                codes.append(codes[-1] + (d + next(esc) if d == 255 else d))
            rank = row["gold_rank"][i]
            if rank:
                g = codes[rank - 1]
            else:
                z = next(gout)
                g = codes[-1] + (z // 2 if z % 2 == 0 else -(z + 1) // 2)
            tc = row["tail_b0"][i] | row["tail_b1"][i] << 8
            out_ids.append(ids)
            out_lp.append([float(q.decode(np.array(c))) for c in codes])
            out_gold.append(float(q.decode(np.array(g))))
            out_tail.append(0.0 if tc == 0xFFFF else float(np.exp(-tc * codec.tail_step)))
        lengths.append(n)
    return TopK(np.array(out_ids, np.int32).reshape(-1, k), np.array(out_lp, np.float32).reshape(-1, k),
                np.array(out_gold, np.float32), np.array(out_tail, np.float32), np.array(lengths, np.int64))


def test_vectorised_decode_equals_reference() -> None:
    codec = get_codec("zq", step=1 / 32)
    t = synthetic_topk(n_windows=4, k=5, max_len=60, seed=3)
    t.logprobs[0, 1:] -= 40  # force an escape
    t.tail_mass[1] = 0.0
    table = pa.table(codec.encode(t))
    fast, ref = codec.decode(table, 5), reference_decode(codec, table, 5)
    for a in ("ids", "logprobs", "gold_logprob", "tail_mass", "lengths"):
        np.testing.assert_array_equal(getattr(fast, a), getattr(ref, a), err_msg=a)


def test_quantiser_bound_holds_on_a_dense_grid() -> None:
    q = Quantiser(1 / 16, 8.0, 0.25)
    lp = -np.linspace(0, 40, 200_001)
    err = np.abs(q.decode(q.encode(lp)) - lp)
    assert np.all(err <= q.bound(lp) + 1e-5)


def _encoded(seed: int = 1) -> tuple[object, pa.StructArray]:
    codec = get_codec("zq")
    t = synthetic_topk(n_windows=3, seed=seed)
    t.logprobs[0, 1:] -= 100  # an escaped delta, so every stream holds bytes
    t.gold_logprob[0] = t.logprobs[0, -1] - 5  # and a gold value outside the top-k
    return codec, codec.encode(t)[COLUMN]


def _replace_child(col: pa.StructArray, name: str, values: list[bytes]) -> pa.Table:
    kids = [pa.array(values, pa.binary()) if c == name else col.field(c) for c in CHILDREN]
    return pa.table({COLUMN: pa.StructArray.from_arrays(kids, names=list(CHILDREN))})


@pytest.mark.parametrize("child", PAYLOAD)
def test_flipped_byte_is_detected(child: str) -> None:
    codec, col = _encoded()
    vals = col.field(child).to_pylist()
    w = next((i for i, v in enumerate(vals) if v), None)
    if w is None:
        pytest.skip(f"{child} empty in this sample")
    b = bytearray(vals[w])
    b[len(b) // 2] ^= 0x10
    vals[w] = bytes(b)
    with pytest.raises(CodecError):
        codec.decode(_replace_child(col, child, vals), 10)


@pytest.mark.parametrize("child", ["hdr", "ids_lo", "ids_hi", "lp_delta", "tail_b1"])
def test_truncated_stream_is_detected(child: str) -> None:
    codec, col = _encoded()
    vals = col.field(child).to_pylist()
    vals[1] = vals[1][:-1]
    with pytest.raises(CodecError, match="truncated|length|header"):
        codec.decode(_replace_child(col, child, vals), 10)


def test_truncated_parquet_file_fails_loudly() -> None:
    codec = get_codec("zq")
    buf = io.BytesIO()
    pq.write_table(pa.table(codec.encode(synthetic_topk())), buf, compression="zstd")
    with pytest.raises((CodecError, pa.ArrowInvalid, OSError)):
        codec.decode(pq.read_table(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2])), 10)


def test_unknown_version_in_data_is_refused() -> None:
    codec, col = _encoded()
    hdr = [bytearray(h) for h in col.field("hdr").to_pylist()]
    for h in hdr:
        h[4] = 9  # version byte
    with pytest.raises(CodecError, match="version 9"):
        codec.decode(_replace_child(col, "hdr", [bytes(h) for h in hdr]), 10)


def test_unknown_codec_version_in_schema_is_refused() -> None:
    schema = pa.schema([], metadata={b"fusedata.codec": b'{"name": "zq", "version": 99, "params": {}}'})
    with pytest.raises(CodecError, match="unknown codec 'zq' version 99"):
        codec_from_schema(schema, "x.parquet")


def test_wrong_k_and_missing_column() -> None:
    codec, col = _encoded()
    with pytest.raises(CodecError, match="k=10"):
        codec.decode(pa.table({COLUMN: col}), 12)
    with pytest.raises(CodecError, match="missing"):
        codec.decode(pa.table({"x": [1]}), 10)


def test_params_recorded_and_restored() -> None:
    codec = get_codec("zq", step=1 / 8, vocab_size=49_152)
    again = codec_from_schema(pa.schema([], metadata=codec.metadata()))
    assert again.params == codec.params and again.q.step == 1 / 8
    with pytest.raises(CodecError, match="unknown params"):
        get_codec("zq", bogus=1)


@pytest.mark.parametrize("bad", ["nan", "unsorted", "id"])
def test_bad_input_to_encode(bad: str) -> None:
    t = synthetic_topk(n_windows=2, k=4, max_len=10)
    if bad == "nan":
        t.logprobs[0, 0] = np.nan
    elif bad == "unsorted":
        t.logprobs[0] = t.logprobs[0][::-1].copy()
    else:
        t.ids[0, 0] = 1 << 24
    with pytest.raises(CodecError):
        get_codec("zq").encode(t)


def test_empty_and_checksum_is_crc32() -> None:
    codec = get_codec("zq")
    t = synthetic_topk(n_windows=1, k=3, max_len=5)
    col = codec.encode(t)[COLUMN]
    crc = 0
    for c in PAYLOAD:
        crc = zlib.crc32(col.field(c)[0].as_py(), crc)
    assert HDR.unpack(col.field("hdr")[0].as_py())[-1] == crc
    empty = TopK(np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32), np.zeros(0, np.float32),
                 np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert codec.decode(pa.table(codec.encode(empty)), 3).n_positions == 0


def test_zq_padding_entries_round_trip():
    """Merged (aligned/fused) distributions may list fewer than k ids: id -1, log-prob -inf."""
    from fusedata.codec import get_codec

    ids = np.array([[5, 3, -1, -1], [7, 1, 2, 9]], dtype=np.int32)
    lps = np.array([[-0.5, -1.0, -np.inf, -np.inf], [-0.1, -2.0, -3.0, -4.0]], dtype=np.float32)
    topk = TopK(ids, lps, np.array([-0.5, -2.0], np.float32), np.array([0.0, 0.1], np.float32), np.array([2], np.int64))
    codec = get_codec("zq")
    back = codec.decode(pa.table(codec.encode(topk)), 4)
    np.testing.assert_array_equal(back.ids, ids)
    assert np.isneginf(back.logprobs[0, 2:]).all()
    np.testing.assert_allclose(back.logprobs[np.isfinite(lps)], lps[np.isfinite(lps)], atol=1 / 32)


# -- zq v2 -----------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "data" / "codec"


def v2(**params) -> object:
    return get_codec("zq@2", **params)


def kl_mean(t: TopK, r: TopK) -> float:
    """Mean KL(p || p_hat) over the top-k plus a tail bucket, both renormalised."""
    p = np.concatenate([np.exp(t.logprobs.astype(np.float64)), t.tail_mass[:, None].astype(np.float64)], axis=1)
    ph = np.concatenate([np.exp(r.logprobs.astype(np.float64)), r.tail_mass[:, None].astype(np.float64)], axis=1)
    p, ph = p / p.sum(1, keepdims=True), ph / ph.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(p > 0, p * (np.log(p) - np.log(np.maximum(ph, 1e-300))), 0.0).sum(1).mean())


def test_v1_stays_the_default_and_v2_is_selected_by_name() -> None:
    assert get_codec("zq").version == 1 and get_codec("zq@2").version == 2 and get_codec("zq", 2).version == 2
    with pytest.raises(CodecError, match="version"):
        get_codec("zq@two")
    spec = v2().spec()
    assert spec["version"] == 2 and codec_from_schema(pa.schema([], metadata=v2().metadata())).version == 2


def test_v1_fixture_decodes_exactly_as_when_written() -> None:
    """A zq v1 file written by the code before v2 existed (tests/data/codec/make_v1_fixture.py)."""
    want = np.load(FIXTURES / "zq-v1-expected.npz")
    got = decode_topk(pq.read_table(FIXTURES / "zq-v1.parquet"))
    for name in ("ids", "logprobs", "gold_logprob", "tail_mass", "lengths"):
        np.testing.assert_array_equal(getattr(got, name), want[name], err_msg=name)
    np.testing.assert_array_equal(got.ids, want["original_ids"])


@pytest.mark.parametrize("k", [1, 2, 10, 64])
def test_v2_roundtrip_ids_exact_and_error_bounded(k: int) -> None:
    t = synthetic_topk(k=k, vocab=262_144, seed=k)  # ids above 2^17
    codec = v2()
    r = roundtrip_parquet(codec, t)
    assert np.array_equal(r.ids, t.ids) and r.ids.dtype == np.int32 and np.array_equal(r.lengths, t.lengths)
    q = codec.q
    assert np.all(np.abs(r.logprobs - t.logprobs) <= q.bound(t.logprobs))
    assert np.all(np.abs(r.gold_logprob - t.gold_logprob) <= q.bound(t.gold_logprob))
    ok = t.tail_mass >= 1e-30
    lt = np.log(t.tail_mass[ok].astype(np.float64))
    assert np.all(np.abs(np.log(r.tail_mass[ok]) - lt) <= q.bound(lt) + 1e-5)
    assert np.all(np.diff(r.logprobs, axis=1) <= 0)
    assert kl_mean(t, r) <= 1e-3


def test_v2_grid_bound_holds_and_follows_sqrt_p() -> None:
    q = zq2.GridQuantiser(0.02, 1 / 32, 0.5)
    lp = -np.linspace(0, 80, 200_001)
    err = np.abs(q.decode(q.encode(lp)) - lp)
    assert np.all(err <= q.bound(lp))
    # spacing 2 * 0.02 / sqrt(p), clamped to [1/32, 1/2]
    for x, want in [(0.0, 0.04), (1.0, 0.04 * np.exp(0.5)), (3.0, 0.04 * np.exp(1.5)), (20.0, 0.5)]:
        assert q.spacing(q.encode(np.array([-x])))[0] == pytest.approx(want, rel=0.15)


def test_v2_kl_within_goal_on_synthetic() -> None:
    t = synthetic_topk(k=10)
    r = v2().decode(pa.table(v2().encode(t)), 10)
    assert kl_mean(t, r) <= 1e-3


def test_v2_empty_page_and_empty_windows() -> None:
    codec = v2()
    empty = TopK(np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32), np.zeros(0, np.float32),
                 np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert codec.decode(pa.table(codec.encode(empty)), 3).n_positions == 0
    t = synthetic_topk(n_windows=3, k=3, max_len=5, seed=4)
    t = TopK.concat([TopK(t.ids[:0], t.logprobs[:0], t.gold_logprob[:0], t.tail_mass[:0], np.array([0])), t])
    r = roundtrip_parquet(codec, t)
    assert r.lengths.tolist() == t.lengths.tolist() and np.array_equal(r.ids, t.ids)


def test_v2_padding_entries_round_trip() -> None:
    ids = np.array([[5, 3, -1, -1], [7, 1, 2, 9], [4, -1, -1, -1]], dtype=np.int32)
    lps = np.array([[-0.5, -1.0, -np.inf, -np.inf], [-0.1, -2.0, -3.0, -4.0], [-0.2, -np.inf, -np.inf, -np.inf]],
                   dtype=np.float32)
    tail = np.array([0.0, 0.1, 0.3], np.float32)
    topk = TopK(ids, lps, np.array([-0.5, -2.0, -9.0], np.float32), tail, np.array([2, 1], np.int64))
    codec = v2()
    back = codec.decode(pa.table(codec.encode(topk)), 4)
    np.testing.assert_array_equal(back.ids, ids)
    assert np.isneginf(back.logprobs[ids == -1]).all()
    fin = np.isfinite(lps)
    assert np.all(np.abs(back.logprobs[fin] - lps[fin]) <= codec.q.bound(lps[fin]))
    assert back.tail_mass[0] == 0.0


def test_v2_largest_vocabulary_and_bad_ids() -> None:
    t = synthetic_topk(n_windows=2, k=4, vocab=262_144, seed=5, max_len=30)
    t.ids[:, 0] = 262_144 + 7 * np.arange(t.n_positions)  # ids up to 2^24: distinct from the others
    t.ids[0, 0] = (1 << 24) - 2  # the largest id a zq column stores
    assert np.array_equal(roundtrip_parquet(v2(), t).ids, t.ids)
    t.ids[0, 0] = (1 << 24) - 1
    with pytest.raises(CodecError, match="outside"):
        v2().encode(t)
    with pytest.raises(CodecError, match="outside"):
        v2(vocab_size=1000).encode(synthetic_topk(n_windows=1, k=2, vocab=5000, max_len=9))


def test_v2_rows_of_two_shards_filtered_and_concatenated() -> None:
    """align reads source rows by document from several shards: each row carries its model."""
    codec = v2()
    a, b = synthetic_topk(n_windows=4, seed=6, max_len=50), synthetic_topk(n_windows=3, seed=7, max_len=50)
    tables = [pa.table(codec.encode(x)) for x in (a, b)]
    mixed = pa.concat_tables([tables[0].take([3, 1]), tables[1].take([2]), tables[0].take([0])])
    r = codec.decode(mixed, 10)
    want = TopK.concat([a.window(3), a.window(1), b.window(2), a.window(0)])
    np.testing.assert_array_equal(r.ids, want.ids)
    np.testing.assert_array_equal(r.lengths, want.lengths)
    assert np.all(np.abs(r.logprobs - want.logprobs) <= codec.q.bound(want.logprobs))


def test_v2_model_is_stored_once_per_column_chunk() -> None:
    codec = v2()
    t = synthetic_topk(n_windows=40, seed=8, max_len=60)
    table = pa.table(codec.encode(t))
    model_bytes = len(table[zq2.COLUMN].combine_chunks().field("model")[0].as_py())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata.row_group(0)
    size = {meta.column(i).path_in_schema: meta.column(i).total_compressed_size for i in range(meta.num_columns)}
    assert size[f"{zq2.COLUMN}.model"] < 1.2 * model_bytes + 500  # not 40 copies


def _reference_decode_row(codec, hdr: bytes, model_blob: bytes, stream: bytes, k: int) -> dict[str, list]:
    """A plain rANS decoder of one v2 row, written from the layout description (Python ints)."""
    n = struct.unpack("<4sBBHIIII", hdr)[4]
    model = zq2.Model.from_bytes(model_blob)
    words = list(struct.unpack(f"<{len(stream) // 4}I", stream))
    x, p = words[0] | words[1] << 32, 2

    def take(freqs: np.ndarray, scale: int) -> int:
        nonlocal x, p
        cum = np.concatenate([[0], np.cumsum(freqs)])
        slot = x & ((1 << scale) - 1)
        s = int(np.searchsorted(cum, slot, side="right") - 1)
        x = int(freqs[s]) * (x >> scale) + slot - int(cum[s])
        if x < 1 << 31:
            x, p = x << 32 | words[p], p + 1
        return s

    def raw(bits: int) -> int:
        v = 0
        for w in (max(bits - 16, 0), min(bits, 16)):
            if w:
                v = v << w | take(np.ones(1 << w, np.int64), w)
        return v

    def zig(table: int) -> int:
        b = take(normalise(model.dense[table]), SCALE)
        return 0 if b == 0 else (1 << (b - 1)) + raw(b - 1)

    out: dict[str, list] = {"codes": [], "ids": [], "rank": [], "gold_z": [], "tail_z": []}
    for _ in range(n):
        codes = [take(normalise(model.dense[0]), SCALE)]
        for j in range(1, k):
            codes.append(codes[-1] + take(normalise(model.dense[j]), SCALE))
        out["codes"].append(codes)
        out["ids"].append([int(model.id_values[take(normalise(model.id_counts), SCALE)]) for _ in range(k)])
        rank = take(normalise(model.dense[k]), SCALE)
        out["rank"].append(rank)
        out["gold_z"].append(zig(k + 1) if rank == 0 else 0)
        out["tail_z"].append(zig(k + 2))
    assert x == 1 << 31 and p == len(words)
    return out


def test_v2_stream_matches_a_plain_reference_decoder() -> None:
    codec = v2()
    t = synthetic_topk(n_windows=2, k=4, seed=9, max_len=40)
    t.gold_logprob[0] = t.logprobs[0, -1] - 300  # gold far outside: raw bits in two chunks
    codes, ids, rank, gold_z, tail_z = codec._symbols(t)
    col = codec.encode(t)[zq2.COLUMN]
    off = t.offsets()
    for w in range(2):
        ref = _reference_decode_row(codec, col.field("hdr")[w].as_py(), col.field("model")[w].as_py(),
                                    col.field("stream")[w].as_py(), 4)
        s = slice(int(off[w]), int(off[w + 1]))
        assert ref["codes"] == codes[s].tolist() and ref["ids"] == ids[s].tolist()
        assert ref["rank"] == rank[s].tolist() and ref["gold_z"] == gold_z[s].tolist()
        assert ref["tail_z"] == tail_z[s].tolist()


def test_v2_stream_is_within_a_few_bytes_of_the_model_entropy() -> None:
    """rANS should cost the ideal code length of the symbols under the stored tables, plus the
    state flushed per row (8 bytes) and at most 4 bytes of renormalisation slack."""
    codec = v2()
    t = synthetic_topk(n_windows=5, seed=10, max_len=300)
    codes, ids, rank, gold_z, tail_z = codec._symbols(t)
    model = zq2.Model.count(codes, ids, rank, gold_z, tail_z)

    def bits(freq: np.ndarray, sym: np.ndarray) -> float:
        return float(-np.log2(freq[sym] / (1 << SCALE)).sum())

    k = t.k
    ideal = bits(model.freq[0], codes[:, 0]) + sum(bits(model.freq[j], np.diff(codes, axis=1)[:, j - 1])
                                                  for j in range(1, k))
    ideal += bits(model.id_freq, np.searchsorted(model.id_values, ids))
    ideal += bits(model.freq[k], rank)
    for table, z in ((k + 1, gold_z[rank == 0]), (k + 2, tail_z)):
        b = zq2._bit_length(z)
        ideal += bits(model.freq[table], b) + np.maximum(b - 1, 0).sum()
    got = 8 * sum(len(v) for v in codec.encode(t)[zq2.COLUMN].field("stream").to_pylist())
    assert ideal <= got <= ideal + 8 * 12 * len(t.lengths)


@pytest.mark.parametrize("child", ["hdr", "model", "stream"])
def test_v2_flipped_byte_is_detected(child: str) -> None:
    codec = v2()
    t = synthetic_topk(n_windows=3, seed=11)
    col = codec.encode(t)[zq2.COLUMN]
    vals = col.field(child).to_pylist()
    b = bytearray(vals[1])
    b[len(b) // 2] ^= 0x10
    vals[1] = bytes(b)
    kids = [pa.array(vals, pa.binary()) if c == child else col.field(c) for c in zq2.CHILDREN]
    with pytest.raises(CodecError):
        codec.decode(pa.table({zq2.COLUMN: pa.StructArray.from_arrays(kids, names=list(zq2.CHILDREN))}), 10)


def test_v2_refuses_bad_input_by_name() -> None:
    t = synthetic_topk(n_windows=1, k=3, max_len=5)
    t.logprobs[0] = t.logprobs[0][::-1].copy()
    with pytest.raises(CodecError, match="sorted"):
        v2().encode(t)
    with pytest.raises(CodecError, match="k=2000"):
        v2().check_k(2000)
    with pytest.raises(CodecError, match="unknown params"):
        get_codec("zq@2", coarse_from=8.0)
    good = synthetic_topk(n_windows=1, k=3, max_len=5)
    with pytest.raises(CodecError, match="k=3"):
        v2().decode(pa.table(v2().encode(good)), 4)


def sampled_topk(n_windows: int = 4, draws: int = 12, vocab: int = 400, seed: int = 0) -> TopK:
    """Sampled targets as extract makes them (fusedata/stages/extract.py sample_targets) from random
    logits, some peaked and some flat (there a drawn id outweighs the exact top-1 and comes first)."""
    import torch

    from fusedata.stages.extract import sample_targets

    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 80, n_windows).astype(np.int64)
    n = int(lengths.sum())
    logits = torch.from_numpy(rng.normal(0, 1, (n, vocab)) * rng.choice([0.3, 2.0, 6.0], (n, 1)))
    logp = torch.log_softmax(logits, dim=-1)
    ids, probs = sample_targets(logp, torch.from_numpy(rng.random((n, draws))))
    with np.errstate(divide="ignore"):
        lp = np.where(ids == -1, -np.inf, np.log(probs)).astype(np.float32)
    gold = logp[torch.arange(n), torch.from_numpy(rng.integers(0, vocab, n))].numpy().astype(np.float32)
    return TopK(ids.astype(np.int32), lp, gold, np.zeros(n, np.float32), lengths)


def test_v2_sampled_targets_keep_their_counts_exactly() -> None:
    """A shard of sampled targets gets the sampled layout: ids and padding exact, tail exactly 0, the
    sampled entries' ratios exactly their count ratios, each value within the grid's bound."""
    t = sampled_topk()
    codec = v2()
    col = codec.encode(t)[zq2.COLUMN]
    assert zq2.Model.from_bytes(col.field("model")[0].as_py()).sampled
    r = roundtrip_parquet(codec, t)
    assert np.array_equal(r.ids, t.ids) and np.array_equal(r.lengths, t.lengths)
    assert np.all(r.tail_mass == 0) and np.array_equal(np.isinf(r.logprobs), t.ids == -1)
    e, counts = zq2.Sampled.detect(t)
    assert np.any(e > 0)  # some positions have a drawn id ahead of the exact top-1
    real = t.ids != -1
    p, ph = np.exp(t.logprobs.astype(np.float64)), np.exp(r.logprobs.astype(np.float64))
    rows = np.arange(t.n_positions)
    for i in rows[:50]:  # plain per-position check of the decoded ratios
        others = [j for j in range(t.k) if real[i, j] and j != e[i]]
        c = np.array([p[i, j] for j in others]) / p[i, others[0]]
        np.testing.assert_allclose(np.array([ph[i, j] for j in others]) / ph[i, others[0]], c, rtol=1e-5)
    q = codec.q
    rest = np.log(p.sum(1) - p[rows, e])  # the sampled entries' total mass, what their error comes from
    with np.errstate(invalid="ignore"):  # -inf - -inf at the padding
        d = np.where(real, np.abs(r.logprobs - t.logprobs), 0.0)
    assert np.all(d[rows, e] <= q.bound(t.logprobs[rows, e]))
    assert np.all(d <= np.maximum(q.bound(rest), q.bound(t.logprobs[rows, e]))[:, None] + 1e-5)  # + float32
    assert np.all(np.abs(r.gold_logprob - t.gold_logprob) <= q.bound(t.gold_logprob))
    assert np.all(np.diff(np.where(real, r.logprobs, -1e30), axis=1) <= 0)  # still sorted
    assert kl_mean(t, r) <= 1e-3


def test_v2_sampled_layout_only_for_sampled_shapes_and_both_mix() -> None:
    """A position that is not a sampled target (one count off) keeps the shard on the top-k layout,
    still within the grid's bound; rows of a sampled and a top-k shard decode together."""
    t = sampled_topk(n_windows=2, seed=1)
    bent = TopK(t.ids.copy(), t.logprobs.copy(), t.gold_logprob, t.tail_mass, t.lengths)
    bent.logprobs[3, 1] += 0.2  # no longer (1 - p) * c / N
    bent.logprobs[3] = -np.sort(-bent.logprobs[3])
    assert zq2.Sampled.detect(bent) is None
    assert not zq2.Model.from_bytes(v2().encode(bent)[zq2.COLUMN].field("model")[0].as_py()).sampled
    top = synthetic_topk(n_windows=2, k=t.k, seed=2, max_len=30)
    both = pa.concat_tables([pa.table(v2().encode(t)), pa.table(v2().encode(top))])
    r = v2().decode(both, t.k)
    assert np.array_equal(r.ids, np.concatenate([t.ids, top.ids]))
    n = t.n_positions
    assert np.all(r.tail_mass[:n] == 0)
    assert np.all(np.abs(r.logprobs[n:] - top.logprobs) <= v2().q.bound(top.logprobs))


def test_v2_fixture_decodes_exactly_as_when_written() -> None:
    """A zq v2 file written before the sampled-targets layout existed (tests/data/codec/make_v2_fixture.py)."""
    want = np.load(FIXTURES / "zq-v2-expected.npz")
    got = decode_topk(pq.read_table(FIXTURES / "zq-v2.parquet"))
    for name in ("ids", "logprobs", "gold_logprob", "tail_mass", "lengths"):
        np.testing.assert_array_equal(getattr(got, name), want[name], err_msg=name)
    np.testing.assert_array_equal(got.ids, want["original_ids"])
