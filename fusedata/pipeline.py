"""One file describes a whole fusion run: `fusedata run pipeline.toml` / `fusedata plan pipeline.toml`.

The TOML file names the corpus, the target and source models, k and codec, and the settings of
align, fuse, train and eval. It is parsed into the very job dataclasses the single-stage commands
build (`ExtractJob`, `AlignJob`, `FuseJob`, `TrainConfig`), so a pipeline run and the equivalent
sequence of commands produce the same folders, and a rerun is a no-op stage by stage (each stage
already skips a finished identical run). Every key is checked, so a typo fails at once with the
key's name instead of silently falling back to a default hours into a run.

Before a finished dataset is trusted, its shards are checked against the sha256 in its manifest
(`verify_dataset`): a damaged shard is deleted together with the manifest and the stage reruns,
recomputing only that shard.

Layout of a pipeline's outputs (all under `[pipeline] output`):
`corpus.jsonl` (demo corpus only), `topk/<model>/`, `aligned/<source>/`, `fused/`, `plots/`,
`ckpt/`, `heldout.jsonl` (demo held-out only), `eval.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fusedata.codec import DEFAULT_CODEC
from fusedata.dataset import atomic_write_text, sha256_file
from fusedata.errors import OptionError, UsageError
from fusedata.extract import ExtractConfig
from fusedata.run_align import AlignConfig, AlignJob
from fusedata.run_extract import ExtractJob
from fusedata.run_fuse import FuseConfig, FuseJob
from fusedata.train import TrainConfig
from schemas.manifest import MANIFEST_NAME, Manifest

_REQUIRED = object()
EVAL_NAME = "eval.json"


# --- parsing -----------------------------------------------------------------------------------
class _Section:
    """A TOML table whose keys are taken one by one with a type check; `done()` rejects the rest,
    so every error names the full dotted key."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise UsageError(f"{where}: expected a table, got {type(data).__name__}")
        self.data, self.where, self.used = data, where, set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, typ: type | tuple, default: Any = _REQUIRED, choices: tuple | None = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                raise UsageError(f"{self.key(name)}: missing (required)")
            return default
        value = self.data[name]
        ok = isinstance(value, typ) and not (isinstance(value, bool) and bool not in _as_tuple(typ))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            want = " or ".join(t.__name__ for t in _as_tuple(typ))
            raise UsageError(f"{self.key(name)}: expected {want}, got {value!r}")
        if choices is not None and value not in choices:
            raise UsageError(f"{self.key(name)}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    def strings(self, name: str, default: Any = _REQUIRED) -> list[str]:
        value = self.get(name, (list, str), default)
        if isinstance(value, str):
            return [value]
        if not all(isinstance(v, str) for v in value):
            raise UsageError(f"{self.key(name)}: expected a list of strings, got {value!r}")
        return list(value)

    def positive(self, name: str, default: Any = _REQUIRED, zero_ok: bool = False) -> int:
        value = self.get(name, int, default)
        if value < 0 or (value == 0 and not zero_ok):
            raise UsageError(f"{self.key(name)}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")
        return value

    def sub(self, name: str) -> _Section | None:
        self.used.add(name)
        return _Section(self.data[name], self.key(name)) if name in self.data else None

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise UsageError(f"{self.key(unknown[0])}: unknown key (known here: {known})")


def _as_tuple(typ: type | tuple) -> tuple:
    return typ if isinstance(typ, tuple) else (typ,)


@dataclass
class ModelEntry:
    name: str  # folder name under topk/ and aligned/
    spec: str  # model spec as for `fusedata extract --model`


@dataclass
class EvalSpec:
    model: str
    inputs: list[str]
    tasks: list[str]
    limit: int
    max_length: int
    output: str  # eval.json


@dataclass
class Pipeline:
    """A parsed, validated pipeline file: the jobs of every stage, in order."""

    path: Path
    output: Path
    executor: str  # ray | local
    address: str | None
    workers: int
    verify: bool
    target: ModelEntry
    sources: list[ModelEntry]
    demo_corpus: dict[str, int] | None
    corpus_inputs: list[str]
    extract: list[ExtractJob]  # target first
    align: list[AlignJob]
    fuse: FuseJob
    plots: str | None
    train: TrainConfig | None
    demo_heldout: dict[str, int] | None
    eval: EvalSpec | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def _model(value: Any, where: str) -> ModelEntry:
    if isinstance(value, str):
        return ModelEntry(_default_name(value), value)
    sec = _Section(value, where)
    spec = sec.get("model", str)
    entry = ModelEntry(sec.get("name", str, _default_name(spec)), spec)
    sec.done()
    if not entry.name or "/" in entry.name or entry.name.startswith("."):
        raise UsageError(f"{where}.name: {entry.name!r} is not a valid folder name")
    return entry


def _default_name(spec: str) -> str:
    """`smollm2-135m` -> `smollm2-135m`; `models/My-Model/` -> `my-model`; `x.gguf` -> `x`."""
    name = Path(spec.rstrip("/")).name
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()) or "model"


def _demo(sec: _Section | None, defaults: dict[str, int]) -> dict[str, int] | None:
    if sec is None:
        return None
    out = {
        "per_domain": sec.positive("per_domain", defaults["per_domain"]),
        "max_chars": sec.positive("max_chars", defaults["max_chars"]),
        "skip": sec.positive("skip", defaults["skip"], zero_ok=True),
    }
    sec.done()
    return out


def load_pipeline(path: str | Path, log: Callable[[str], None] = print) -> Pipeline:
    """Parse and validate a pipeline file. Relative paths in it are relative to the current
    directory (as for the single-stage commands), not to the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such pipeline file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    root = _Section(data, "")

    p = root.sub("pipeline") or _Section({}, "pipeline")
    output = Path(p.get("output", str))
    top_k = p.positive("top_k", 10)
    codec = p.get("codec", str, DEFAULT_CODEC)
    from fusedata.codec import get_codec

    try:
        get_codec(codec)
    except Exception as exc:  # noqa: BLE001 - the codec registry's own message is the clearest
        raise UsageError(f"pipeline.codec: {exc}") from None
    executor = p.get("executor", str, "ray", choices=("ray", "local"))
    address = p.get("address", str, "") or None
    workers = p.positive("workers", 1)
    verify = p.get("verify", bool, True)
    overwrite = p.get("overwrite", bool, False)
    quiet = p.get("quiet", bool, False)
    p.done()

    c = root.sub("corpus")
    if c is None:
        raise UsageError("corpus: missing (give [corpus] inputs = [...] or a [corpus.demo] table)")
    demo_corpus = _demo(c.sub("demo"), {"per_domain": 8, "max_chars": 1500, "skip": 0})
    default_inputs = [str(output / "corpus.jsonl")] if demo_corpus else _REQUIRED
    inputs = c.strings("inputs", default_inputs)
    if not inputs:
        raise UsageError("corpus.inputs: empty")
    text_field = c.get("text_field", str, "text")
    id_field = c.get("id_field", str, "id")
    skip_bad = c.get("skip_bad_lines", bool, False)
    docs_per_shard = c.positive("docs_per_shard", 64)
    c.done()

    m = root.sub("models")
    if m is None:
        raise UsageError("models: missing (give [models] target = ... and sources = [...])")
    if not m.has("target"):
        raise UsageError("models.target: missing (required)")
    m.used.add("target")
    target = _model(m.data["target"], "models.target")
    raw_sources = m.get("sources", list, [])
    sources = [_model(s, f"models.sources[{i}]") for i, s in enumerate(raw_sources)]
    m.done()
    names = [target.name] + [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"models: two models share a name ({', '.join(names)}); give each a distinct name")

    e = root.sub("extract") or _Section({}, "extract")
    base = dict(
        max_length=e.positive("max_length", 1024), batch_tokens=e.positive("batch_tokens", 0, zero_ok=True),
        device=e.get("device", str, "cpu"), dtype=e.get("dtype", str, "float32", ("float32", "bfloat16", "float16")),
        threads=e.positive("threads", 0, zero_ok=True), backend=e.get("backend", str, "hf", ("hf", "vllm")),
        vllm_kv_cache_gb=e.get("vllm_kv_cache_gb", float, 1.0), vllm_threads=e.get("vllm_threads", str, ""),
        vllm_batch_tokens=e.positive("vllm_batch_tokens", 0, zero_ok=True),
    )
    e.done()
    if base["vllm_kv_cache_gb"] <= 0:
        raise UsageError(f"extract.vllm_kv_cache_gb: must be > 0, got {base['vllm_kv_cache_gb']}")
    if base["max_length"] < 2:
        raise UsageError("extract.max_length: must be at least 2")
    extract = [
        ExtractJob(inputs, str(output / "topk" / mdl.name),
                   ExtractConfig(model=mdl.spec, top_k=top_k, codec=codec, **base),
                   text_field, id_field, skip_bad, docs_per_shard, overwrite, quiet, log)
        for mdl in [target, *sources]
    ]

    a = root.sub("align") or _Section({}, "align")
    align_cfg = AlignConfig(vocab=a.get("vocab", str, "mined", ("mined", "exact")),
                            sequence=a.get("sequence", str, "bytes", ("bytes", "dtw")), codec=codec,
                            cache_dir=a.get("cache_dir", str, ""))
    a.done()
    target_dir = str(output / "topk" / target.name)
    align = [AlignJob(target_dir, str(output / "topk" / s.name), str(output / "aligned" / s.name), align_cfg,
                      overwrite, quiet, log) for s in sources]

    f = root.sub("fuse") or _Section({}, "fuse")
    try:
        fuse_cfg = FuseConfig(
            method=f.get("method", str, "mince", ("mince", "avgce")), unit=f.get("unit", str, "window", ("window", "token")),
            metric=f.get("metric", str, "byte", ("byte", "token")), temperature=f.get("temperature", float, 1.0),
            k_out=f.positive("top_k", 0, zero_ok=True), codec=codec, include_target=f.get("include_target", bool, True),
        )
    except OptionError as exc:
        raise UsageError(exc.named("fuse.")) from None
    f.done()
    if not fuse_cfg.include_target and not sources:
        raise UsageError("fuse.include_target = false needs at least one source in models.sources")
    fuse = FuseJob(target_dir, [j.output for j in align], str(output / "fused"), fuse_cfg, overwrite, quiet, log)

    ins = root.sub("inspect")
    plots = None
    if ins is not None:
        plots = str(output / "plots") if ins.get("plot", bool, True) else None
        ins.done()

    t = root.sub("train")
    train = None
    if t is not None:
        kw: dict[str, Any] = {}
        for fl in fields(TrainConfig):
            if fl.name in ("data", "model", "output"):
                continue
            typ = {"float": float, "int": int, "str": str}[fl.type if isinstance(fl.type, str) else fl.type.__name__]
            if t.has(fl.name):
                kw[fl.name] = t.get(fl.name, typ)
        t.used.add("output")
        ckpt = t.get("output", str, str(output / "ckpt"))
        t.done()
        try:
            train = TrainConfig(data=fuse.output, model=target.spec, output=ckpt, **kw)
        except OptionError as exc:
            raise UsageError(exc.named("train.")) from None

    ev = root.sub("eval")
    demo_heldout = None
    evaluation = None
    if ev is not None:
        demo_heldout = _demo(ev.sub("demo"), {"per_domain": 2, "max_chars": 1500, "skip": 20})
        held = ev.strings("data", [str(output / "heldout.jsonl")] if demo_heldout else [])
        tasks = ev.strings("tasks", ["quartz", "socialiqa"])
        from fusedata.evaluate import TASKS

        for task in tasks:
            if task not in TASKS:
                raise UsageError(f"eval.tasks: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
        evaluation = EvalSpec(train.output if train else target.spec, held, tasks, ev.positive("limit", 200),
                              ev.positive("max_length", 1024), str(output / EVAL_NAME))
        ev.done()
        if not held and not tasks:
            raise UsageError("eval: nothing to evaluate (give eval.data, eval.tasks or [eval.demo])")
    root.done()
    return Pipeline(path, output, executor, address, workers, verify, target, sources, demo_corpus, inputs,
                    extract, align, fuse, plots, train, demo_heldout, evaluation, data)


# --- verification ------------------------------------------------------------------------------
def verify_dataset(path: str | Path) -> list[str]:
    """Shards of a finished dataset whose bytes no longer match the sha256 in its manifest (or
    that are missing). An unfinished folder (no manifest) has nothing to check against: []."""
    folder = Path(path)
    if not (folder / MANIFEST_NAME).is_file():
        return []
    try:
        manifest = Manifest.read(folder)
    except ValueError:
        return [MANIFEST_NAME]
    bad = []
    for s in manifest.shards:
        p = folder / s.name
        if not p.is_file() or p.stat().st_size != s.bytes or sha256_file(p) != s.sha256:
            bad.append(s.name)
    return bad


def repair_dataset(path: str | Path, bad: list[str]) -> None:
    """Delete the damaged shards and the manifest, so the stage's next run recomputes exactly
    those shards (the run identity in `_run.json` is kept: it is still the same run)."""
    folder = Path(path)
    for name in bad:
        if name.startswith("shard-"):
            (folder / name).unlink(missing_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)


# --- running -----------------------------------------------------------------------------------
@dataclass
class StepResult:
    step: str
    output: str
    status: str  # ran | skipped | repaired
    seconds: float
    detail: str = ""


def _manifest_text(folder: str) -> str | None:
    p = Path(folder) / MANIFEST_NAME
    return p.read_text(encoding="utf-8") if p.is_file() else None


def _write_if_changed(build: Callable[[Path], Any], target: Path) -> bool:
    """Build a file into a temporary name and replace `target` only when the content differs,
    so a rerun leaves it (and every stage hashing it) untouched. Returns whether it changed."""
    tmp = target.with_name(f".{target.name}.new")
    build(tmp)
    if target.is_file() and target.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return False
    tmp.replace(target)
    return True


def _train_done(cfg: TrainConfig) -> bool:
    """A checkpoint of this very training run that already reached its last step."""
    from fusedata.dataset import open_dataset
    from fusedata.train import STATE_NAME, _same_run, epoch_plan

    state_file = Path(cfg.output) / STATE_NAME
    if not state_file.is_file():
        return False
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if not _same_run(state.get("config", {}), cfg):
        return False
    total = cfg.max_steps
    if not total:
        shards = [s.name for s in open_dataset(cfg.data, "fused").shards]
        per_epoch = sum(len(b) for _, b in epoch_plan(cfg.data, shards, cfg.batch_tokens, cfg.seed, 0))
        total = max(1, cfg.epochs * per_epoch // cfg.grad_accum)
    return int(state.get("step", 0)) >= total


def _eval_identity(spec: EvalSpec) -> dict[str, Any]:
    """What changes an evaluation's result: the model's weights, the data files, the settings."""
    from fusedata.corpus import expand_inputs
    from fusedata.models.spec import resolve, weights_hash

    ref = resolve(spec.model)
    files = sorted(str(p) for p, _ in expand_inputs(spec.inputs)) if spec.inputs else []
    # weights_hash is memoised by path; a checkpoint retrained in place must be hashed afresh
    return {"model": spec.model, "model_hash": weights_hash.__wrapped__(ref.path),
            "data": {f: sha256_file(Path(f)) for f in files}, "tasks": spec.tasks, "limit": spec.limit,
            "max_length": spec.max_length}


def run_pipeline(path: str | Path | Pipeline, executor: Any = None, log: Callable[[str], None] = print,
                 verify: bool | None = None) -> list[StepResult]:
    """Run every stage of the pipeline in order, skipping finished ones and recomputing shards
    that fail their checksum. `executor` runs the dataset stages (default: one local process);
    the CLI builds a Ray one from `[pipeline] executor/address/workers`."""
    from fusedata.executor import LocalExecutor
    from fusedata.run_align import run_align
    from fusedata.run_extract import run_extract
    from fusedata.run_fuse import run_fuse

    pipe = path if isinstance(path, Pipeline) else load_pipeline(path, log)
    executor = executor or LocalExecutor()
    check = pipe.verify if verify is None else verify
    results: list[StepResult] = []

    def dataset_step(name: str, output: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        status, detail = "ran", ""
        if check:
            bad = verify_dataset(output)
            if bad:
                log(f"{output}: {len(bad)} shard(s) fail their checksum ({', '.join(bad[:5])}); recomputing them")
                repair_dataset(output, bad)
                status, detail = "repaired", f"recomputed {', '.join(bad)}"
        before = _manifest_text(output)
        fn()
        if status == "ran" and before is not None and before == _manifest_text(output):
            status = "skipped"
        results.append(StepResult(name, output, status, time.perf_counter() - t0, detail))
        log(f"[{name}] {status}{': ' + detail if detail else ''}")

    def file_step(name: str, output: str, fn: Callable[[], bool]) -> None:
        t0 = time.perf_counter()
        changed = fn()
        status = "ran" if changed else "skipped"
        results.append(StepResult(name, output, status, time.perf_counter() - t0))
        log(f"[{name}] {status}")

    if pipe.demo_corpus:
        from fusedata.demo_corpus import build_demo_corpus

        target = Path(pipe.corpus_inputs[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        dc = pipe.demo_corpus
        file_step("demo-corpus", str(target), lambda: _write_if_changed(
            lambda p: build_demo_corpus(p, dc["per_domain"], dc["max_chars"], dc["skip"]), target))
    if pipe.demo_heldout:
        from fusedata.demo_corpus import build_demo_corpus

        held = Path(pipe.eval.inputs[0])  # type: ignore[union-attr]
        held.parent.mkdir(parents=True, exist_ok=True)
        dh = pipe.demo_heldout
        file_step("demo-heldout", str(held), lambda: _write_if_changed(
            lambda p: build_demo_corpus(p, dh["per_domain"], dh["max_chars"], dh["skip"]), held))
    for job, mdl in zip(pipe.extract, [pipe.target, *pipe.sources], strict=True):
        dataset_step(f"extract {mdl.name}", job.output, lambda job=job: run_extract(job, executor))
    for job, mdl in zip(pipe.align, pipe.sources, strict=True):
        dataset_step(f"align {mdl.name}", job.output, lambda job=job: run_align(job, executor))
    dataset_step("fuse", pipe.fuse.output, lambda: run_fuse(pipe.fuse, executor))

    if pipe.plots:
        def plots() -> bool:
            from fusedata.inspect import plot

            out = Path(pipe.plots)  # type: ignore[arg-type]
            stamp = out / ".fused-manifest.sha256"
            digest = hashlib.sha256((_manifest_text(pipe.fuse.output) or "").encode()).hexdigest()
            if stamp.is_file() and stamp.read_text() == digest:
                return False
            plot(pipe.fuse.output, out)
            atomic_write_text(stamp, digest)
            return True

        file_step("inspect", pipe.plots, plots)
    if pipe.train:
        def train_step() -> bool:
            from fusedata.train import train

            cfg = pipe.train
            if _train_done(cfg):  # type: ignore[arg-type]
                return False
            result = train(cfg, log=log)  # type: ignore[arg-type]
            log(f"{cfg.output}: {result['steps']} steps, {result['tokens']:,} tokens")  # type: ignore[union-attr]
            return True

        file_step("train", pipe.train.output, train_step)
    if pipe.eval:
        def eval_step() -> bool:
            from fusedata.evaluate import evaluate, render

            spec = pipe.eval
            out = Path(spec.output)  # type: ignore[union-attr]
            identity = _eval_identity(spec)  # type: ignore[arg-type]
            if out.is_file() and json.loads(out.read_text(encoding="utf-8")).get("identity") == identity:
                return False
            result = evaluate(spec.model, spec.inputs, spec.tasks, spec.limit, spec.max_length)  # type: ignore[union-attr]
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps({"identity": identity, "result": result}, indent=2))
            log(render(result))
            return True

        file_step("eval", pipe.eval.output, eval_step)
    return results


# --- planning ----------------------------------------------------------------------------------
# Measured on this project's reference machine (2 CPU cores, fp32; README benchmarks): extract
# tokens/s of SmolLM2-135M and Gemma-3-270M, bytes per position of the top-k columns.
CPU_REF_PARAMS, CPU_REF_TOKENS_PER_S, CPU_REF_CORES = 135e6, 300.0, 2
GPU_SPEEDUP = 30.0  # rough: a small model on one GPU vs 2 CPU cores
TRAIN_COST = 2.2  # a training step (forward + backward) costs ~this many extract forwards per token
ALIGN_POSITIONS_PER_S = 200_000.0  # byte matching + projection, per core
DTW_POSITIONS_PER_S = 100_000.0
FUSE_POSITIONS_PER_S = 300_000.0


def bytes_per_position(codec: str, k: int) -> float:
    """Measured Parquet bytes per position of a topk dataset (README, k=10: zq ~24, raw ~84),
    scaled with k: the top-k columns grow with k, the token/offset columns do not."""
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
    from fusedata.extract import ExtractStage

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
        stage.close()


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
        done = _train_done(cfg) if Path(cfg.output).is_dir() and (Path(pipe.fuse.output) / MANIFEST_NAME).is_file() \
            else False
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
        done = Path(spec.output).is_file()
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
