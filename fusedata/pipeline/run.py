"""`fusedata run`: every step of a pipeline file in order, each skipped when already done.

The dataset stages (extract, align, fuse, export) run through `run_stage`, which says whether it skipped,
resumed or ran. Before a finished dataset is trusted, `run_stage` checks its shards against the
sha256 in its manifest: a damaged shard is deleted together with the manifest and recomputed, alone.
The other steps (demo files, plots, train, eval) each have an
`identity()` and an `is_done()`, so a rerun of a finished pipeline does nothing.

`[pipeline] output` may be a URI (s3://…): the datasets are written there as by the single-stage
commands; the demo files, the plots and `eval.json` are made locally (in a temporary folder) and
uploaded; the checkpoint is trained through a local working copy (fusedata/train.py), and `eval`
evaluates a downloaded copy of it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fusedata.dataset import atomic_write_text, sha256_file
from fusedata.pipeline.config import EvalSpec, Pipeline, load_pipeline
from fusedata.storage import Location, is_uri, locate
from fusedata.train import TrainConfig
from schemas.manifest import MANIFEST_NAME


@dataclass
class StepResult:
    step: str
    output: str
    status: str  # ran | resumed | skipped | repaired
    seconds: float
    detail: str = ""


def _write_if_changed(build: Callable[[Path], Any], target: str | Path) -> bool:
    """Build a file in a temporary folder and replace `target` (a path or a URI) only when the
    content differs, so a rerun leaves it (and every stage hashing it) untouched. Returns whether it changed."""
    dest = locate(target)
    with tempfile.TemporaryDirectory(prefix="fusedata-") as tmp:
        built = Path(tmp) / dest.name
        build(built)
        data = built.read_bytes()
    if dest.is_file() and dest.read_bytes() == data:
        return False
    dest.parent.mkdir()
    dest.write_bytes_atomic(data)
    return True


def _upload_folder(local: Path, remote: Location) -> None:
    """Every file of a local folder into the folder at `remote`, each written atomically."""
    remote.mkdir()
    for f in sorted(local.iterdir()):
        if f.is_file():
            (remote / f.name).write_bytes_atomic(f.read_bytes())


def download_folder(remote: Location, local: Path) -> Path:
    """The files under `remote` copied into the local folder `local`."""
    import pyarrow.fs as pafs

    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(remote.path, str(local), source_filesystem=remote.fs, destination_filesystem=pafs.LocalFileSystem())
    return local


class Step:
    """A pipeline step that is not a dataset stage: it knows its identity and when it is done."""

    def identity(self) -> Any:
        raise NotImplementedError

    def is_done(self) -> bool:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def run_if_needed(self) -> bool:
        """Run unless done; whether it ran."""
        if self.is_done():
            return False
        self.run()
        return True


class DemoFileStep(Step):
    """The bundled demo corpus (or held-out set) as a JSONL file: rebuilt in a temporary file and
    written only when its content differs, so the stages that hash it see no change."""

    def __init__(self, target: str | Path, settings: dict[str, int]) -> None:
        self.target, self.settings = target, settings

    def identity(self) -> dict[str, int]:
        return self.settings

    def run_if_needed(self) -> bool:
        from fusedata.demo_corpus import build_demo_corpus

        dc = self.settings
        return _write_if_changed(lambda p: build_demo_corpus(p, dc["per_domain"], dc["max_chars"], dc["skip"]),
                                 self.target)


class TrainStep(Step):
    """The pipeline's training step: done when a checkpoint of this very run reached its last step."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None]) -> None:
        self.cfg, self.log = cfg, log

    def identity(self) -> dict[str, Any]:
        from fusedata.train import checkpoint_identity

        return checkpoint_identity(self.cfg)

    def is_done(self) -> bool:
        from fusedata.train import checkpoint_done

        return checkpoint_done(self.cfg)

    def run(self) -> None:
        from fusedata.train import train

        result = train(self.cfg, log=self.log)
        self.log(f"{self.cfg.output}: {result['steps']} steps, {result['tokens']:,} tokens")


class EvalStep(Step):
    """The pipeline's evaluation: `eval.json` holds the result with the identity it was made for."""

    def __init__(self, spec: EvalSpec, log: Callable[[str], None]) -> None:
        self.spec, self.log = spec, log

    def identity(self) -> dict[str, Any]:
        """What changes an evaluation's result: the model's weights, the data files, the settings."""
        from fusedata.corpus import list_inputs
        from fusedata.models.spec import resolve, weights_hash

        spec = self.spec
        if is_uri(spec.model):  # a checkpoint the pipeline trained to a URI: hashed where it is
            model_hash = _weights_hash_at(locate(spec.model))
        else:  # weights_hash is memoised by path; a checkpoint retrained in place must be hashed afresh
            model_hash = weights_hash.__wrapped__(resolve(spec.model).path)
        files = sorted(list_inputs(spec.inputs), key=lambda f: f.shown) if spec.inputs else []
        return {"model": spec.model, "model_hash": model_hash,
                "data": {f.shown: sha256_file(f.location()) for f in files}, "tasks": spec.tasks,
                "limit": spec.limit, "max_length": spec.max_length}

    def is_done(self) -> bool:
        out = locate(self.spec.output)
        return out.is_file() and json.loads(out.read_text(encoding="utf-8")).get("identity") == self.identity()

    def run(self) -> None:
        from fusedata.evaluate import evaluate, render

        spec = self.spec
        with tempfile.TemporaryDirectory(prefix="fusedata-eval-") as tmp:
            model = str(download_folder(locate(spec.model), Path(tmp) / "model")) if is_uri(spec.model) else spec.model
            result = evaluate(model, spec.inputs, spec.tasks, spec.limit, spec.max_length) | {"model": spec.model}
        out = locate(spec.output)
        out.parent.mkdir()
        atomic_write_text(out, json.dumps({"identity": self.identity(), "result": result}, indent=2))
        self.log(render(result))


def _weights_hash_at(folder: Location) -> str:
    """`weights_hash` of a model folder at a URI (the same value as for a local copy of it)."""
    h = hashlib.sha256()
    for f in [p for p in folder.files() if p.name.endswith(".safetensors")] + [folder / "config.json"]:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


class PlotStep(Step):
    """`inspect`'s charts of the fused dataset: done when drawn from this very manifest."""

    STAMP = ".fused-manifest.sha256"

    def __init__(self, fused: str, output: str) -> None:
        self.fused, self.output = fused, locate(output)

    def identity(self) -> str:
        p = locate(self.fused) / MANIFEST_NAME
        return hashlib.sha256((p.read_text(encoding="utf-8") if p.is_file() else "").encode()).hexdigest()

    def is_done(self) -> bool:
        stamp = self.output / self.STAMP
        return stamp.is_file() and stamp.read_text() == self.identity()

    def run(self) -> None:
        from fusedata.report import plot

        if self.output.is_local:
            plot(self.fused, self.output.path)
        else:  # drawn locally, then uploaded
            with tempfile.TemporaryDirectory(prefix="fusedata-plots-") as tmp:
                plot(self.fused, tmp)
                _upload_folder(Path(tmp), self.output)
        atomic_write_text(self.output / self.STAMP, self.identity())


def run_pipeline(path: str | Path | Pipeline, executor: Any = None, log: Callable[[str], None] = print,
                 verify: bool | None = None) -> list[StepResult]:
    """Run every stage of the pipeline in order, skipping finished ones and recomputing shards
    that fail their checksum. `executor` runs the dataset stages (default: one local process);
    the CLI builds a Ray one from `[pipeline] executor/address/workers`."""
    from fusedata.interop.export import ExportStage
    from fusedata.stages import AlignStage, ExtractStage, FuseStage, LocalExecutor, run_stage

    pipe = path if isinstance(path, Pipeline) else load_pipeline(path, log)
    executor = executor or LocalExecutor()
    check = pipe.verify if verify is None else verify
    if not check:  # the readers of each stage's inputs skip their checks too
        pipe = replace(
            pipe, align=[replace(j, verify=False) for j in pipe.align],
            fuse=replace(pipe.fuse, verify=False), export=[replace(j, verify=False) for j in pipe.export],
            train=pipe.train and replace(pipe.train, verify=False))
    results: list[StepResult] = []

    def dataset_step(name: str, job: Any, make: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        # run_stage checks a finished dataset's shards and recomputes the damaged ones, holding the
        # folder's writer lock while it deletes them
        result = run_stage(make(), executor, overwrite=job.overwrite, quiet=job.quiet, log=job.log)
        repaired = f"recomputed {', '.join(result.repaired)}" if result.repaired else ""
        if repaired:
            log(f"{job.output}: {len(result.repaired)} shard(s) that fail their checksum were {repaired}")
        status = "repaired" if repaired else result.status
        results.append(StepResult(name, job.output, status, time.perf_counter() - t0, repaired))
        log(f"[{name}] {status}{': ' + repaired if repaired else ''}")

    def step(name: str, output: str, it: Step) -> None:
        t0 = time.perf_counter()
        status = "ran" if it.run_if_needed() else "skipped"
        results.append(StepResult(name, output, status, time.perf_counter() - t0))
        log(f"[{name}] {status}")

    if pipe.demo_corpus:
        step("demo-corpus", pipe.corpus_inputs[0], DemoFileStep(pipe.corpus_inputs[0], pipe.demo_corpus))
    if pipe.demo_heldout:
        held = pipe.eval.inputs[0]  # type: ignore[union-attr]
        step("demo-heldout", held, DemoFileStep(held, pipe.demo_heldout))
    for job, mdl in zip(pipe.extract, [pipe.target, *pipe.sources], strict=True):
        dataset_step(f"extract {mdl.name}", job, lambda job=job: ExtractStage(job.config, job=job))
    for job, mdl in zip(pipe.align, pipe.sources, strict=True):
        dataset_step(f"align {mdl.name}", job, lambda job=job: AlignStage(job))
    dataset_step("fuse", pipe.fuse, lambda: FuseStage(pipe.fuse))
    for job in pipe.export:
        dataset_step(f"export {job.config.layout}", job, lambda job=job: ExportStage(job))
    if pipe.plots:
        step("inspect", pipe.plots, PlotStep(pipe.fuse.output, pipe.plots))
    if pipe.train:
        step("train", pipe.train.output, TrainStep(pipe.train, log))
    if pipe.eval:
        step("eval", pipe.eval.output, EvalStep(pipe.eval, log))
    return results
