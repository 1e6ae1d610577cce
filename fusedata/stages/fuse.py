"""The fuse stage: target topk + aligned sources -> fused dataset, shard by shard (fusedata/fuse.py).

Shards follow the target's: `aligned/` datasets are written with the target's shard names and
row order, so shard i of every input holds the same windows. Inputs made against a different
target (tokenizer, corpus, windows) are refused before any work, with what differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.codec import DEFAULT_CODEC, get_codec
from fusedata.dataset import (
    DatasetDir,
    check_same_target,
    open_dataset,
    read_shard,
    run_digest,
    table_tokens,
    target_identity,
)
from fusedata.errors import UsageError, check_options, field_choices
from fusedata.fuse import fuse_tables
from fusedata.stages.base import Stage, Task
from fusedata.storage import locate
from schemas.fused import fused_schema
from schemas.manifest import Manifest


@dataclass(frozen=True)
class FuseConfig:
    method: str = field(default="mince", metadata={"choices": ("mince", "avgce")})
    unit: str = field(default="window", metadata={"choices": ("window", "token")})  # what a weight applies to
    metric: str = field(default="byte", metadata={"choices": ("byte", "token")})  # window CE per (window unit only)
    temperature: float = 1.0  # AvgCE softmax temperature
    k_out: int = 0  # 0: the target's k
    codec: str = DEFAULT_CODEC
    include_target: bool = True  # False: fuse the sources only (plain distillation from one source)

    def __post_init__(self) -> None:
        check_options([
            *field_choices(self),
            # softmax(-CE / T): T = 0 divides by zero (NaN weights), T < 0 prefers the worst candidate
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0,
             f"must be > 0, got {self.temperature}"),
            ("k_out", self.k_out >= 0, "must be >= 0 (0: the target's k)"),
        ])


@dataclass(frozen=True)
class FuseJob:
    target: str
    aligned: list[str]
    output: str
    config: FuseConfig = field(default_factory=FuseConfig)
    overwrite: bool = False
    quiet: bool = False
    verify: bool = True  # check each input shard against its manifest sha256 (--no-verify: False)
    log: Any = field(default=print, repr=False)


class FuseStage(Stage):
    """One shard name in -> the fused shard. Reads its inputs by name from the dataset folders."""

    kind = "fused"
    label = "fuse"

    def __init__(self, job: FuseJob) -> None:
        self.job, self.config, self.output = job, job.config, job.output
        # resolved once: the workers get the filesystems (and their settings) with the stage
        self.target_dir, self.aligned_dirs = locate(job.target), [locate(a) for a in job.aligned]
        self.target = open_dataset(self.target_dir, "topk", verify=job.verify)
        self.sources = [open_dataset(a, "aligned", verify=job.verify) for a in self.aligned_dirs]
        for path, m in zip(job.aligned, self.sources, strict=True):
            check_same_target(self.target, job.target, m, path)
            if [s.name for s in m.shards] != [s.name for s in self.target.shards]:
                raise UsageError(f"{path}: its shards differ from the target's {job.target}")
        if not job.config.include_target and not self.sources:
            raise UsageError("--no-target needs at least one --aligned source")
        self.k, self.vocab_size = int(self.target.run["top_k"]), int(self.target.run["vocab_size"])
        self.k_out = job.config.k_out or self.k
        self.codec = get_codec(job.config.codec)
        self.codec.check_k(self.k_out)
        self.candidates = ([self.target.run["model"]] * job.config.include_target
                           + [m.run["source"]["model"] for m in self.sources])
        self.schema = fused_schema(self.codec.fields(), self.codec.metadata(), self.k_out, self.candidates)

    def identity(self) -> dict[str, Any]:
        target = self.target.run
        return {
            "stage": "fuse",
            "target": target_identity(target),
            "target_run": run_digest(target),
            "aligned_runs": [run_digest(m.run) for m in self.sources],
            "sources": [m.run["source"] for m in self.sources],  # model, tokenizer and weights hashes, licence
            "licence": target.get("licence"),
            "candidates": self.candidates,
            "fuse": self.config.__dict__,
            "top_k": self.k_out,
            "vocab_size": target["vocab_size"],
            "tokenizer_hash": target["tokenizer_hash"],
            "corpus_hash": target["corpus_hash"],
            "max_length": target["max_length"],
            "docs_per_shard": target["docs_per_shard"],
            "model_hash": target["model_hash"],
            "model": target["model"],
        }

    def inputs(self) -> list[str]:
        return [self.job.target, *self.job.aligned]

    def tasks(self) -> list[Task]:
        return [Task(s.name) for s in self.target.shards]

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        target = read_shard(self.target_dir / task.name)
        aligned = [read_shard(d / task.name) for d in self.aligned_dirs]
        out = fuse_tables(target, aligned, self.k, self.vocab_size, self.config, self.codec, self.schema)
        if on_tokens is not None:
            on_tokens(table_tokens(out))
        return out

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        return fused_stats(out, names, self.candidates)

    def summary(self, manifest: Manifest) -> str:
        stats, cfg = manifest.stats, self.config
        share = ", ".join(f"{c} {s:.1%}" for c, s in zip(self.candidates, stats["winning_share"], strict=True))
        return (f"{self.output}: {manifest.rows} windows, {manifest.tokens:,} tokens; {cfg.method} by "
                f"{cfg.unit}: {share if cfg.method == 'mince' else 'weights ' + str(stats['mean_weights'])}")


def run_fuse(job: FuseJob, executor: Any = None) -> Manifest:
    """Fuse `job.target`'s topk dataset with the aligned sources into `job.output`."""
    from fusedata.stages.base import run_stage

    return run_stage(FuseStage(job), executor, overwrite=job.overwrite, quiet=job.quiet, log=job.log).manifest


def fused_stats(out: DatasetDir, names: list[str], candidates: list[str]) -> dict[str, Any]:
    """Per-candidate winning share, mean weights and mean CE, read back from shards; all per
    position (a window's weights and CE count once for each position it predicts, so a short tail
    window weighs as little as it predicts)."""
    m = len(candidates)
    wins = np.zeros(m)
    weight_sum = np.zeros(m)
    ce_sum = np.zeros(m)
    windows = positions = 0
    for name in names:
        t = read_shard(out.shard_path(name), columns=["winner", "weights", "candidate_ce"])
        winner = t.column("winner").combine_chunks()
        win = winner.values.to_numpy(zero_copy_only=False)
        per_window = winner.value_lengths().to_numpy(zero_copy_only=False).astype(np.float64)
        positions += win.size
        wins += np.bincount(win[win >= 0], minlength=m)[:m]
        for column, total in (("weights", weight_sum), ("candidate_ce", ce_sum)):
            rows = np.asarray(t.column(column).to_pylist(), dtype=np.float64).reshape(-1, m)
            # one row per window (unit=window) or per position (unit=token)
            total += (rows * per_window[:, None]).sum(0) if len(rows) == t.num_rows else rows.sum(0)
        windows += t.num_rows
    return {
        "candidates": candidates,
        "windows": windows,
        "positions": positions,
        "winning_share": (wins / max(positions, 1)).round(4).tolist(),
        "mean_weights": (weight_sum / max(positions, 1)).round(4).tolist(),
        "mean_candidate_ce": (ce_sum / max(positions, 1)).round(4).tolist(),
    }
