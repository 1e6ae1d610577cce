"""`fusedata plan`: tokens, disk and time per stage of a pipeline file, before running it.

Token counts come from each model's tokenizer on a sample of the corpus; rates from the reference
figures below (or a short measured run with `measure`); finished stages count zero.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fusedata.codec import DEFAULT_CODEC
from fusedata.errors import check_options, choice
from fusedata.pipeline.config import Pipeline, load_pipeline
from fusedata.pipeline.run import EvalStep, TrainStep
from fusedata.storage import is_uri, locate
from schemas.manifest import MANIFEST_NAME

# Reference rates for estimates (the measured figures are in the README's benchmarks): extract
# tokens/s of a 135M-parameter model on 2 CPU cores, scaled by parameter count and cores.
CPU_REF_PARAMS, CPU_REF_TOKENS_PER_S, CPU_REF_CORES = 135e6, 300.0, 2
GPU_SPEEDUP = 30.0  # rough: a small model on one GPU vs 2 CPU cores
TRAIN_COST = 2.2  # a training step (forward + backward) costs ~this many extract forwards per token
ALIGN_POSITIONS_PER_S = 200_000.0  # byte matching + projection, per core
DTW_POSITIONS_PER_S = 100_000.0
FUSE_POSITIONS_PER_S = 300_000.0
EXPORT_POSITIONS_PER_S = 10_000.0  # decode + lists, per core: 43k positions took 2.6 s (plain), 9 s (axolotl) at load 13
# an export's size relative to the fused dataset in zq (README, fused MinCE at k = 10: zq 27.8, plain
# 32.5, axolotl 70.7 (renormalised float32 log-probs compress badly), trl 2.2 bytes/position)
EXPORT_SIZE = {"plain": 1.17, "axolotl": 2.54, "trl": 0.08}


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
        if pipe.demo_corpus and not locate(inputs[0]).is_file():
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
        done = (locate(ejob.output) / MANIFEST_NAME).is_file()
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
        done = (locate(ajob.output) / MANIFEST_NAME).is_file()
        disk = target_positions * (bytes_per_position(codec, k) - 1.0)
        stages.append({"stage": f"align {mdl.name}", "output": ajob.output, "tokens": round(target_positions),
                       "disk_bytes": 0 if done else round(disk),
                       "seconds": 0.0 if done else target_positions / align_rate + n_shards * 0.05, "done": done})
    k_out = pipe.fuse.config.k_out or k
    done = (locate(pipe.fuse.output) / MANIFEST_NAME).is_file()
    stages.append({"stage": "fuse", "output": pipe.fuse.output, "tokens": round(target_positions),
                   "disk_bytes": 0 if done else round(target_positions * (bytes_per_position(codec, k_out) + 2.0)),
                   "seconds": 0.0 if done else target_positions / (FUSE_POSITIONS_PER_S * parallel) + n_shards * 0.05,
                   "done": done})
    for xjob in pipe.export:
        done = (Path(xjob.output) / MANIFEST_NAME).is_file()
        disk = target_positions * bytes_per_position(codec, k_out) * EXPORT_SIZE.get(xjob.config.layout, 2.5)
        stages.append({"stage": f"export {xjob.config.layout}", "output": xjob.output,
                       "tokens": round(target_positions), "disk_bytes": 0 if done else round(disk),
                       "seconds": 0.0 if done else target_positions / (EXPORT_POSITIONS_PER_S * parallel),
                       "done": done})
    if pipe.train:
        cfg = pipe.train
        steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * target_positions / cfg.batch_tokens / cfg.grad_accum))
        train_tokens = steps * cfg.grad_accum * cfg.batch_tokens
        done = (locate(pipe.fuse.output) / MANIFEST_NAME).is_file() and TrainStep(cfg, print).is_done()
        train_rate = target_rate / parallel / TRAIN_COST
        stages.append({"stage": "train", "output": cfg.output, "tokens": round(train_tokens),
                       "disk_bytes": 0 if done else target_params * 4 * 3,  # weights + two AdamW moments
                       "seconds": 0.0 if done else train_tokens / max(train_rate, 1e-9), "done": done})
    if pipe.eval:
        spec = pipe.eval
        held_tokens = 0.0
        for f in spec.inputs:
            held_tokens += (locate(f).size() if locate(f).is_file() else 20_000) * models[0]["tokens_per_byte"]
        mc_tokens = 100 * spec.limit * len(spec.tasks)  # ~100 tokens per multiple-choice item, all choices
        eval_tokens = held_tokens + mc_tokens
        done = EvalStep(spec, print).is_done()
        stages.append({"stage": "eval", "output": spec.output, "tokens": round(eval_tokens), "disk_bytes": 0,
                       "seconds": 0.0 if done else eval_tokens / max(target_rate / parallel, 1e-9), "done": done})

    needed = sum(s["disk_bytes"] for s in stages)
    where: Path | str = str(pipe.output)  # object storage: no free space to check
    free = None
    if not is_uri(pipe.output):
        where = _first_existing(Path(pipe.output))
        free = shutil.disk_usage(where).free
        if needed * 1.1 > free:
            warnings.append(f"not enough disk: the remaining stages need ~{_fmt_bytes(needed)} under {pipe.output}, "
                            f"but only {_fmt_bytes(free)} is free on {where}")
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
        "disk": {"path": str(where), "free_bytes": free, "needed_bytes": needed},
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
    if d["free_bytes"] is not None:
        lines.append(f"free disk at {d['path']}: {_fmt_bytes(d['free_bytes'])}")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


# -- what-if: a corpus and models that are not on this machine --------------------------------------
# Throughput assumptions of `plan_scale` (stated in its output): a dense forward costs 2·params FLOPs
# per token, a training step (forward + backward) 6·params; a GPU sustains `mfu` of its dense bf16
# peak (312 TFLOP/s: an A100; an H100 SXM is ~989) on long prefill batches; align and fuse run on CPU
# cores at the per-core rates above (ALIGN_POSITIONS_PER_S, FUSE_POSITIONS_PER_S).
FORWARD_FLOPS_PER_PARAM, TRAIN_FLOPS_PER_PARAM = 2.0, 6.0


@dataclass(frozen=True)
class ScaleConfig:
    """A what-if run: `models` models of `params` parameters each over `docs` documents of `tokens`
    tokens (per model: tokenizers differ, take the largest), on `gpus` GPUs and `cpus` cores."""

    docs: int = 1_000_000  # MiniPile: 1M documents
    tokens: float = 1.8e9  # and ~1.8B tokens
    models: int = 3  # the target and two sources, as in FuseLLM
    params: float = 7e9
    gpus: int = 8
    cpus: int = 64  # cores for align and fuse
    top_k: int = 10
    codec: str = DEFAULT_CODEC
    gpu_tflops: float = 312.0  # dense bf16 peak of one GPU
    mfu: float = 0.4  # share of that peak sustained
    train: bool = True  # include distilling into the target (one epoch over the fused positions)
    docs_per_shard: int = 64

    def __post_init__(self) -> None:
        check_options([
            ("docs", self.docs >= 1, f"must be >= 1, got {self.docs}"),
            ("tokens", math.isfinite(self.tokens) and self.tokens > self.docs,
             f"must be more than the documents ({self.docs:,}), got {self.tokens:g}"),
            ("models", self.models >= 1, f"must be >= 1, got {self.models}"),
            ("params", math.isfinite(self.params) and self.params > 0, f"must be > 0, got {self.params:g}"),
            ("gpus", self.gpus >= 1, f"must be >= 1, got {self.gpus}"),
            ("cpus", self.cpus >= 1, f"must be >= 1, got {self.cpus}"),
            ("top_k", self.top_k >= 1, f"must be >= 1, got {self.top_k}"),
            choice("codec", self.codec, ("zq", "raw")),  # the codecs bytes_per_position knows
            ("gpu_tflops", math.isfinite(self.gpu_tflops) and self.gpu_tflops > 0, f"must be > 0, got {self.gpu_tflops:g}"),
            ("mfu", 0 < self.mfu <= 1, f"must be in (0, 1], got {self.mfu:g}"),
            ("docs_per_shard", self.docs_per_shard >= 1, f"must be >= 1, got {self.docs_per_shard}"),
        ])


def plan_scale(cfg: ScaleConfig) -> dict[str, Any]:
    """Tokens, disk and hours per stage of a what-if run, and the stage that bounds it."""
    positions = cfg.tokens - cfg.docs  # a document's n tokens predict n-1 positions
    bpp = bytes_per_position(cfg.codec, cfg.top_k)
    flops = cfg.gpu_tflops * 1e12 * cfg.mfu  # sustained FLOP/s of one GPU
    extract_rate = cfg.gpus * flops / (FORWARD_FLOPS_PER_PARAM * cfg.params)  # tokens/s, all GPUs
    stages = [{"stage": f"extract model {i + 1}", "group": "extract", "tokens": cfg.tokens,
               "disk_bytes": positions * bpp, "tokens_per_s": extract_rate, "seconds": cfg.tokens / extract_rate,
               "on": f"{cfg.gpus} GPUs"} for i in range(cfg.models)]
    align_rate = ALIGN_POSITIONS_PER_S * cfg.cpus
    stages += [{"stage": f"align source {i + 1}", "group": "align", "tokens": positions,
                "disk_bytes": positions * (bpp - 1.0), "tokens_per_s": align_rate, "seconds": positions / align_rate,
                "on": f"{cfg.cpus} cores"} for i in range(cfg.models - 1)]
    fuse_rate = FUSE_POSITIONS_PER_S * cfg.cpus
    stages.append({"stage": "fuse", "group": "fuse", "tokens": positions, "disk_bytes": positions * (bpp + 2.0),
                   "tokens_per_s": fuse_rate, "seconds": positions / fuse_rate, "on": f"{cfg.cpus} cores"})
    if cfg.train:
        train_rate = cfg.gpus * flops / (TRAIN_FLOPS_PER_PARAM * cfg.params)
        stages.append({"stage": "train target", "group": "train", "tokens": positions,
                       "disk_bytes": cfg.params * 4 * 3,  # fp32 weights + two AdamW moments
                       "tokens_per_s": train_rate, "seconds": positions / train_rate, "on": f"{cfg.gpus} GPUs"})
    groups: dict[str, float] = {}
    for s in stages:
        groups[s["group"]] = groups.get(s["group"], 0.0) + s["seconds"]
    bound = max(groups, key=lambda g: groups[g])  # ties: the earlier stage of the pipeline
    return {
        "config": asdict(cfg),
        "positions": positions,
        "bytes_per_position": bpp,
        "disk_per_model_bytes": positions * bpp,
        "shards": math.ceil(cfg.docs / cfg.docs_per_shard),
        "stages": stages,
        "groups_seconds": groups,
        "total": {"seconds": sum(groups.values()), "disk_bytes": sum(s["disk_bytes"] for s in stages)},
        "bound_by": bound,
        "assumptions": [
            f"forward {FORWARD_FLOPS_PER_PARAM:g}·params FLOPs/token, training {TRAIN_FLOPS_PER_PARAM:g}·params",
            f"one GPU sustains {cfg.mfu:.0%} of {cfg.gpu_tflops:g} TFLOP/s: "
            f"{extract_rate / cfg.gpus:,.0f} extract tokens/s per GPU at {cfg.params / 1e9:g}B params",
            f"align {ALIGN_POSITIONS_PER_S:,.0f} and fuse {FUSE_POSITIONS_PER_S:,.0f} positions/s per core",
            f"disk: {bpp:.1f} bytes/position ({cfg.codec}, k={cfg.top_k}; bytes_per_position)",
            "stages run one after another; every model's tokens taken as --tokens",
        ],
    }


def render_scale(plan: dict[str, Any]) -> str:
    c = plan["config"]
    lines = [f"what-if: {c['docs']:,} docs, {c['tokens']:,.0f} tokens, {c['models']} models of "
             f"{c['params'] / 1e9:g}B params, {c['gpus']} GPUs, {c['cpus']} cores, k {c['top_k']}, codec {c['codec']}",
             f"{plan['shards']:,} shards of {c['docs_per_shard']} docs; "
             f"disk per model {_fmt_bytes(plan['disk_per_model_bytes'])}"]
    header = f"{'stage':<18} {'tokens':>16} {'disk':>10} {'tok/s':>12} {'hours':>8}  on"
    lines += ["", header, "-" * len(header)]
    for s in plan["stages"]:
        lines.append(f"{s['stage']:<18} {s['tokens']:>16,.0f} {_fmt_bytes(s['disk_bytes']):>10} "
                     f"{s['tokens_per_s']:>12,.0f} {s['seconds'] / 3600:>8.2f}  {s['on']}")
    t = plan["total"]
    lines.append("-" * len(header))
    lines.append(f"{'total':<18} {'':>16} {_fmt_bytes(t['disk_bytes']):>10} {'':>12} {t['seconds'] / 3600:>8.2f}")
    g = plan["groups_seconds"]
    ranked = sorted(g, key=lambda k: -g[k])
    lines.append(f"bounded by {plan['bound_by']}: {g[plan['bound_by']] / 3600:.2f} h of {t['seconds'] / 3600:.2f} h"
                 + (f" (next: {ranked[1]}, {g[ranked[1]] / 3600:.2f} h)" if len(ranked) > 1 else ""))
    lines += ["assumptions:"] + [f"  {a}" for a in plan["assumptions"]]
    return "\n".join(lines)
