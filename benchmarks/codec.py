"""Benchmark: bytes per token and reconstruction error of top-k codecs on real model output.

Rerun:  .venv/bin/python benchmarks/codec.py [--tokens 20000] [--k 10 32 64] [--topk-dir DIR ...]
The first run executes each bundled model over real text (news articles + the perplexity
paragraph) and caches top-64 distributions under /tmp/codec_bench/; later runs take seconds.
Every layout is measured in the same run on the same data and written the way the dataset
writer writes shards (Parquet, zstd level 6) unless its name says otherwise.
"""

from __future__ import annotations

import argparse
import io
import math
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
CACHE = Path("/tmp/codec_bench")
MODELS = {
    "smollm2-135m": Path("/tmp/fdcache/models/smollm2-135m"),
    "gemma3-270m": Path("/tmp/fdcache/models/gemma3-270m"),
}
TEXT_FILES = [
    ROOT / "fusedata/models/ppl_check.txt",
    ROOT / ".venv/lib/python3.11/site-packages/gensim/test/test_data/lee_background.cor",
]
KMAX = 64


def _documents() -> list[str]:
    """Real text: the perplexity check paragraph, then one news article per line."""
    docs = [TEXT_FILES[0].read_text(encoding="utf-8")]
    docs += [ln.strip() for ln in TEXT_FILES[1].read_text(encoding="latin-1").splitlines() if ln.strip()]
    return docs


def generate_topk(model: str, n_tokens: int, window: int = 256, chunk: int = 128) -> Path:
    """Run `model` over real text and cache its top-64 distributions as .npz (slow, once)."""
    out = CACHE / f"{model}-{n_tokens}.npz"
    if out.exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(MODELS[model])
    lm = AutoModelForCausalLM.from_pretrained(MODELS[model], dtype=torch.float32).eval()
    head = lm.get_output_embeddings()
    ids_l, lp_l, gold_l, goldid_l, lengths = [], [], [], [], []
    total, t0 = 0, time.time()
    for doc in _documents():
        toks = tok(doc)["input_ids"][:window]
        if len(toks) < 8:
            continue
        x = torch.tensor([toks])
        with torch.no_grad():
            hidden = lm.model(input_ids=x).last_hidden_state[0, :-1]  # [T-1, H]
            target = x[0, 1:]  # [T-1]
            for s in range(0, hidden.shape[0], chunk):
                logits = head(hidden[s : s + chunk]).float()  # [c, V]
                cap = getattr(lm.config, "final_logit_softcapping", None)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                lsm = torch.log_softmax(logits, dim=-1)
                v, i = lsm.topk(KMAX, dim=-1)  # [c, 64], sorted desc
                ids_l.append(i.to(torch.int32).numpy())
                lp_l.append(v.numpy())
                t = target[s : s + chunk]
                gold_l.append(lsm.gather(1, t[:, None])[:, 0].numpy())
                goldid_l.append(t.to(torch.int32).numpy())
        lengths.append(hidden.shape[0])
        total += hidden.shape[0]
        print(f"\r{model}: {total} tokens {total / (time.time() - t0):.0f} tok/s", end="", flush=True)
        if total >= n_tokens:
            break
    print()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(
        out, ids=np.concatenate(ids_l), logprobs=np.concatenate(lp_l), gold_logprob=np.concatenate(gold_l),
        gold_ids=np.concatenate(goldid_l), lengths=np.array(lengths, dtype=np.int64),
        vocab_size=np.int64(head.weight.shape[0]),
    )
    return out


# -- data -------------------------------------------------------------------------------

from fusedata.codec import get_codec  # noqa: E402
from fusedata.codec.zq import CHILDREN, COLUMN  # noqa: E402
from fusedata.topk import TopK  # noqa: E402


def topk_from_cache(path: Path, k: int) -> tuple[TopK, int]:
    """The first k of the cached top-64, tail mass recomputed for k (log-probs are full-vocab)."""
    d = np.load(path)
    lp = d["logprobs"][:, :k]  # [N, k]
    tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(1), 0.0, 1.0).astype(np.float32)
    return TopK(d["ids"][:, :k], lp, d["gold_logprob"], tail, d["lengths"]), int(d["vocab_size"])


def topk_from_extract(folder: Path, k: int) -> tuple[TopK, int]:
    """The one function to swap when fusedata.dataset.read_topk lands: an extract output folder."""
    from fusedata.dataset import read_topk  # type: ignore[attr-defined]

    t = read_topk(folder)
    if t.k < k:
        raise SystemExit(f"{folder} holds k={t.k} < {k}")
    lp = t.logprobs[:, :k]
    tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(1), 0.0, 1.0).astype(np.float32)
    return TopK(t.ids[:, :k], lp, t.gold_logprob, tail, t.lengths), int(t.ids.max()) + 1


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
            out[group_of(col.path_in_schema)] += col.total_compressed_size
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
            return _list_group(path)

        g = _parquet_groups(blob, group)
        g["other"] += len(blob) - sum(g.values())
        return g, len(blob), blob

    def decode(self, blob: bytes, k: int) -> TopK:
        return self.codec.decode(pq.read_table(io.BytesIO(blob)), k)


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
    return {
        "max_dlp": float(np.abs(lp - lph).max()),
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


def layouts(vocab: int) -> list[object]:
    return [
        Reference(),
        PlainParquet(),
        BitPacked(vocab),
        CodecLayout("raw"),
        CodecLayout("zq", label="zq v1 default, writer defaults (zstd-6, statistics on)"),
        CodecLayout("zq", stats=False, label="**zq v1 default** (step 1/16, 1/4 below -8; zstd-6, no stats)"),
        CodecLayout("zq", level=19, stats=False, label="zq v1 default, zstd-19, no stats"),
        CodecLayout("zq", stats=False, label="zq v1 step 1/8 uniform (zstd-6, no stats)", step=1 / 8,
                    coarse_step=1 / 8),
        CodecLayout("zq", stats=False, label="zq v1 step 1/32, 1/8 below -8 (zstd-6, no stats)", step=1 / 32,
                    coarse_step=1 / 8),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20000, help="tokens per model for the cached run")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 32, 64])
    ap.add_argument("--topk-dir", type=Path, nargs="*", default=[], help="fusedata extract output folders")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--generate-only", action="store_true")
    a = ap.parse_args()
    sources: list[tuple[str, Callable[[int], tuple[TopK, int]]]] = []
    if a.topk_dir:
        sources = [(d.name, lambda k, d=d: topk_from_extract(d, k)) for d in a.topk_dir]
    else:
        for m in MODELS:
            path = generate_topk(m, a.tokens)
            sources.append((m, lambda k, p=path: topk_from_cache(p, k)))
    if a.generate_only:
        return
    print(f"# top-k codec benchmark\n\ncommand: `{' '.join(['benchmarks/codec.py', *sys.argv[1:]])}`")
    for model, load in sources:
        for k in a.k:
            t, vocab = load(k)
            rows = [measure(lay, t, a.repeats) for lay in layouts(vocab)]
            print(table_md(f"{model} (V={vocab})", k, t.n_positions, len(t.lengths), rows), flush=True)


if __name__ == "__main__":
    main()
