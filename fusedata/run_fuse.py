"""Drive a fuse run: target topk + aligned sources -> fused dataset, shard by shard.

Shards follow the target's: `aligned/` datasets are written with the target's shard names and
row order, so shard i of every input holds the same windows. Inputs made against a different
target (tokenizer, corpus, windows) are refused before any work, with what differs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusedata.codec import DEFAULT_CODEC, decode_topk, get_codec
from fusedata.dataset import DatasetDir, open_dataset, run_key, table_tokens
from fusedata.errors import OptionError, UsageError
from fusedata.executor import Executor, LocalExecutor, run_stage
from fusedata.fuse import fuse, token_metric_ce
from schemas.fused import fused_schema
from schemas.manifest import Manifest

# What a dataset made against a target must agree on with that target.
TARGET_KEYS = ("tokenizer_hash", "corpus_hash", "max_length", "docs_per_shard", "model_hash")


def run_digest(run: dict[str, Any]) -> str:
    """A short identity of a run (used to tie derived datasets to their inputs); where the model
    was found (model_path) is not part of it."""
    return hashlib.sha256(json.dumps(run_key(run), sort_keys=True).encode()).hexdigest()[:16]


def check_same_target(target: Manifest, target_path: str, other: Manifest, other_path: str) -> None:
    """Refuse a derived dataset that was made against another target, saying what differs."""
    recorded = other.run.get("target", {})
    diffs = [k for k in TARGET_KEYS if recorded.get(k) != target.run.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} vs {target.run.get(k)!r}" for k in diffs)
        raise UsageError(f"{other_path} was made against a different target than {target_path} ({shown})")


@dataclass(frozen=True)
class FuseConfig:
    method: str = "mince"  # mince | avgce
    unit: str = "window"  # window | token
    metric: str = "byte"  # byte | token   (window unit only)
    temperature: float = 1.0  # AvgCE softmax temperature
    k_out: int = 0  # 0: the target's k
    codec: str = DEFAULT_CODEC
    include_target: bool = True  # False: fuse the sources only (plain distillation from one source)

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in ("mince", "avgce"), "must be one of mince, avgce"),
            ("unit", self.unit in ("window", "token"), "must be one of window, token"),
            ("metric", self.metric in ("byte", "token"), "must be one of byte, token"),
            # softmax(-CE / T): T = 0 divides by zero (NaN weights), T < 0 prefers the worst candidate
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0,
             f"must be > 0, got {self.temperature}"),
            ("k_out", self.k_out >= 0, "must be >= 0 (0: the target's k)"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise OptionError(name, message)


def predicted_bytes(token_start: pa.ListArray, token_end: pa.ListArray) -> np.ndarray:
    """int64 [W]: bytes of text a window predicts (its tokens after the first)."""
    out = np.zeros(len(token_start), dtype=np.int64)
    for i, (s, e) in enumerate(zip(token_start.to_pylist(), token_end.to_pylist(), strict=True)):
        if len(s) > 1:
            out[i] = max(max(e[1:]) - min(s[1:]), 1)
    return out


def fuse_tables(target: pa.Table, aligned: list[pa.Table], k: int, vocab_size: int, config: FuseConfig,
                codec: Any, schema: pa.Schema) -> pa.Table:
    """The pure fusion of one shard: target topk table + aligned tables (same rows)."""
    for a in aligned:
        if a.column("doc_id").to_pylist() != target.column("doc_id").to_pylist() or \
                a.column("window").to_pylist() != target.column("window").to_pylist():
            raise UsageError("aligned shard rows do not match the target shard (was it made from this target?)")
    cands = [decode_topk(t) for t in [target, *aligned]]
    ids_col = target.column("input_ids").combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    flat = ids_col.values.to_numpy()
    # labels: input_ids[1:] of each window, flattened  [N]
    label_mask = np.ones(flat.size, dtype=bool)
    label_mask[offsets[:-1][offsets[:-1] < offsets[1:]]] = False
    labels = flat[label_mask].astype(np.int64)
    if config.metric == "byte":
        nbytes = predicted_bytes(target.column("token_start").combine_chunks(), target.column("token_end").combine_chunks())
        ce = [target.column("ce").to_numpy().astype(np.float64) * cands[0].lengths / np.maximum(nbytes, 1)]
        ce += [a.column("source_nll").to_numpy() / np.maximum(a.column("source_bytes").to_numpy(), 1) for a in aligned]
        window_ce = np.stack(ce, axis=1)  # [W, M]
    else:
        window_ce = token_metric_ce(cands, labels, vocab_size)
    if not config.include_target:
        cands, window_ce = cands[1:], window_ce[:, 1:]
    result = fuse(cands, labels, window_ce, vocab_size, config.method, config.unit, config.k_out or k, config.temperature)
    off = cands[0].offsets()
    cols = {
        "doc_id": target.column("doc_id"),
        "window": target.column("window"),
        "byte_start": target.column("byte_start"),
        "byte_end": target.column("byte_end"),
        "input_ids": target.column("input_ids"),
        "labels": pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(labels.astype(np.int32))),
        "winner": pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(result.winner)),
        "weights": [row for row in result.weights],
        "candidate_ce": [row for row in result.candidate_ce],
    }
    cols.update(codec.encode(result.topk))
    return pa.table(cols, schema=schema)


class FuseStage:
    """One shard name in -> the fused shard. Reads its inputs by name from the dataset folders."""

    def __init__(self, target_dir: str, aligned_dirs: list[str], k: int, vocab_size: int, candidates: list[str],
                 config: FuseConfig) -> None:
        self.target_dir, self.aligned_dirs = target_dir, aligned_dirs
        self.k, self.vocab_size, self.config = k, vocab_size, config
        self.k_out = config.k_out or k
        self.codec = get_codec(config.codec)
        self.schema = fused_schema(self.codec.fields(), self.codec.metadata(), self.k_out, candidates)

    def setup(self) -> None:
        pass

    def __call__(self, task: pa.Table, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        name = task.column("shard")[0].as_py()
        target = pq.read_table(Path(self.target_dir) / name)
        aligned = [pq.read_table(Path(d) / name) for d in self.aligned_dirs]
        out = fuse_tables(target, aligned, self.k, self.vocab_size, self.config, self.codec, self.schema)
        if on_tokens is not None:
            on_tokens(table_tokens(out))
        return out


@dataclass
class FuseJob:
    target: str
    aligned: list[str]
    output: str
    config: FuseConfig = field(default_factory=FuseConfig)
    overwrite: bool = False
    quiet: bool = False
    log: Any = field(default=print, repr=False)


def run_fuse(job: FuseJob, executor: Executor | None = None) -> Manifest:
    executor = executor or LocalExecutor()
    target = open_dataset(job.target, "topk")
    sources = [open_dataset(a, "aligned") for a in job.aligned]
    for path, m in zip(job.aligned, sources, strict=True):
        check_same_target(target, job.target, m, path)
        names = [s.name for s in m.shards]
        if names != [s.name for s in target.shards]:
            raise UsageError(f"{path}: its shards differ from the target's {job.target}")
    if not job.config.include_target and not sources:
        raise UsageError("--no-target needs at least one --aligned source")
    get_codec(job.config.codec).check_k(job.config.k_out or int(target.run["top_k"]))
    candidates = [target.run["model"]] * job.config.include_target + [m.run["source"]["model"] for m in sources]
    run = {
        "stage": "fuse",
        "target": {k: target.run.get(k) for k in TARGET_KEYS} | {"model": target.run["model"]},
        "target_run": run_digest(target.run),
        "aligned_runs": [run_digest(m.run) for m in sources],
        "sources": [m.run["source"] for m in sources],  # model, tokenizer and weights hashes, licence
        "licence": target.run.get("licence"),
        "candidates": candidates,
        "fuse": job.config.__dict__,
        "top_k": job.config.k_out or target.run["top_k"],
        "vocab_size": target.run["vocab_size"],
        "tokenizer_hash": target.run["tokenizer_hash"],
        "corpus_hash": target.run["corpus_hash"],
        "max_length": target.run["max_length"],
        "docs_per_shard": target.run["docs_per_shard"],
        "model_hash": target.run["model_hash"],
        "model": target.run["model"],
    }
    names = [s.name for s in target.shards]
    stage_args = (job.target, job.aligned, int(target.run["top_k"]), int(target.run["vocab_size"]), candidates, job.config)
    manifest = run_stage(
        kind="fused", output=job.output, run=run, names=names, executor=executor,
        make_stage=functools.partial(FuseStage, *stage_args), label="fuse",
        stats=lambda out, names, rate: fused_stats(out, names, candidates),
        overwrite=job.overwrite, inputs=[job.target, *job.aligned], quiet=job.quiet, log=job.log,
    )
    stats = manifest.stats
    share = ", ".join(f"{c} {s:.1%}" for c, s in zip(candidates, stats["winning_share"], strict=True))
    job.log(f"{job.output}: {manifest.rows} windows, {manifest.tokens:,} tokens; {job.config.method} by "
            f"{job.config.unit}: {share if job.config.method == 'mince' else 'weights ' + str(stats['mean_weights'])}")
    return manifest


def fused_stats(out: DatasetDir, names: list[str], candidates: list[str]) -> dict[str, Any]:
    """Per-candidate winning share (positions), mean weights and mean CE, read back from shards."""
    m = len(candidates)
    wins = np.zeros(m)
    weight_sum = np.zeros(m)
    ce_sum = np.zeros(m)
    windows = positions = 0
    for name in names:
        t = pq.read_table(out.shard_path(name), columns=["winner", "weights", "candidate_ce"])
        win = t.column("winner").combine_chunks().values.to_numpy(zero_copy_only=False)
        positions += win.size
        wins += np.bincount(win[win >= 0], minlength=m)[:m]
        weight_sum += np.asarray(t.column("weights").to_pylist(), dtype=np.float64).reshape(-1, m).sum(0)
        ce_sum += np.asarray(t.column("candidate_ce").to_pylist(), dtype=np.float64).reshape(-1, m).sum(0)
        windows += t.num_rows
    return {
        "candidates": candidates,
        "windows": windows,
        "positions": positions,
        "winning_share": (wins / max(positions, 1)).round(4).tolist(),
        "mean_weights": (weight_sum / max(windows, 1)).round(4).tolist(),
        "mean_candidate_ce": (ce_sum / max(windows, 1)).round(4).tolist(),
    }
