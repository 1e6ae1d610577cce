"""`fusedata plan`: tokens, disk and time per stage of a pipeline file, before running it.

Token counts come from each model's tokenizer on a sample of the corpus; rates from the reference
figures below (or a short measured run with `measure`); finished stages count zero.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fusedata.pipeline.config import Pipeline, load_pipeline
from fusedata.pipeline.run import EvalStep, TrainStep
from schemas.manifest import MANIFEST_NAME

# Reference rates for estimates (the measured figures are in the README's benchmarks): extract
# tokens/s of a 135M-parameter model on 2 CPU cores, scaled by parameter count and cores.
CPU_REF_PARAMS, CPU_REF_TOKENS_PER_S, CPU_REF_CORES = 135e6, 300.0, 2
GPU_SPEEDUP = 30.0  # rough: a small model on one GPU vs 2 CPU cores
TRAIN_COST = 2.2  # a training step (forward + backward) costs ~this many extract forwards per token
ALIGN_POSITIONS_PER_S = 200_000.0  # byte matching + projection, per core
DTW_POSITIONS_PER_S = 100_000.0
FUSE_POSITIONS_PER_S = 300_000.0


def bytes_per_position(codec: str, k: int) -> float:
    """Parquet bytes per position of a topk dataset (the README's codec table at k=10), scaled
    with k: the top-k columns grow with k, the token/offset columns do not."""
    if codec == "raw":
        return 4.0 + 8.0 * k
    return 2.0 + 2.2 * k


def _params(path: str) -> int:
    """Parameter count from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n += math.prod(shape)
    return n


def _first_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt_time(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _measure_rate(spec: str, docs: Any, pipe: Pipeline) -> float:
    """Extract tokens/s of a short real run on the sample (model load excluded)."""
    from fusedata.stages.extract import ExtractStage

    cfg = pipe.extract[0].config
    stage = ExtractStage(replace(cfg, model=spec))
    stage.setup()
    tokens = 0

    def count(n: int) -> None:
        nonlocal tokens
        tokens += n

    try:
        t0 = time.perf_counter()
        stage(docs, count)
        return tokens / max(time.perf_counter() - t0, 1e-6)
    finally:
        stage.teardown()


def plan_pipeline(path: str | Path | Pipeline, sample_docs: int = 64, measure: bool = False,
                  cpus: int | None = None) -> dict[str, Any]:
    """Estimate tokens, disk and time per stage before running, from the first `sample_docs`
    documents tokenised by each model (no forward pass unless `measure`). Finished stages count
    zero. Warns when the free space where the output goes is smaller than what is still to come."""
    import tempfile

    from fusedata.corpus import read_corpus
    from fusedata.models.spec import load_tokenizer, resolve

    pipe = path if isinstance(path, Pipeline) else load_pipeline(path, lambda m: None)
    cpus = cpus or os.cpu_count() or 1
    warnings: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = list(pipe.corpus_inputs)
        if pipe.demo_corpus and not Path(inputs[0]).is_file():
            from fusedata.demo_corpus import build_demo_corpus

            dc = pipe.demo_corpus
            inputs[0] = str(Path(tmp) / "corpus.jsonl")
            build_demo_corpus(Path(inputs[0]), dc["per_domain"], dc["max_chars"], dc["skip"])
        job = pipe.extract[0]
        docs, _ = read_corpus(inputs, job.text_field, job.id_field, job.skip_bad_lines)
    texts = docs.column("text").to_pylist()
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    sample = docs.slice(0, min(sample_docs, docs.num_rows))
    sample_texts = sample.column("text").to_pylist()
    sample_bytes = max(sum(len(t.encode("utf-8")) for t in sample_texts), 1)
    n_docs = docs.num_rows
    n_shards = max(1, math.ceil(n_docs / job.docs_per_shard))

    stages: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    k = job.config.top_k
    codec = job.config.codec
    device = job.config.device
    parallel = max(1, min(pipe.workers, cpus)) if pipe.executor == "ray" else 1
    target_positions = 0.0
    target_rate = 0.0
    target_params = 0
    for mdl, ejob in zip([pipe.target, *pipe.sources], pipe.extract, strict=True):
        ref = resolve(mdl.spec)
        tok = load_tokenizer(ref)
        ids = tok(sample_texts, add_special_tokens=True)["input_ids"] if sample_texts else []
        sample_tokens = sum(len(x) for x in ids)
        tokens = sample_tokens * total_bytes / sample_bytes
        positions = max(tokens - n_docs, 0.0)
        params = _params(ref.path)
        if measure and sample.num_rows:
            rate, how = _measure_rate(mdl.spec, sample, pipe), "measured"
        else:
            rate = CPU_REF_TOKENS_PER_S * CPU_REF_PARAMS / max(params, 1) * max(cpus / parallel, 1) / CPU_REF_CORES
            rate = min(rate, 200_000.0)
            how = "table"
            if device.startswith("cuda"):
                rate *= GPU_SPEEDUP
                how = "table (GPU, rough)"
        rate *= parallel
        done = (Path(ejob.output) / MANIFEST_NAME).is_file()
        disk = positions * bytes_per_position(codec, k)
        models.append({"name": mdl.name, "model": mdl.spec, "params": params, "tokens": round(tokens),
                       "tokens_per_byte": sample_tokens / sample_bytes, "tokens_per_s": round(rate, 1),
                       "rate_from": how})
        stages.append({"stage": f"extract {mdl.name}", "output": ejob.output, "tokens": round(tokens),
                       "disk_bytes": 0 if done else round(disk), "seconds": 0.0 if done else tokens / rate,
                       "done": done})
        if mdl is pipe.target:
            target_positions, target_rate, target_params = positions, rate, params
    align_rate = (DTW_POSITIONS_PER_S if pipe.align and pipe.align[0].config.sequence == "dtw"
                  else ALIGN_POSITIONS_PER_S) * parallel
    for ajob, mdl in zip(pipe.align, pipe.sources, strict=True):
        done = (Path(ajob.output) / MANIFEST_NAME).is_file()
        disk = target_positions * (bytes_per_position(codec, k) - 1.0)
        stages.append({"stage": f"align {mdl.name}", "output": ajob.output, "tokens": round(target_positions),
                       "disk_bytes": 0 if done else round(disk),
                       "seconds": 0.0 if done else target_positions / align_rate + n_shards * 0.05, "done": done})
    k_out = pipe.fuse.config.k_out or k
    done = (Path(pipe.fuse.output) / MANIFEST_NAME).is_file()
    stages.append({"stage": "fuse", "output": pipe.fuse.output, "tokens": round(target_positions),
                   "disk_bytes": 0 if done else round(target_positions * (bytes_per_position(codec, k_out) + 2.0)),
                   "seconds": 0.0 if done else target_positions / (FUSE_POSITIONS_PER_S * parallel) + n_shards * 0.05,
                   "done": done})
    if pipe.train:
        cfg = pipe.train
        steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * target_positions / cfg.batch_tokens / cfg.grad_accum))
        train_tokens = steps * cfg.grad_accum * cfg.batch_tokens
        done = (Path(pipe.fuse.output) / MANIFEST_NAME).is_file() and TrainStep(cfg, print).is_done()
        train_rate = target_rate / parallel / TRAIN_COST
        stages.append({"stage": "train", "output": cfg.output, "tokens": round(train_tokens),
                       "disk_bytes": 0 if done else target_params * 4 * 3,  # weights + two AdamW moments
                       "seconds": 0.0 if done else train_tokens / max(train_rate, 1e-9), "done": done})
    if pipe.eval:
        spec = pipe.eval
        held_tokens = 0.0
        for f in spec.inputs:
            held_tokens += (Path(f).stat().st_size if Path(f).is_file() else 20_000) * models[0]["tokens_per_byte"]
        mc_tokens = 100 * spec.limit * len(spec.tasks)  # ~100 tokens per multiple-choice item, all choices
        eval_tokens = held_tokens + mc_tokens
        done = EvalStep(spec, print).is_done()
        stages.append({"stage": "eval", "output": spec.output, "tokens": round(eval_tokens), "disk_bytes": 0,
                       "seconds": 0.0 if done else eval_tokens / max(target_rate / parallel, 1e-9), "done": done})

    needed = sum(s["disk_bytes"] for s in stages)
    where = _first_existing(pipe.output)
    usage = shutil.disk_usage(where)
    if needed * 1.1 > usage.free:
        warnings.append(f"not enough disk: the remaining stages need ~{_fmt_bytes(needed)} under {pipe.output}, "
                        f"but only {_fmt_bytes(usage.free)} is free on {where}")
    if docs.num_rows == 0:
        warnings.append("the corpus has no documents")
    return {
        "pipeline": str(pipe.path),
        "output": str(pipe.output),
        "corpus": {"docs": n_docs, "bytes": total_bytes, "sample_docs": sample.num_rows, "shards": n_shards},
        "executor": {"kind": pipe.executor, "workers": parallel, "cpus": cpus, "device": device},
        "k": k, "codec": codec,
        "models": models,
        "stages": stages,
        "total": {"disk_bytes": needed, "seconds": sum(s["seconds"] for s in stages)},
        "disk": {"path": str(where), "free_bytes": usage.free, "needed_bytes": needed},
        "warnings": warnings,
    }


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as a table for people."""
    c = plan["corpus"]
    lines = [
        f"pipeline {plan['pipeline']} -> {plan['output']}",
        f"corpus: {c['docs']:,} docs, {_fmt_bytes(c['bytes'])} of text, {c['shards']} shards "
        f"(estimates from the first {c['sample_docs']} docs)   k {plan['k']}, codec {plan['codec']}",
    ]
    for m in plan["models"]:
        lines.append(f"  model {m['name']} ({m['model']}): {m['params'] / 1e6:,.1f}M params, "
                     f"{m['tokens_per_byte']:.3f} tokens/byte, ~{m['tokens_per_s']:,.0f} tok/s ({m['rate_from']})")
    header = f"{'stage':<22} {'tokens':>14} {'disk':>10} {'time':>10}  status"
    lines += ["", header, "-" * len(header)]
    for s in plan["stages"]:
        lines.append(f"{s['stage']:<22} {s['tokens']:>14,} {_fmt_bytes(s['disk_bytes']):>10} "
                     f"{_fmt_time(s['seconds']):>10}  {'done' if s['done'] else 'to do'}")
    t = plan["total"]
    lines.append("-" * len(header))
    lines.append(f"{'total (remaining)':<22} {'':>14} {_fmt_bytes(t['disk_bytes']):>10} {_fmt_time(t['seconds']):>10}")
    d = plan["disk"]
    lines.append(f"free disk at {d['path']}: {_fmt_bytes(d['free_bytes'])}")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)
