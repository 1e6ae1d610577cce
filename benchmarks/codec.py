"""Benchmark: bytes per token and reconstruction error of top-k codecs on real extract output.

Rerun:  .venv/bin/python benchmarks/codec.py [--tokens 20000] [--k 10 32 64] [--topk-dir DIR ...]
The first run executes `fusedata extract` with each bundled model over real text (the perplexity
paragraph + news articles, windows of 256 tokens, top-64, lossless `raw` codec) into
/tmp/codec_bench/ (or --cache); later runs reuse that output and take about a minute. `--topk-dir`
measures any extract output folder instead. Every layout is measured in the same run on the same data
and written the way the dataset writer writes shards (Parquet, zstd level 6) unless its name says
otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = ("smollm2-135m", "gemma3-270m")
KMAX = 64


def _documents() -> list[str]:
    """Real text: the perplexity check paragraph, then the demo corpus' news articles (gensim's Lee corpus)."""
    from fusedata.demo_corpus import news
    from fusedata.models.cache import PPL_TEXT_FILE

    return [PPL_TEXT_FILE.read_text(encoding="utf-8")] + [text for _, text in news()]


def extract_topk(model: str, n_tokens: int, cache: Path) -> Path:
    """`fusedata extract` (top-64, raw codec) of `model` over about n_tokens of real text, once."""
    from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract

    out = cache / f"extract-{model}-{n_tokens}"
    if (out / "_manifest.json").exists():
        return out
    corpus, chars = cache / f"corpus-{n_tokens}.jsonl", 0
    cache.mkdir(parents=True, exist_ok=True)
    with corpus.open("w", encoding="utf-8") as f:
        for i, doc in enumerate(_documents()):  # ~4.2 characters per token in English news
            f.write(json.dumps({"id": f"doc{i:04d}", "text": doc}) + "\n")
            chars += len(doc)
            if chars >= 4.2 * n_tokens:
                break
    config = ExtractConfig(model=model, top_k=KMAX, max_length=256, codec="raw", threads=2)
    run_extract(ExtractJob([str(corpus)], str(out), config))
    return out


# -- data -------------------------------------------------------------------------------

from fusedata.codec import decode_topk, get_codec, zq2  # noqa: E402
from fusedata.codec.zq import CHILDREN, COLUMN  # noqa: E402
from fusedata.topk import TopK, tail_mass  # noqa: E402


def targets_of(folder: Path) -> str:
    """The extract run's targets ("topk:K" or "sampled:N"; older runs: top-k)."""
    run = json.loads((folder / "_manifest.json").read_text())["run"]
    return run.get("targets") or f"topk:{run.get('top_k')}"


def topk_from_extract(folder: Path, k: int) -> tuple[TopK, int]:
    """The first k of an extract output's top-k; tail mass recomputed for k (log-probs are full-vocab).
    Sampled targets are taken whole (k = N + 1 entries; their tail is 0)."""
    table = pq.read_table(folder)
    t = decode_topk(table, like=folder)
    manifest = json.loads((folder / "_manifest.json").read_text())
    vocab = int(manifest["run"].get("vocab_size") or t.ids.max() + 1)
    if targets_of(folder).startswith("sampled"):
        return t, vocab
    if t.k < k:
        raise SystemExit(f"{folder} holds k={t.k} < {k}")
    lp = t.logprobs[:, :k]
    return TopK(t.ids[:, :k], lp, t.gold_logprob, tail_mass(lp), t.lengths), vocab


# -- layouts ----------------------------------------------------------------------------
# Each layout: encode(topk) -> (bytes per column group, total bytes, blob); decode(blob) -> TopK.

GROUPS = ("ids", "logprobs", "gold", "tail", "other")


def _parquet(table: pa.Table, level: int = 6, stats: bool = True) -> bytes:
    """Parquet bytes; stats=False turns min/max statistics off for struct (codec) columns, whose
    binary values would otherwise be copied into page headers and the footer."""
    buf = io.BytesIO()
    opts: dict[str, object] = {}
    if not stats:
        opts["write_statistics"] = [f.name for f in table.schema if not pa.types.is_struct(f.type)]
    pq.write_table(table, buf, compression="zstd", compression_level=level, **opts)
    return buf.getvalue()


def _parquet_groups(blob: bytes, group_of: Callable[[str], str]) -> dict[str, int]:
    """Compressed bytes per column group, from the Parquet footer."""
    meta = pq.ParquetFile(io.BytesIO(blob)).metadata
    out = dict.fromkeys(GROUPS, 0)
    for rg in range(meta.num_row_groups):
        g = meta.row_group(rg)
        for c in range(g.num_columns):
            col = g.column(c)
            name = group_of(col.path_in_schema)
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def _lists(t: TopK, id_type: pa.DataType, val_type: pa.DataType) -> pa.Table:
    """The reference layout: one row per window, list columns."""
    off = t.offsets()
    np_val = np.float16 if val_type == pa.float16() else np.float32
    np_id = np.int64 if id_type == pa.int64() else np.int32

    def lst(flat: np.ndarray, o: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(o.astype(np.int32)), pa.array(flat))

    return pa.table({
        "topk_ids": lst(t.ids.astype(np_id).ravel(), off * t.k),
        "topk_logprobs": lst(t.logprobs.astype(np_val).ravel(), off * t.k),
        "gold_logprob": lst(t.gold_logprob.astype(np_val), off),
        "tail_mass": lst(t.tail_mass.astype(np_val), off),
    })


def _from_lists(table: pa.Table, k: int) -> TopK:
    def flat(name: str) -> np.ndarray:
        return table[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)

    lengths = table["gold_logprob"].combine_chunks().value_lengths().to_numpy().astype(np.int64)
    return TopK(flat("topk_ids").astype(np.int32).reshape(-1, k), flat("topk_logprobs").astype(np.float32).reshape(-1, k),
                flat("gold_logprob").astype(np.float32), flat("tail_mass").astype(np.float32), lengths)


_LIST_GROUP = {"topk_ids": "ids", "topk_logprobs": "logprobs", "gold_logprob": "gold", "tail_mass": "tail"}


def _list_group(path: str) -> str:
    return _LIST_GROUP.get(path.split(".")[0], "other")


class Reference:
    """FuseLLM-style: int64 ids + fp16 values in Arrow lists, uncompressed Arrow IPC file."""

    name = "reference: int64 ids + fp16 lists, Arrow IPC"

    def encode(self, t: TopK) -> tuple[dict[str, int], int, bytes]:
        table = _lists(t, pa.int64(), pa.float16())
        sink = io.BytesIO()
        with ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        groups = dict.fromkeys(GROUPS, 0)
        for name in table.column_names:
            groups[_list_group(name)] += table[name].nbytes
        blob = sink.getvalue()
        groups["other"] = len(blob) - sum(groups.values())
        return groups, len(blob), blob

    def decode(self, blob: bytes, k: int) -> TopK:
        return _from_lists(ipc.open_file(io.BytesIO(blob)).read_all(), k)


class PlainParquet:
    """Parquet zstd over plain int32 / float16 lists (what a careful first version would write)."""

    name = "Parquet zstd-6, int32 + fp16 lists"

    def encode(self, t: TopK) -> tuple[dict[str, int], int, bytes]:
        blob = _parquet(_lists(t, pa.int32(), pa.float16()))
        g = _parquet_groups(blob, _list_group)
        g["other"] += len(blob) - sum(g.values())
        return g, len(blob), blob

    def decode(self, blob: bytes, k: int) -> TopK:
        return _from_lists(pq.read_table(io.BytesIO(blob)), k)


class BitPacked:
    """Ids bit-packed at ceil(log2 V) bits (numpy packbits), fp16 values, no compression."""

    def __init__(self, vocab: int) -> None:
        self.bits = max(1, math.ceil(math.log2(vocab)))
        self.name = f"bit-packed ids ({self.bits} bit) + fp16, no zstd"

    def encode(self, t: TopK) -> tuple[dict[str, int], int, bytes]:
        ids = t.ids.astype(np.uint32).ravel()  # [N*k]
        bits = ((ids[:, None] >> np.arange(self.bits, dtype=np.uint32)) & 1).astype(np.uint8)  # [N*k, b]
        packed = np.packbits(bits.ravel())
        lp = t.logprobs.astype(np.float16).tobytes()
        g, ta = t.gold_logprob.astype(np.float16).tobytes(), t.tail_mass.astype(np.float16).tobytes()
        blob = packed.tobytes() + lp + g + ta
        self._shape, self._n = t.ids.shape, packed.size
        self._lengths = t.lengths
        return {"ids": packed.size, "logprobs": len(lp), "gold": len(g), "tail": len(ta), "other": 0}, len(blob), blob

    def decode(self, blob: bytes, k: int) -> TopK:
        n = self._shape[0]
        packed = np.frombuffer(blob[: self._n], np.uint8)
        bits = np.unpackbits(packed)[: n * k * self.bits].reshape(-1, self.bits).astype(np.uint32)
        ids = (bits << np.arange(self.bits, dtype=np.uint32)).sum(1).astype(np.int32).reshape(n, k)
        rest = np.frombuffer(blob[self._n :], np.float16).astype(np.float32)
        return TopK(ids, rest[: n * k].reshape(n, k), rest[n * k : n * k + n], rest[n * k + n :], self._lengths)


_ZQ_GROUP = {c: ("ids" if c.startswith("ids") else "logprobs" if c.startswith("lp") else
                 "gold" if c.startswith("gold") else "tail" if c.startswith("tail") else "other")
             for c in CHILDREN}


class CodecLayout:
    """A registered fusedata codec, written as the dataset writer writes shards."""

    def __init__(self, name: str, level: int = 6, label: str = "", stats: bool = True, **params: object) -> None:
        self.codec = get_codec(name, **params)
        self.level, self.stats = level, stats
        self.name = label or f"codec {name} v{self.codec.version} (Parquet zstd-{level})"

    def encode(self, t: TopK) -> tuple[dict[str, int], int, bytes]:
        table = pa.table(self.codec.encode(t)).replace_schema_metadata(self.codec.metadata())
        blob = _parquet(table, self.level, self.stats)

        def group(path: str) -> str:
            if path.startswith(COLUMN + "."):
                return _ZQ_GROUP[path.split(".")[1]]
            if path.startswith(zq2.COLUMN + "."):
                return "v2." + path.split(".")[1]
            return _list_group(path)

        g = _parquet_groups(blob, group)
        g["other"] += len(blob) - sum(g.values())
        if isinstance(self.codec, zq2.ZqV2Codec):  # one stream: split it by each field's ideal code length
            stream, model = g.pop("v2.stream", 0), g.pop("v2.model", 0)
            g["other"] += g.pop("v2.hdr", 0)
            bits = self.codec.field_bits(t)
            for name, b in bits.items():
                g[name] += stream * b / sum(bits.values())
            mb = self.codec.model_bytes(t)
            g["ids"] += model * mb["ids"] / sum(mb.values())
            g["other"] += model * mb["other"] / sum(mb.values())
        return g, len(blob), blob

    def decode(self, blob: bytes, k: int) -> TopK:
        return self.codec.decode(pq.read_table(io.BytesIO(blob)), k)


class TopkLayout(CodecLayout):
    """zq v2 made to use its top-k layout even on sampled targets (what v2 did before it had the
    sampled layout): each value on the grid, padding coded, the zero tail coded against 1 − Σ p̂."""

    def encode(self, t: TopK) -> tuple[dict[str, int], int, bytes]:
        detect = zq2.Sampled.detect
        zq2.Sampled.detect = staticmethod(lambda topk: None)
        try:
            return super().encode(t)
        finally:
            zq2.Sampled.detect = staticmethod(detect)


class PerShard:
    """A layout applied to each real shard of the data on its own (as `fusedata extract` wrote
    them): the per-shard model of zq v2 is learnt from, and paid for by, one shard at a time."""

    def __init__(self, layout: CodecLayout, shard_windows: list[int]) -> None:
        self.layout, self.shard_windows = layout, shard_windows
        self.name = f"{layout.name}, per real shard ({len(shard_windows)} shards)"

    def _parts(self, t: TopK) -> list[TopK]:
        off, parts, w0 = t.offsets(), [], 0
        for w in self.shard_windows:
            s = slice(int(off[w0]), int(off[w0 + w]))
            parts.append(TopK(t.ids[s], t.logprobs[s], t.gold_logprob[s], t.tail_mass[s], t.lengths[w0 : w0 + w]))
            w0 += w
        return parts

    def encode(self, t: TopK) -> tuple[dict[str, float], int, list[bytes]]:
        groups, total, blobs = dict.fromkeys(GROUPS, 0.0), 0, []
        for part in self._parts(t):
            g, n, blob = self.layout.encode(part)
            for name, v in g.items():
                groups[name] += v
            total += n
            blobs.append(blob)
        return groups, total, blobs

    def decode(self, blobs: list[bytes], k: int) -> TopK:
        return TopK.concat([self.layout.decode(b, k) for b in blobs])


# -- measurement ------------------------------------------------------------------------


def errors(t: TopK, r: TopK) -> dict[str, float]:
    """max |d log-prob| over the top-k, and KL(p || p_hat) over top-k + tail bucket (renormalised)."""
    if not np.array_equal(t.ids, r.ids):
        raise SystemExit("ids differ: a layout is lossy on ids")
    lp, lph = t.logprobs.astype(np.float64), r.logprobs.astype(np.float64)
    p = np.concatenate([np.exp(lp), t.tail_mass.astype(np.float64)[:, None]], axis=1)  # [N, k+1]
    ph = np.concatenate([np.exp(lph), r.tail_mass.astype(np.float64)[:, None]], axis=1)
    p, ph = p / p.sum(1, keepdims=True), ph / ph.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(ph, 1e-300))), 0.0).sum(1)  # [N]
    real = np.isfinite(lp)  # padding entries (sampled targets with fewer distinct ids) are -inf on both sides
    if not np.array_equal(real, np.isfinite(lph)):
        raise SystemExit("padding differs: a layout lost or invented entries")
    with np.errstate(invalid="ignore"):
        dlp = np.where(real, np.abs(lp - lph), 0.0)
    return {
        "max_dlp": float(dlp.max()),
        "max_dgold": float(np.abs(t.gold_logprob.astype(np.float64) - r.gold_logprob).max()),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
    }


def measure(layout: object, t: TopK, repeats: int) -> dict[str, object]:
    n = t.n_positions
    raw_mb = n * (t.k * 8 + 8) / 1e6  # in-memory TopK (int32 ids, fp32 values) in MB
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        groups, total, blob = layout.encode(t)
        t1 = time.perf_counter()
        r = layout.decode(blob, t.k)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    e, d = min(enc), min(dec)
    return {"name": layout.name, "bpt": total / n, **{g: v / n for g, v in groups.items()}, **errors(t, r),
            "enc_mbs": raw_mb / e, "dec_mbs": raw_mb / d, "enc_tps": n / e, "dec_tps": n / d}


def layouts(vocab: int, shard_windows: list[int] | None = None) -> list[object]:
    v1 = CodecLayout("zq", stats=False, label="**zq v1 default** (step 1/16, 1/4 below -8; zstd-6, no stats)")
    v2 = CodecLayout("zq@2", stats=False, label="**zq v2 default** (rANS, sqrt-p grid 0.02; zstd-6, no stats)")
    per_shard = [PerShard(v1, shard_windows), PerShard(v2, shard_windows)] if shard_windows and len(shard_windows) > 1 else []
    return [
        Reference(),
        PlainParquet(),
        BitPacked(vocab),
        CodecLayout("raw"),
        CodecLayout("zq", label="zq v1 default, writer defaults (zstd-6, statistics on)"),
        v1,
        CodecLayout("zq", level=19, stats=False, label="zq v1 default, zstd-19, no stats"),
        CodecLayout("zq", stats=False, label="zq v1 step 1/8 uniform (zstd-6, no stats)", step=1 / 8,
                    coarse_step=1 / 8),
        CodecLayout("zq", stats=False, label="zq v1 step 1/32, 1/8 below -8 (zstd-6, no stats)", step=1 / 32,
                    coarse_step=1 / 8),
        v2,
        CodecLayout("zq@2", stats=False, label="zq v2, sqrt-p grid 0.015", sqrt_step=0.015),
        CodecLayout("zq@2", stats=False, label="zq v2, sqrt-p grid 0.03, coarse 1", sqrt_step=0.03, coarse_step=1.0),
        CodecLayout("zq@2", stats=False, label="zq v2, uniform grid 1/16, tail 1/32 (v1's error, rANS only)",
                    sqrt_step=0.0, step=1 / 16, coarse_step=1 / 16, tail_step=1 / 32),
        *[CodecLayout("zq@2", stats=False, label=f"zq v2, sqrt-p grid {s}", sqrt_step=s) for s in (0.025, 0.0275)],
        *per_shard,
        *([PerShard(TopkLayout("zq@2", stats=False, label="zq v2 top-k layout forced"), shard_windows)]
          if shard_windows and len(shard_windows) > 1 else []),
        *([PerShard(CodecLayout("zq@2", stats=False, label=f"zq v2, sqrt-p grid {s}", sqrt_step=s), shard_windows)
           for s in (0.025, 0.0275)] if shard_windows and len(shard_windows) > 1 else []),
    ]


def _fmt(x: float) -> str:
    return f"{x:.1e}" if x and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.3g}"


def table_md(model: str, k: int, n: int, w: int, rows: list[dict[str, object]]) -> str:
    head = (f"\n### {model}, k={k} ({n} positions, {w} windows)\n\n"
            "| layout | B/token | ids | logprobs | gold | tail | other | max abs d-lp | KL mean | KL max "
            "| enc MB/s | dec MB/s | enc ktok/s | dec ktok/s |\n|---" + "|---:" * 13 + "|\n")
    body = ""
    for r in rows:
        body += (f"| {r['name']} | **{r['bpt']:.2f}** | {r['ids']:.2f} | {r['logprobs']:.2f} | {r['gold']:.2f} "
                 f"| {r['tail']:.2f} | {r['other']:.2f} | {_fmt(r['max_dlp'])} | {_fmt(r['kl_mean'])} "
                 f"| {_fmt(r['kl_max'])} | {r['enc_mbs']:.0f} | {r['dec_mbs']:.0f} | {r['enc_tps'] / 1e3:.0f} "
                 f"| {r['dec_tps'] / 1e3:.0f} |\n")
    return head + body


# -- where zq v2's bytes go, and how fast the codecs are ---------------------------------


def _column_sizes(blob: bytes) -> tuple[dict[str, int], int]:
    """Compressed bytes per leaf column (last path element) and the file's total."""
    meta = pq.ParquetFile(io.BytesIO(blob)).metadata
    sizes: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        g = meta.row_group(rg)
        for c in range(g.num_columns):
            leaf = g.column(c).path_in_schema.split(".")[-1]
            sizes[leaf] = sizes.get(leaf, 0) + g.column(c).total_compressed_size
    return sizes, len(blob)


def v2_breakdown(t: TopK, shard_windows: list[int]) -> dict[str, float]:
    """Where zq v2's bytes go when each real shard is written on its own (B/position): the rANS
    stream's parts at their ideal code length under the stored tables, the stream's overhead (state
    flushed per row, renormalisation slack), the stored tables (id table / the others, each the
    compressed `model` column split by uncompressed size), the row headers, Parquet's footer and
    page headers."""
    codec = get_codec("zq@2")
    out: dict[str, float] = {}

    def add(name: str, v: float) -> None:
        out[name] = out.get(name, 0.0) + v

    for part in PerShard(CodecLayout("zq@2"), shard_windows)._parts(t):
        table = pa.table(codec.encode(part)).replace_schema_metadata(codec.metadata())
        sizes, total = _column_sizes(_parquet(table, 6, stats=False))
        bits = codec.field_bits(part, fine=True)
        for name, b in bits.items():
            add(f"stream: {name}", b / 8)
        add("stream: rANS state and slack", sizes["stream"] - sum(bits.values()) / 8)
        mb = codec.model_bytes(part)
        add("tables: id table", sizes["model"] * mb["ids"] / sum(mb.values()))
        add("tables: the others", sizes["model"] * mb["other"] / sum(mb.values()))
        add("row headers (hdr)", sizes["hdr"])
        add("Parquet footer and page headers", total - sum(sizes.values()))
    return {name: v / t.n_positions for name, v in out.items()}


def codec_speed(t: TopK, shard_windows: list[int], repeats: int) -> list[dict[str, object]]:
    """The codecs alone (no Parquet): encode, then decode, every real shard; best of `repeats`
    (numba is compiled or loaded before, see `numba_first_call`)."""
    parts = PerShard(CodecLayout("zq"), shard_windows)._parts(t)
    raw_mb = t.n_positions * (t.k * 8 + 8) / 1e6
    rows = []
    for name in ("zq", "zq@2"):
        codec = get_codec(name)
        enc, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cols = [pa.table(codec.encode(p)) for p in parts]
            t1 = time.perf_counter()
            for c in cols:
                codec.decode(c, t.k)
            enc.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
        e, d = min(enc), min(dec)
        rows.append({"codec": f"{codec.name} v{codec.version}", "enc_mbs": raw_mb / e, "dec_mbs": raw_mb / d,
                     "enc_kpos_s": t.n_positions / e / 1e3, "dec_kpos_s": t.n_positions / d / 1e3,
                     "load": os.getloadavg()[0]})
    return rows


_FIRST_CALL = """
import json, time
t0 = time.perf_counter()
import numpy as np, pyarrow as pa
from fusedata.codec import get_codec
from fusedata.topk import TopK
t1 = time.perf_counter()
c = get_codec("zq@2")
for t in (TopK(np.array([[3, 1]], np.int32), np.array([[-0.1, -3.0]], np.float32), np.array([-0.1], np.float32),
               np.array([0.05], np.float32), np.array([1])),
          TopK(np.array([[5, 3, 7]], np.int32), np.log(np.array([[0.5, 0.25, 0.25]], np.float32)),
               np.array([-0.7], np.float32), np.array([0.0], np.float32), np.array([1]))):
    c.decode(pa.table(c.encode(t)), t.k)
print(json.dumps({"import_s": t1 - t0, "first_call_s": time.perf_counter() - t1}))
"""


def numba_first_call() -> dict[str, float]:
    """Seconds of zq v2's first encode + decode (top-k and sampled) in a fresh process: with an
    empty numba cache (everything compiled) and again with that cache filled (loaded)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        run = [sys.executable, "-c", _FIRST_CALL]
        cold = json.loads(subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout)
        warm = json.loads(subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout)
    return {"compile_s": cold["first_call_s"], "cached_s": warm["first_call_s"], "import_s": warm["import_s"],
            "load": os.getloadavg()[0]}


# -- how small can lossless ids be? ------------------------------------------------------


def context_tokens(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """For every position: the current input token and the actual next token (both known to a decoder
    that holds the dataset's `input_ids` column)."""
    cur, nxt = [], []
    for row in pq.read_table(folder, columns=["input_ids"])["input_ids"].to_pylist():
        cur.append(np.asarray(row[:-1], np.int64))
        nxt.append(np.asarray(row[1:], np.int64))
    return np.concatenate(cur), np.concatenate(nxt)


def ppm_bits(ids: np.ndarray, contexts: list[np.ndarray], vocab: int) -> float:
    """Ideal code length (bits) of the ids [N, k] under an adaptive PPM model (escape method C,
    exclusion of ids already coded at the position and of symbols seen in higher orders): the
    contexts in order, then order 0, then uniform over the vocabulary. One pass, as a decoder would."""
    from collections import Counter, defaultdict

    tables = [defaultdict(Counter) for _ in contexts]
    order0: Counter = Counter()
    bits, log_v = 0.0, math.log2(vocab)
    for i in range(ids.shape[0]):
        keys = [int(c[i]) for c in contexts]
        for j in range(ids.shape[1]):
            x, seen = int(ids[i, j]), set(int(y) for y in ids[i, :j])
            for tab in [*(t[key] for t, key in zip(tables, keys, strict=True)), order0]:
                items = [(y, n) for y, n in tab.items() if y not in seen]
                total, distinct = sum(n for _, n in items), len(items)
                if not total:
                    continue
                n = 0 if x in seen else tab.get(x, 0)
                if n:
                    bits -= math.log2(n / (total + distinct))
                    break
                bits -= math.log2(distinct / (total + distinct))
                seen.update(y for y, _ in items)
            else:
                bits += log_v
            for tab in [*(t[key] for t, key in zip(tables, keys, strict=True)), order0]:
                tab[x] += 1
    return bits


def id_bounds(t: TopK, folder: Path, vocab: int) -> dict[str, float]:
    """Bytes per position that the k ids alone would need under a few models of their statistics."""
    _, counts = np.unique(t.ids, return_counts=True)
    p = counts / counts.sum()
    cur, nxt = context_tokens(folder)
    n = t.n_positions
    return {
        "order-0 entropy, model free (table not counted)": float(-(p * np.log2(p)).sum()) * t.k / 8,
        "adaptive order 0": ppm_bits(t.ids, [], vocab) / n / 8,
        "adaptive, context: current token": ppm_bits(t.ids, [cur], vocab) / n / 8,
        "adaptive, contexts: (current, next token), next, current": ppm_bits(
            t.ids, [cur * (1 << 20) + nxt, nxt, cur], vocab) / n / 8,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20000, help="tokens per model for the cached run")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 32, 64])
    ap.add_argument("--topk-dir", type=Path, nargs="*", default=[], help="fusedata extract output folders")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/codec_bench"), help="where extract output is kept")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--only", default="", help="measure only layouts whose name contains one of these |-separated texts")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "codec.json")
    ap.add_argument("--no-id-bounds", dest="id_bounds", action="store_false",
                    help="skip the (slow, pure Python) entropy estimates of the ids")
    ap.add_argument("--breakdown", action="store_true", help="where zq v2's bytes go, part by part, per real shard")
    ap.add_argument("--speed", action="store_true",
                    help="the codecs alone (MB/s), and numba's first-call compile time in a fresh process")
    a = ap.parse_args()
    folder_of = {d.name: d for d in a.topk_dir} or {m: extract_topk(m, a.tokens, a.cache) for m in MODELS}
    shard_windows = {name: [pq.read_metadata(f).num_rows for f in sorted(d.glob("shard-*.parquet"))]
                     for name, d in folder_of.items()}
    sources: list[tuple[str, Callable[[int], tuple[TopK, int]]]] = [
        (name, lambda k, d=d: topk_from_extract(d, k)) for name, d in folder_of.items()
    ]
    if a.generate_only:
        return
    command = " ".join(["benchmarks/codec.py", *sys.argv[1:]])
    print(f"# top-k codec benchmark\n\ncommand: `{command}`; load before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results: dict[str, object] = {"command": command, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "runs": []}
    if a.speed:
        first = numba_first_call()
        print(f"\nzq v2's first encode + decode in a fresh process: {first['compile_s']:.1f} s with an empty numba "
              f"cache (compiling), {first['cached_s']:.2f} s with it filled; import {first['import_s']:.2f} s "
              f"(load {first['load']:.1f})", flush=True)
        results["numba_first_call"] = first
    for t in (TopK(np.array([[3, 1]], np.int32), np.array([[-0.1, -3.0]], np.float32), np.array([-0.1], np.float32),
                   np.array([0.05], np.float32), np.array([1])),
              TopK(np.array([[5, 3, 7]], np.int32), np.log(np.array([[0.5, 0.25, 0.25]], np.float32)),
                   np.array([-0.7], np.float32), np.array([0.0], np.float32), np.array([1]))):
        get_codec("zq@2").decode(pa.table(get_codec("zq@2").encode(t)), t.k)  # numba compiles (or loads) outside the timings
    for model, load in sources:
        sampled = targets_of(folder_of[model]).startswith("sampled")
        for k in ([0] if sampled else a.k):  # sampled targets: their own k = N + 1
            t, vocab = load(k)
            k = t.k
            label = f"{model} (V={vocab}, {targets_of(folder_of[model]).split(':')[0]})"
            chosen = [lay for lay in layouts(vocab, shard_windows[model]) if any(o in lay.name for o in a.only.split("|"))]
            rows = [measure(lay, t, a.repeats) for lay in chosen]
            print(table_md(label, k, t.n_positions, len(t.lengths), rows), flush=True)
            run = {"data": model, "targets": targets_of(folder_of[model]), "vocab": vocab, "k": k,
                   "positions": t.n_positions, "windows": len(t.lengths), "shards": len(shard_windows[model]),
                   "load_after": os.getloadavg()[0], "layouts": rows}
            results["runs"].append(run)
            if a.breakdown:
                run["v2_breakdown"] = v2_breakdown(t, shard_windows[model])
                print(f"\n{label}, k={k}: where zq v2's bytes go, per real shard (B/position)\n\n| part | B/position |\n"
                      "|---|---:|\n" + "".join(f"| {name} | {v:.3f} |\n" for name, v in run["v2_breakdown"].items())
                      + f"| **total** | **{sum(run['v2_breakdown'].values()):.2f}** |\n", flush=True)
            if a.speed:
                run["speed"] = codec_speed(t, shard_windows[model], a.repeats)
                print(f"\n{label}, k={k}: the codecs alone, every real shard encoded then decoded (best of "
                      f"{a.repeats})\n\n| codec | enc MB/s | dec MB/s | enc k positions/s | dec k positions/s | load |\n"
                      "|---|---:|---:|---:|---:|---:|\n" + "".join(
                          f"| {r['codec']} | {r['enc_mbs']:.1f} | {r['dec_mbs']:.1f} | {r['enc_kpos_s']:.0f} "
                          f"| {r['dec_kpos_s']:.0f} | {r['load']:.1f} |\n" for r in run["speed"]), flush=True)
            if k == 10 and a.id_bounds:
                bounds = id_bounds(t, folder_of[model], vocab)
                print(f"\n{model}, k=10: bytes per position for the ids alone\n\n| model of the ids | B/token |\n"
                      "|---|---:|\n" + "".join(f"| {name} | {b:.2f} |\n" for name, b in bounds.items()), flush=True)
                results["runs"][-1]["id_bounds"] = bounds
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
