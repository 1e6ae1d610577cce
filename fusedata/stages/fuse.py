"""The fuse stage: target topk + aligned sources -> fused dataset, shard by shard (fusedata/fuse.py).

Shards follow the target's: `aligned/` datasets are written with the target's shard names and
row order, so shard i of every input holds the same windows. Inputs made against a different
target (tokenizer, corpus, windows) are refused before any work, with what differs.

With `alm_source` (a source's topk dataset, `fuse --alm-source`), every fused row also carries
the byte-aligned chunks of the target window against that source and the source's chunk
log-likelihoods (fusedata/chunks.py), which `train --loss alm` reads: no vocabulary map needed.

Sampled targets (`extract --targets sampled:N`) fuse like top-k ones, as long as every candidate
is of the same kind (a mixture of unbiased and top-k estimates is neither), and AvgCE keeps every
entry of the mixture (--top-k below the candidates' total would cut it and bias it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusedata.chunks import document_likelihoods, window_chunks
from fusedata.codec import DEFAULT_CODEC, get_codec
from fusedata.dataset import (
    DatasetDir,
    check_same_corpus,
    check_same_target,
    open_dataset,
    read_shard,
    run_digest,
    table_tokens,
    target_identity,
)
from fusedata.errors import UsageError, check_options, field_choices
from fusedata.fuse import AVGCE_TEMPERATURE, fuse_tables
from fusedata.stages.base import JobOptions, Stage, Task
from fusedata.storage import locate
from schemas.fused import fused_schema
from schemas.manifest import Manifest


@dataclass(frozen=True)
class FuseConfig:
    method: str = field(default="mince", metadata={"choices": ("mince", "avgce")})
    unit: str = field(default="window", metadata={"choices": ("window", "token")})  # what a weight applies to
    metric: str = field(default="byte", metadata={"choices": ("byte", "token")})  # window CE per (window unit only)
    temperature: float = AVGCE_TEMPERATURE  # AvgCE softmax temperature (why this default: fusedata/fuse.py)
    k_out: int = 0  # 0: the target's k
    codec: str = DEFAULT_CODEC
    include_target: bool = True  # False: fuse the sources only (plain distillation from one source)
    # a source's topk dataset (a pipeline file names the source instead): also write the ALM chunk
    # columns against it, for `train --loss alm`. One source: the chunk columns are one set per row.
    alm_source: str = ""

    def __post_init__(self) -> None:
        check_options([
            *field_choices(self),
            # softmax(-CE / T): T = 0 divides by zero (NaN weights), T < 0 prefers the worst candidate
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0,
             f"must be > 0, got {self.temperature}"),
            ("k_out", self.k_out >= 0, "must be >= 0 (0: the target's k)"),
        ])


def fuse_identity(config: FuseConfig) -> dict[str, Any]:
    """The settings that shape a fused dataset: not the AvgCE temperature of a MinCE run (unused),
    nor where the ALM source lies (its identity is recorded apart, see `_alm_identity`).
    (Records written before #21 have the temperature for MinCE too: `fusedata.dataset.same_run`
    still takes them for the same run.)"""
    skip = {"alm_source"} | ({"temperature"} if config.method == "mince" else set())
    return {k: v for k, v in config.__dict__.items() if k not in skip}


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def named_location(text: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a plain path -> (None, path). A folder that exists is always a
    path, whatever it is called, so a path with '=' in it still works."""
    name, sep, rest = text.partition("=")
    if sep and rest and _NAME.fullmatch(name) and not Path(text).exists():
        return name, rest
    return None, text


@dataclass(frozen=True)
class FuseJob(JobOptions):
    """`target` and each `aligned` entry: a dataset folder, or NAME=FOLDER to name that candidate in the
    fused dataset and in `inspect` (default: the model as given to extract)."""

    target: str
    aligned: list[str]
    output: str
    config: FuseConfig = field(default_factory=FuseConfig)
    names: dict[int, str] = field(default_factory=dict, init=False)  # candidate index -> the NAME given

    def __post_init__(self) -> None:
        (tname, target), named = named_location(self.target), [named_location(a) for a in self.aligned]
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "aligned", [path for _, path in named])
        if tname is not None and not self.config.include_target:
            raise UsageError(f"the target is not a candidate with --no-target: its name {tname!r} would be unused")
        given = ([tname] if self.config.include_target else []) + [name for name, _ in named]
        object.__setattr__(self, "names", {i: n for i, n in enumerate(given) if n is not None})
        chosen = list(self.names.values())
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"two candidates are given the same name: {sorted(chosen)}")


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
        self._check_target_kinds()
        self.alm_dir = job.config.alm_source
        self.alm = open_dataset(self.alm_dir, "topk", verify=job.verify) if self.alm_dir else None
        if self.alm is not None:
            check_same_corpus(self.alm, self.alm_dir, self.target, job.target)
        self.alm_index: dict[str, list[str]] = {}
        self.codec = get_codec(job.config.codec)
        self.codec.check_k(self.k_out)
        models = [self.target.run["model"]] * job.config.include_target + [m.run["source"]["model"] for m in self.sources]
        self.candidates = [job.names.get(i, model) for i, model in enumerate(models)]
        if len(set(self.candidates)) != len(self.candidates) and job.names:
            raise UsageError(f"candidate names must differ: {self.candidates}")
        self.base_schema = fused_schema(self.codec.fields(), self.codec.metadata(), self.k_out, self.candidates)
        self.schema = fused_schema(self.codec.fields(), self.codec.metadata(), self.k_out, self.candidates,
                                   chunks=self.alm is not None)

    def _check_target_kinds(self) -> None:
        """Refuse candidates of different target kinds (sampled vs top-k), and an AvgCE of sampled
        targets cut to fewer entries than the mixture has (the cut would bias it)."""
        runs = [(self.job.target, self.target.run)] * self.job.config.include_target
        runs += [(p, m.run["source"]) for p, m in zip(self.job.aligned, self.sources, strict=True)]
        kinds = {p: run.get("targets", "topk") for p, run in runs}
        if len({v.partition(":")[0] for v in kinds.values()}) > 1:
            shown = ", ".join(f"{p}: {v}" for p, v in kinds.items())
            raise UsageError(f"cannot fuse sampled with top-k targets ({shown}); extract every candidate with the same "
                             "--targets kind")
        sampled = [p for p, v in kinds.items() if v.startswith("sampled")]
        if len(sampled) > 1 and self.job.config.method == "avgce":
            total = sum(int(run.get("targets").partition(":")[2]) + 1 for _, run in runs)
            if self.k_out < total:
                raise UsageError(f"AvgCE of sampled targets keeps every entry of the mixture: --top-k must be at "
                                 f"least {total} (got {self.k_out}); a shorter list would bias the estimate")

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
            "fuse": fuse_identity(self.config),
            "top_k": self.k_out,
            "vocab_size": target["vocab_size"],
            "tokenizer_hash": target["tokenizer_hash"],
            "corpus_hash": target["corpus_hash"],
            "max_length": target["max_length"],
            "docs_per_shard": target["docs_per_shard"],
            "model_hash": target["model_hash"],
            "model": target["model"],
            **self._alm_identity(),
        }

    def _alm_identity(self) -> dict[str, Any]:
        """The ALM source, when there is one (a fuse without it keeps its identity)."""
        if self.alm is None:
            return {}
        run = self.alm.run
        return {"alm_source": {"model": run["model"], "tokenizer_hash": run["tokenizer_hash"],
                               "model_hash": run["model_hash"]}, "alm_source_run": run_digest(run)}

    def inputs(self) -> list[str]:
        return [self.job.target, *self.job.aligned] + ([self.alm_dir] if self.alm is not None else [])

    def tasks(self) -> list[Task]:
        if self.alm is not None:  # which ALM source shards hold each document (its windows may span several)
            for s in self.alm.shards:
                for d in set(read_shard(locate(self.alm_dir) / s.name, columns=["doc_id"]).column(0).to_pylist()):
                    self.alm_index.setdefault(d, []).append(s.name)
        return [Task(s.name) for s in self.target.shards]

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        target = read_shard(self.target_dir / task.name)
        aligned = [read_shard(d / task.name) for d in self.aligned_dirs]
        out = fuse_tables(target, aligned, self.k, self.vocab_size, self.config, self.codec, self.base_schema)
        if self.alm is not None:
            out = self.add_chunks(target, out)
        if on_tokens is not None:
            on_tokens(table_tokens(out))
        return out

    def add_chunks(self, target: pa.Table, out: pa.Table) -> pa.Table:
        """`out` with the ALM chunk columns: each target window's chunks against the source."""
        docs = sorted(set(target.column("doc_id").to_pylist()))
        source = {}
        for name in sorted({n for d in docs for n in self.alm_index.get(d, [])}):
            table = read_shard(locate(self.alm_dir) / name)
            table = table.filter(pc.is_in(table.column("doc_id"), pa.array(docs, pa.string())))
            source |= merge_likelihoods(source, document_likelihoods(table, name))
        cols: list[list[np.ndarray]] = [[], [], []]
        for doc, ts, te in zip(target.column("doc_id").to_pylist(), target.column("token_start").to_pylist(),
                               target.column("token_end").to_pylist(), strict=True):
            for col, values in zip(cols, window_chunks(np.asarray(ts), np.asarray(te), source.get(doc)), strict=True):
                col.append(values)
        arrays = [out.column(name) for name in out.column_names]
        arrays += [pa.array(col, type=f.type) for col, f in zip(cols, list(self.schema)[len(arrays):], strict=True)]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        result = fused_stats(out, names, self.candidates)
        if self.alm is not None:
            result["alm"] = chunk_stats(out, names)
        return result

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


def merge_likelihoods(have: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Documents of one more source shard: a document split over shards gets its tokens joined."""
    from fusedata.chunks import TokenLikelihoods

    out = {}
    for doc, t in new.items():
        if doc in have:
            old = have[doc]
            s, e, lp = (np.concatenate(x) for x in ((old.start, t.start), (old.end, t.end), (old.logprob, t.logprob)))
            order = np.argsort(s, kind="stable")
            t = TokenLikelihoods(s[order], e[order], lp[order])
        out[doc] = t
    return out


def chunk_stats(out: DatasetDir, names: list[str]) -> dict[str, Any]:
    """ALM coverage read back from the shards: chunks, the share of positions inside one, and the
    mean teacher log-likelihood per chunk."""
    chunks = covered = positions = 0
    ll = 0.0
    for name in names:
        t = pq.read_table(out.shard_path(name), columns=["labels", "chunk_start", "chunk_end", "chunk_teacher_ll"])
        starts = t.column("chunk_start").combine_chunks().values.to_numpy(zero_copy_only=False)
        ends = t.column("chunk_end").combine_chunks().values.to_numpy(zero_copy_only=False)
        chunks += len(starts)
        covered += int((ends - starts).sum())
        positions += int(t.column("labels").combine_chunks().value_lengths().to_numpy(zero_copy_only=False).sum())
        ll += float(t.column("chunk_teacher_ll").combine_chunks().values.to_numpy(zero_copy_only=False).sum())
    return {"chunks": chunks, "positions_in_chunks": round(covered / max(positions, 1), 4),
            "tokens_per_chunk": round(covered / max(chunks, 1), 3), "mean_teacher_ll": round(ll / max(chunks, 1), 4)}
