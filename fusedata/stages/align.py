"""The align stage: a source model's topk dataset -> its distributions on the target's positions
and vocabulary (`aligned/`), shard by shard, following the target's shards.

Per target shard the stage reads the source windows of the same documents (the two models may
window a document differently: alignment works on absolute document byte offsets, so that does
not matter), aligns positions (`bytes` or `dtw`), maps ids with the vocabulary map (EM or MinED,
computed once and cached) and projects the source top-k into target ids (fusedata/align.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.align import align_tables
from fusedata.codec import DEFAULT_CODEC, get_codec
from fusedata.dataset import (
    DatasetDir,
    check_same_corpus,
    open_dataset,
    read_shard,
    run_digest,
    table_tokens,
    target_identity,
)
from fusedata.errors import UsageError, check_options, field_choices
from fusedata.stages.base import JobOptions, Stage, Task
from fusedata.storage import locate
from schemas.aligned import ALIGN_KINDS, aligned_schema
from schemas.manifest import Manifest


@dataclass(frozen=True)
class AlignConfig:
    vocab: str = field(default="mined", metadata={"choices": ("mined", "exact")})  # MinED or exact match (EM)
    sequence: str = field(default="bytes", metadata={"choices": ("bytes", "dtw")})  # position alignment
    codec: str = DEFAULT_CODEC
    cache_dir: str = ""  # vocabulary map cache; "" = the model cache

    def __post_init__(self) -> None:
        check_options(field_choices(self))


@dataclass(frozen=True)
class AlignJob(JobOptions):
    target: str
    source: str
    output: str
    config: AlignConfig = field(default_factory=AlignConfig)


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


class AlignStage(Stage):
    """One target shard name in -> the aligned shard. Loads the vocabulary map once per worker."""

    kind = "aligned"

    def __init__(self, job: AlignJob) -> None:
        self.job, self.config, self.output = job, job.config, job.output
        # resolved once: the workers get the filesystems (and their settings) with the stage
        self.target_dir, self.source_dir = locate(job.target), locate(job.source)
        self.target = open_dataset(self.target_dir, "topk", verify=job.verify)
        self.source = open_dataset(self.source_dir, "topk", verify=job.verify)
        check_same_corpus(self.source, job.source, self.target, job.target)
        self.k, self.target_vocab = int(self.source.run["top_k"]), int(self.target.run["vocab_size"])
        self.codec = get_codec(job.config.codec)
        self.codec.check_k(self.k)
        self.schema = aligned_schema(self.codec.fields(), self.codec.metadata(), self.k)
        self.label = f"align {self.source.run['model']} -> {self.target.run['model']}"
        self.vocab_map: np.ndarray | None = None  # in a worker, after setup()
        self.map_path = ""
        self.mapped_share = 0.0
        self.source_index: dict[str, list[str]] = {}
        self.texts: tuple[list, list] | None = None

    def identity(self) -> dict[str, Any]:
        target, source = self.target.run, self.source.run
        return {
            "stage": "align",
            "target": target_identity(target),
            "target_run": run_digest(target),
            "source": {"model": source["model"], "tokenizer_hash": source["tokenizer_hash"],
                       "model_hash": source["model_hash"], "licence": source.get("licence"),
                       **({"targets": source["targets"]} if "targets" in source else {})},  # sampled: fuse checks kinds
            "source_run": run_digest(source),
            "align": {k: v for k, v in self.config.__dict__.items() if k != "cache_dir"},
            "top_k": source["top_k"],
            "vocab_size": target["vocab_size"],
            "model": source["model"],
        }

    def inputs(self) -> list[str]:
        return [self.job.target, self.job.source]

    def tasks(self) -> list[Task]:
        """Load both tokenizers, build (or read the cached) vocabulary map, index the source's
        documents by shard; one task per target shard."""
        from fusedata.models.cache import cache_root
        from fusedata.vocab import token_texts, vocab_map

        tgt_tok = _tokenizer_of(self.target.run, self.job.target)
        src_tok = _tokenizer_of(self.source.run, self.job.source)
        cache = Path(self.config.cache_dir) if self.config.cache_dir else cache_root().parent / "vocab"
        vmap = vocab_map(src_tok, tgt_tok, self.config.vocab, int(self.source.run["vocab_size"]), cache,
                         log=None if self.job.quiet else self.job.log)
        self.mapped_share = float((vmap >= 0).mean())
        # the workers load the map from a file named by its content, so a changed map is never stale
        map_path = cache / f"map-{hashlib.sha256(vmap.tobytes()).hexdigest()[:20]}.npy"
        if not map_path.is_file():
            np.save(map_path.with_suffix(".tmp.npy"), vmap)
            map_path.with_suffix(".tmp.npy").replace(map_path)
        self.map_path = str(map_path)
        for s in self.source.shards:
            for d in set(read_shard(self.source_dir / s.name, columns=["doc_id"]).column(0).to_pylist()):
                self.source_index.setdefault(d, []).append(s.name)
        self.texts = (token_texts(tgt_tok), token_texts(src_tok)) if self.config.sequence == "dtw" else None
        return [Task(s.name) for s in self.target.shards]

    def setup(self) -> None:
        self.vocab_map = np.load(self.map_path)

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        if self.vocab_map is None:
            self.setup()
        target = read_shard(self.target_dir / task.name)
        docs = set(target.column("doc_id").to_pylist())
        shards = sorted({s for d in docs for s in self.source_index.get(d, [])})
        parts = [read_shard(self.source_dir / s, filters=[("doc_id", "in", list(docs))]) for s in shards]
        source_rows = pa.concat_tables(parts) if parts else pa.table({"doc_id": pa.array([], pa.string())})
        out = align_tables(target, source_rows, self.vocab_map, self.target_vocab, self.codec, self.schema, self.texts)
        if on_tokens is not None:
            on_tokens(table_tokens(target))
        return out

    def teardown(self) -> None:
        self.vocab_map = None

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        return aligned_stats(out, names) | {"vocab_mapped": self.mapped_share}

    def summary(self, manifest: Manifest) -> str:
        stats = manifest.stats
        share = ", ".join(f"{k} {v:.1%}" for k, v in stats["kinds"].items())
        return f"{self.output}: {stats['positions']:,} target positions: {share}; mass kept {stats['mass_kept']:.3f}"


def run_align(job: AlignJob, executor: Any = None) -> Manifest:
    """Align `job.source`'s topk dataset to `job.target`'s, into `job.output`."""
    from fusedata.stages.base import run_stage

    return run_stage(AlignStage(job), executor, overwrite=job.overwrite, quiet=job.quiet, log=job.log).manifest


def aligned_stats(out: DatasetDir, names: list[str]) -> dict[str, Any]:
    counts = np.zeros(len(ALIGN_KINDS))
    mass = 0.0
    for name in names:
        t = read_shard(out.shard_path(name), columns=["align_kind", "mass_kept"])
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
