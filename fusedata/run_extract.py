"""Drive an extract run: read the corpus, shard it, run the stage, write the manifest."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fusedata.corpus import expand_inputs, read_corpus, shard_docs
from fusedata.dataset import DatasetDir, shard_name
from fusedata.executor import Executor, LocalExecutor, ShardTask, run_stage
from fusedata.extract import ExtractConfig, ExtractStage, corpus_hash
from schemas.manifest import Manifest


@dataclass
class ExtractJob:
    inputs: list[str]
    output: str
    config: ExtractConfig
    text_field: str = "text"
    id_field: str = "id"
    skip_bad_lines: bool = False
    docs_per_shard: int = 64
    overwrite: bool = False
    quiet: bool = False
    log: Any = field(default=print, repr=False)


def run_extract(job: ExtractJob, executor: Executor | None = None) -> Manifest:
    executor = (executor or LocalExecutor()).with_gpu(job.config.wants_gpu())
    docs, cstats = read_corpus(job.inputs, job.text_field, job.id_field, job.skip_bad_lines)
    stage = ExtractStage(job.config)
    run = {
        "stage": "extract",
        **stage.identity(),
        "corpus_hash": corpus_hash(docs),
        "docs": docs.num_rows,
        "docs_per_shard": job.docs_per_shard,
    }
    shards = shard_docs(docs, job.docs_per_shard)
    by_name = {shard_name(i): t for i, t in enumerate(shards)}

    def stats(out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        result = topk_stats(out, names)
        result.update(
            files=cstats.files,
            empty_docs_skipped=cstats.empty_skipped,
            docs_too_short=docs.num_rows - result["docs"],  # fewer than two tokens: nothing to predict
            bad_lines_skipped=cstats.bad_skipped,
            tokens_per_second_this_run=round(rate, 1),
        )
        return result

    manifest = run_stage(
        kind="topk", output=job.output, run=run, names=list(by_name), executor=executor, stats=stats,
        make_stage=functools.partial(ExtractStage, job.config, stage.ref), label=f"extract {job.config.model}",
        make_task=lambda n: ShardTask(n, by_name[n]), count_docs=True, overwrite=job.overwrite,
        inputs=[str(p) for p, _ in expand_inputs(job.inputs)], quiet=job.quiet,
        log=job.log,
    )
    job.log(
        f"{job.output}: {manifest.rows} windows, {manifest.tokens:,} tokens, "
        f"mean CE {manifest.stats['mean_ce']:.3f} nats, {manifest.stats['bytes_per_token']:.1f} bytes/token"
    )
    return manifest


def topk_stats(out: DatasetDir, names: list[str]) -> dict[str, Any]:
    """Summary statistics read back from the written shards (so a resumed run counts all)."""
    positions = 0
    ce_sum = 0.0
    tokens = 0
    docs: set[str] = set()
    total_bytes = 0
    for name in names:
        path = out.shard_path(name)
        t = pq.read_table(path, columns=["doc_id", "input_ids", "ce"])
        n = t.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        # windows of n tokens predict n-1 positions (the BOS-prefixed ones too)
        pos = np.maximum(n - 1, 0)
        positions += int(pos.sum())
        tokens += int(n.sum())
        ce_sum += float((t.column("ce").to_numpy() * pos).sum())
        docs.update(t.column("doc_id").to_pylist())
        total_bytes += path.stat().st_size
    return {
        "docs": len(docs),
        "windows": sum(pq.read_metadata(out.shard_path(n)).num_rows for n in names),
        "tokens": tokens,
        "positions": positions,
        "mean_ce": ce_sum / max(positions, 1),
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(positions, 1),
    }
