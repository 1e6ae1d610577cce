"""Drive an align run: a source model's topk dataset -> its distributions on the target's
positions and vocabulary (`aligned/`), shard by shard, following the target's shards.

Per target shard the stage reads the source windows of the same documents (the two models
may window a document differently: alignment works on absolute document byte offsets, so
that does not matter), aligns positions (`bytes` or `dtw`), maps ids with the vocabulary map
(EM or MinED, computed once and cached) and projects the source top-k into target ids.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusedata.codec import DEFAULT_CODEC, decode_topk, get_codec
from fusedata.dataset import DatasetDir, open_dataset, table_tokens
from fusedata.errors import UsageError
from fusedata.executor import Executor, LocalExecutor, run_stage
from fusedata.run_fuse import TARGET_KEYS, run_digest
from fusedata.topk import TopK
from schemas.aligned import ALIGN_KINDS, aligned_schema
from schemas.manifest import Manifest


@dataclass(frozen=True)
class AlignConfig:
    vocab: str = "mined"  # exact | mined
    sequence: str = "bytes"  # bytes | dtw
    codec: str = DEFAULT_CODEC
    cache_dir: str = ""  # vocabulary map cache; "" = the model cache


@dataclass
class DocPositions:
    """All predictions a model made on one document, over all its windows, in byte order.

    pred_start/pred_end int64 [P]: byte span of the predicted token; nll float64 [P];
    token_ids int32 [P]: the predicted (gold) token; topk: TopK of the P positions.
    """

    pred_start: np.ndarray
    pred_end: np.ndarray
    nll: np.ndarray
    gold_ids: np.ndarray
    topk: TopK


def doc_positions(rows: pa.Table, topk: TopK) -> dict[str, DocPositions]:
    """Group a topk table's predictions by document; a position predicts token i+1."""
    off = topk.offsets()
    starts = rows.column("token_start").to_pylist()
    ends = rows.column("token_end").to_pylist()
    ids = rows.column("input_ids").to_pylist()
    by_doc: dict[str, list[int]] = {}
    for r, doc in enumerate(rows.column("doc_id").to_pylist()):
        by_doc.setdefault(doc, []).append(r)
    out = {}
    for doc, rs in by_doc.items():
        ps = np.concatenate([np.asarray(starts[r][1:], np.int64) for r in rs])
        pe = np.concatenate([np.asarray(ends[r][1:], np.int64) for r in rs])
        gid = np.concatenate([np.asarray(ids[r][1:], np.int32) for r in rs])
        sel = np.concatenate([np.arange(off[r], off[r + 1]) for r in rs])
        order = np.argsort(ps, kind="stable")
        tk = TopK(topk.ids[sel][order], topk.logprobs[sel][order], topk.gold_logprob[sel][order],
                  topk.tail_mass[sel][order], np.array([len(sel)], np.int64))
        out[doc] = DocPositions(ps[order], pe[order], -tk.gold_logprob.astype(np.float64), gid[order], tk)
    return out


@dataclass
class AlignedWindow:
    topk: TopK  # source distribution on the window's target positions, target ids
    kinds: np.ndarray  # int8 [n-1] ALIGN_KINDS
    mass_kept: float  # mean share of the source top-k mass that survived the vocabulary map
    source_nll: float
    source_bytes: int


def match_by_bytes(tgt_start: np.ndarray, tgt_end: np.ndarray, src: DocPositions) -> tuple[np.ndarray, np.ndarray]:
    """Linear-time position alignment from byte offsets.

    Target position t predicts target token t+1, which starts at byte b = tgt_start[t+1]. The
    source position that predicts the text from the same byte b (its predicted token starts at
    b) carries the source's knowledge of what comes next: it is matched to t. Then the source
    token ends where the target token ends (1:1), before (several source tokens make up the
    target token: many:1, the first one's distribution is used) or after (one source token
    covers several target tokens: 1:many). No source token starts at b: fallback.
    Returns the matched source position (or -1) and the kind, both [n-1].
    """
    b, e = tgt_start[1:].astype(np.int64), tgt_end[1:].astype(np.int64)  # [n-1] predicted target tokens
    j = np.searchsorted(src.pred_start, b, side="left")  # [n-1]
    jj = np.minimum(j, max(len(src.pred_start) - 1, 0))
    hit = (j < len(src.pred_start)) & (src.pred_start[jj] == b) if len(src.pred_start) else np.zeros(len(b), bool)
    src_end = src.pred_end[jj] if len(src.pred_start) else np.zeros(len(b), np.int64)
    kinds = np.full(len(b), 3, dtype=np.int8)  # FALLBACK
    kinds[hit & (src_end == e)] = 0  # 1:1
    kinds[hit & (src_end < e)] = 1  # many:1
    kinds[hit & (src_end > e)] = 2  # 1:many
    return np.where(hit, jj, -1), kinds


def project(src_topk: TopK, matched: np.ndarray, labels: np.ndarray, vocab_map: np.ndarray,
            target_vocab: int) -> tuple[TopK, np.ndarray]:
    """Source top-k at the matched positions, mapped into target ids (duplicates merged by
    adding probabilities); unmatched positions get a one-hot on the target's next-token label.
    Returns the TopK [n-1, k] and the share of source top-k mass kept per position."""
    from fusedata.fuse import PAD_ID, label_logprob, merge_sparse

    n, k = len(matched), src_topk.k
    ok = matched >= 0
    src_ids = src_topk.ids[np.where(ok, matched, 0)]  # [n, k]
    probs = np.exp(src_topk.logprobs[np.where(ok, matched, 0)].astype(np.float64))  # [n, k]
    mapped = np.where(src_ids >= 0, vocab_map[np.maximum(src_ids, 0)], -1)  # [n, k]
    probs = np.where(ok[:, None], probs, 0.0)
    rows = np.repeat(np.arange(n), k)
    ids, p = merge_sparse(rows, mapped.ravel(), np.where(mapped >= 0, probs, 0.0).ravel(), n, k)
    # fallback: one-hot on the label
    ids[~ok] = PAD_ID
    p[~ok] = 0.0
    ids[~ok, 0] = labels[~ok]
    p[~ok, 0] = 1.0
    total = probs.sum(axis=1)
    kept = np.where(ok, p.sum(axis=1) / np.maximum(total, 1e-12), 1.0)
    with np.errstate(divide="ignore"):
        lp = np.where(ids == PAD_ID, -np.inf, np.log(np.maximum(p, 1e-45))).astype(np.float32)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0).astype(np.float32)
    out = TopK(ids, lp, np.zeros(n, np.float32), tail, np.array([n], np.int64))
    out.gold_logprob = label_logprob(out, labels.astype(np.int64), target_vocab).astype(np.float32)
    return out, kept


def match_by_dtw(ids: np.ndarray, src: DocPositions, inside: np.ndarray, tgt_texts: list, src_texts: list
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Position alignment by DTW (fusedata.dtw) between the target's predicted tokens and the
    source's predicted tokens on the same bytes. Target position t is matched to the first
    source prediction aligned to its token; kinds: several source tokens on one target token
    (many:1), one source token on several target tokens (1:many), else 1:1."""
    from fusedata.dtw import dtw_align, strip_markers

    sel = np.flatnonzero(inside)  # source predictions within the window's bytes
    a = strip_markers([tgt_texts[i] or "" for i in ids[1:]])
    b = strip_markers([src_texts[i] or "" for i in src.gold_ids[sel]])
    n = len(a)
    if not b:
        return np.full(n, -1, dtype=np.int64), np.full(n, 3, dtype=np.int8)
    off, col = dtw_align(a, b)
    count = np.diff(off)  # [n] source tokens per target token
    fan_in = np.bincount(col, minlength=len(b))  # target tokens per source token
    first = col[off[:-1]]
    kinds = np.zeros(n, dtype=np.int8)
    kinds[fan_in[first] > 1] = 2
    kinds[count > 1] = 1
    return sel[first].astype(np.int64), kinds


def align_window(ids: np.ndarray, start: np.ndarray, end: np.ndarray, src: DocPositions, vocab_map: np.ndarray,
                 target_vocab: int, texts: tuple[list, list] | None = None) -> AlignedWindow:
    """One target window (ids/start/end [n]) against all source predictions on its document.
    `texts` (target, source token strings) selects DTW; None selects the byte-offset method."""
    lo, hi = (int(start[1:].min()), int(end[1:].max())) if len(ids) > 1 else (0, 0)
    inside = (src.pred_start >= lo) & (src.pred_start < hi)
    if texts is None:
        matched, kinds = match_by_bytes(start, end, src)
    else:
        matched, kinds = match_by_dtw(ids, src, inside, *texts)
    topk, kept = project(src.topk, matched, ids[1:].astype(np.int64), vocab_map, target_vocab)
    nbytes = int(src.pred_end[inside].max() - src.pred_start[inside].min()) if inside.any() else 0
    return AlignedWindow(topk, kinds, float(kept.mean()) if len(kept) else 1.0, float(src.nll[inside].sum()), nbytes)


def align_tables(target: pa.Table, source_rows: pa.Table, vocab_map: np.ndarray, target_vocab: int,
                 codec: Any, schema: pa.Schema, texts: tuple[list, list] | None = None) -> pa.Table:
    """The pure alignment of one target shard against the source rows of the same documents."""
    src_docs = doc_positions(source_rows, decode_topk(source_rows)) if source_rows.num_rows else {}
    empty = DocPositions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int32),
                         TopK(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32), np.zeros(0, np.float32),
                              np.zeros(0, np.float32), np.array([0], np.int64)))
    results = []
    for doc, ids, start, end in zip(target.column("doc_id").to_pylist(), target.column("input_ids").to_pylist(),
                                    target.column("token_start").to_pylist(), target.column("token_end").to_pylist(),
                                    strict=True):
        results.append(align_window(np.asarray(ids, np.int32), np.asarray(start, np.int64), np.asarray(end, np.int64),
                                    src_docs.get(doc, empty), vocab_map, target_vocab, texts))
    topk = TopK.concat([r.topk for r in results]) if results else None
    cols: dict[str, Any] = {
        "doc_id": target.column("doc_id"),
        "window": target.column("window"),
        "align_kind": [r.kinds for r in results],
        "mass_kept": [r.mass_kept for r in results],
        "source_nll": [r.source_nll for r in results],
        "source_bytes": [r.source_bytes for r in results],
    }
    if topk is None:
        return schema.empty_table()
    cols.update(codec.encode(topk))
    return pa.table(cols, schema=schema)


class AlignStage:
    """One target shard name in -> the aligned shard. Loads the vocabulary map once per worker."""

    def __init__(self, target_dir: str, source_dir: str, source_index: dict[str, list[str]], map_path: str,
                 k: int, target_vocab: int, config: AlignConfig, texts: tuple[list, list] | None = None) -> None:
        self.target_dir, self.source_dir, self.source_index = target_dir, source_dir, source_index
        self.texts = texts
        self.map_path, self.target_vocab, self.config = map_path, target_vocab, config
        self.codec = get_codec(config.codec)
        self.schema = aligned_schema(self.codec.fields(), self.codec.metadata(), k)
        self.vocab_map: np.ndarray | None = None

    def setup(self) -> None:
        self.vocab_map = np.load(self.map_path)

    def __call__(self, task: pa.Table, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        if self.vocab_map is None:
            self.setup()
        name = task.column("shard")[0].as_py()
        target = pq.read_table(Path(self.target_dir) / name)
        docs = set(target.column("doc_id").to_pylist())
        shards = sorted({s for d in docs for s in self.source_index.get(d, [])})
        parts = [pq.read_table(Path(self.source_dir) / s, filters=[("doc_id", "in", list(docs))]) for s in shards]
        source_rows = pa.concat_tables(parts) if parts else pa.table({"doc_id": pa.array([], pa.string())})
        out = align_tables(target, source_rows, self.vocab_map, self.target_vocab, self.codec, self.schema, self.texts)
        if on_tokens is not None:
            on_tokens(table_tokens(target))
        return out


@dataclass
class AlignJob:
    target: str
    source: str
    output: str
    config: AlignConfig = field(default_factory=AlignConfig)
    overwrite: bool = False
    quiet: bool = False
    log: Any = field(default=print, repr=False)


def _tokenizer_of(run: dict[str, Any], dataset: str) -> Any:
    """The tokenizer a topk dataset was made with: from where the model was found then, else (a
    moved cache, another machine) from its spec again; either way it must hash the same."""
    from fusedata.models.spec import ModelRef, load_tokenizer, resolve, tokenizer_hash

    path = run.get("model_path")
    ref = ModelRef(run["model"], path) if path and Path(path).exists() else resolve(run["model"])
    tok = load_tokenizer(ref)
    if tokenizer_hash(tok) != run["tokenizer_hash"]:
        raise UsageError(f"{dataset}: the tokenizer of {run['model']!r} found at {ref.path} is not the one the "
                         "dataset was made with (tokenizer hash differs)")
    return tok


def run_align(job: AlignJob, executor: Executor | None = None) -> Manifest:
    from fusedata.models.cache import cache_root
    from fusedata.vocab import token_texts, vocab_map

    executor = executor or LocalExecutor()
    if job.config.vocab not in ("exact", "mined"):
        raise UsageError("--vocab must be exact or mined")
    if job.config.sequence not in ("bytes", "dtw"):
        raise UsageError("--sequence must be bytes or dtw")
    target = open_dataset(job.target, "topk")
    source = open_dataset(job.source, "topk")
    if source.run.get("corpus_hash") != target.run.get("corpus_hash"):
        raise UsageError(f"{job.source} and {job.target} were extracted from different corpora (corpus_hash differs)")
    get_codec(job.config.codec).check_k(int(source.run["top_k"]))
    tgt_tok = _tokenizer_of(target.run, job.target)
    src_tok = _tokenizer_of(source.run, job.source)
    cache = Path(job.config.cache_dir) if job.config.cache_dir else cache_root().parent / "vocab"
    vmap = vocab_map(src_tok, tgt_tok, job.config.vocab, int(source.run["vocab_size"]), cache)
    # the workers load the map from a file named by its content, so a changed map is never stale
    map_path = cache / f"map-{hashlib.sha256(vmap.tobytes()).hexdigest()[:20]}.npy"
    if not map_path.is_file():
        np.save(map_path.with_suffix(".tmp.npy"), vmap)
        map_path.with_suffix(".tmp.npy").replace(map_path)
    run = {
        "stage": "align",
        "target": {k: target.run.get(k) for k in TARGET_KEYS} | {"model": target.run["model"]},
        "target_run": run_digest(target.run),
        "source": {"model": source.run["model"], "tokenizer_hash": source.run["tokenizer_hash"],
                   "model_hash": source.run["model_hash"], "licence": source.run.get("licence")},
        "source_run": run_digest(source.run),
        "align": {k: v for k, v in job.config.__dict__.items() if k != "cache_dir"},
        "top_k": source.run["top_k"],
        "vocab_size": target.run["vocab_size"],
        "model": source.run["model"],
    }
    index: dict[str, list[str]] = {}
    for s in source.shards:
        for d in set(pq.read_table(Path(job.source) / s.name, columns=["doc_id"]).column(0).to_pylist()):
            index.setdefault(d, []).append(s.name)
    texts = (token_texts(tgt_tok), token_texts(src_tok)) if job.config.sequence == "dtw" else None
    make = functools.partial(AlignStage, job.target, job.source, index, str(map_path), int(source.run["top_k"]),
                             int(target.run["vocab_size"]), job.config, texts)

    def stats(out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        return aligned_stats(out, names) | {"vocab_mapped": float((vmap >= 0).mean())}

    manifest = run_stage(
        kind="aligned", output=job.output, run=run, names=[s.name for s in target.shards], executor=executor,
        make_stage=make, stats=stats, label=f"align {source.run['model']} -> {target.run['model']}",
        overwrite=job.overwrite, inputs=[job.target, job.source], quiet=job.quiet, log=job.log,
    )
    stats = manifest.stats
    share = ", ".join(f"{k} {v:.1%}" for k, v in stats["kinds"].items())
    job.log(f"{job.output}: {stats['positions']:,} target positions: {share}; mass kept {stats['mass_kept']:.3f}")
    return manifest


def aligned_stats(out: DatasetDir, names: list[str]) -> dict[str, Any]:
    counts = np.zeros(len(ALIGN_KINDS))
    mass = 0.0
    for name in names:
        t = pq.read_table(out.shard_path(name), columns=["align_kind", "mass_kept"])
        kinds = t.column("align_kind").combine_chunks().values.to_numpy(zero_copy_only=False)
        counts += np.bincount(kinds, minlength=len(ALIGN_KINDS))[: len(ALIGN_KINDS)]
        lens = t.column("align_kind").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        mass += float((t.column("mass_kept").to_numpy() * lens).sum())
    total = max(counts.sum(), 1)
    return {
        "positions": int(counts.sum()),
        "kinds": {ALIGN_KINDS[i]: round(float(counts[i] / total), 4) for i in range(len(ALIGN_KINDS))},
        "mass_kept": mass / total,
    }
