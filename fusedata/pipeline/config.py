"""The pipeline file: `fusedata run pipeline.toml` / `fusedata plan pipeline.toml`.

The TOML file names the corpus, the target and source models, k and codec, and the settings of
align, fuse, train and eval. It is parsed into the very job dataclasses the single-stage commands
build (`ExtractJob`, `AlignJob`, `FuseJob`, `TrainConfig`), so a pipeline run and the equivalent
sequence of commands produce the same folders. The `[extract]`, `[align]`, `[fuse]`, `[export]` and
`[train]` sections are read from the fields of those config dataclasses (`config_options`): every key is
type-checked against its field and checked once, by the dataclass's `__post_init__`, so a typo or a
bad value fails at once with the key's name instead of hours into a run.

Layout of a pipeline's outputs (all under `[pipeline] output`, a local folder or a URI such as
`s3://bucket/run`, joined with `fusedata.storage.join`): `corpus.jsonl` (demo corpus only),
`topk/<model>/`, `aligned/<source>/`, `fused/`, `fused-<layout>/` (each `[export]`), `plots/`, `ckpt/`,
`heldout.jsonl` (demo held-out only), `eval.json`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fusedata.codec import DEFAULT_CODEC
from fusedata.errors import OptionError, UsageError
from fusedata.interop.export import ExportConfig, ExportJob
from fusedata.stages.align import AlignConfig, AlignJob
from fusedata.stages.extract import ExtractConfig, ExtractJob
from fusedata.stages.fuse import FuseConfig, FuseJob
from fusedata.storage import is_uri, join
from fusedata.train import TrainConfig

_REQUIRED = object()
EVAL_NAME = "eval.json"
_TYPES = {"float": float, "int": int, "str": str, "bool": bool}


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


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


def config_options(sec: _Section, cls: type, fixed: dict[str, Any], keys: dict[str, str] | None = None,
                   skip: tuple[str, ...] = ()) -> Any:
    """Build the config dataclass `cls` from a section: each field not in `fixed` or `skip` (and
    not marked internal) is an optional key of the field's type (`keys` renames a field's key);
    the dataclass's own `__post_init__` checks the values, its errors named by the section's key."""
    keys = keys or {}
    kw = dict(fixed)
    for f in fields(cls):
        if f.name in fixed or f.name in skip or f.metadata.get("internal"):
            continue
        key = keys.get(f.name, f.name)
        if sec.has(key):
            kw[f.name] = sec.get(key, _TYPES[f.type if isinstance(f.type, str) else f.type.__name__])
        else:
            sec.used.add(key)
    try:
        return cls(**kw)
    except OptionError as exc:
        raise UsageError(f"{sec.key(keys.get(exc.field, exc.field))}: {exc.message}") from None


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
    output: Path | str  # a local folder, or a URI as given
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
    export: list[ExportJob]  # the fused dataset in other layouts ([export] or [[export]])
    plots: str | None
    train: TrainConfig | None
    demo_heldout: dict[str, int] | None
    eval: EvalSpec | None


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


def _exports(root: _Section, fused: str, output: Path | str, overwrite: bool, quiet: bool,
             log: Callable[[str], None]) -> list[ExportJob]:
    """`[export]` (one layout) or `[[export]]` (several): the fused dataset written in each layout,
    to `output` (default `<pipeline output>/fused-<layout>`); the keys are ExportConfig's fields."""
    if not root.has("export"):
        return []
    root.used.add("export")
    raw = root.data["export"]
    tables = raw if isinstance(raw, list) else [raw]
    jobs: list[ExportJob] = []
    for i, table in enumerate(tables):
        sec = _Section(table, f"export[{i}]" if isinstance(raw, list) else "export")
        cfg = config_options(sec, ExportConfig, {})
        out = sec.get("output", str, join(output, f"fused-{cfg.layout}"))
        sec.done()
        if out in [j.output for j in jobs] or out == fused:
            raise UsageError(f"{sec.key('output')}: {out} is already written by another step; give each export "
                             "its own output")
        jobs.append(ExportJob(fused, out, cfg, overwrite=overwrite, quiet=quiet, log=log))
    return jobs


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
    output_text = p.get("output", str)  # a folder or a URI (s3://…): every output goes under it
    output = output_text if is_uri(output_text) else Path(output_text)
    top_k = p.positive("top_k", _default(ExtractConfig, "top_k"))
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
    default_inputs = [join(output, "corpus.jsonl")] if demo_corpus else _REQUIRED
    inputs = c.strings("inputs", default_inputs)
    if not inputs:
        raise UsageError("corpus.inputs: empty")
    text_field = c.get("text_field", str, _default(ExtractJob, "text_field"))
    id_field = c.get("id_field", str, _default(ExtractJob, "id_field"))
    skip_bad = c.get("skip_bad_lines", bool, _default(ExtractJob, "skip_bad_lines"))
    docs_per_shard = c.positive("docs_per_shard", _default(ExtractJob, "docs_per_shard"))
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
    models = [target, *sources]
    base = config_options(e, ExtractConfig, {"model": target.spec, "top_k": top_k, "codec": codec})
    e.done()
    extract = [
        ExtractJob(inputs, join(output, "topk", mdl.name), replace(base, model=mdl.spec), text_field=text_field,
                   id_field=id_field, skip_bad_lines=skip_bad, docs_per_shard=docs_per_shard, overwrite=overwrite,
                   quiet=quiet, log=log)
        for mdl in models
    ]

    a = root.sub("align") or _Section({}, "align")
    align_cfg = config_options(a, AlignConfig, {"codec": codec})
    a.done()
    target_dir = join(output, "topk", target.name)
    align = [AlignJob(target_dir, join(output, "topk", s.name), join(output, "aligned", s.name), align_cfg,
                      overwrite=overwrite, quiet=quiet, log=log) for s in sources]

    f = root.sub("fuse") or _Section({}, "fuse")
    fuse_cfg = config_options(f, FuseConfig, {"codec": codec}, keys={"k_out": "top_k"})
    f.done()
    if fuse_cfg.alm_source:  # a pipeline file names the model; its topk folder is the pipeline's own
        if fuse_cfg.alm_source not in names:
            raise UsageError(f"fuse.alm_source: {fuse_cfg.alm_source!r} is not a model of this pipeline "
                             f"(one of: {', '.join(names)})")
        fuse_cfg = replace(fuse_cfg, alm_source=join(output, "topk", fuse_cfg.alm_source))
    if not fuse_cfg.include_target and not sources:
        raise UsageError("fuse.include_target = false needs at least one source in models.sources")
    fuse = FuseJob(target_dir, [j.output for j in align], join(output, "fused"), fuse_cfg, overwrite=overwrite,
                   quiet=quiet, log=log)

    export = _exports(root, fuse.output, output, overwrite, quiet, log)

    ins = root.sub("inspect")
    plots = None
    if ins is not None:
        plots = join(output, "plots") if ins.get("plot", bool, True) else None
        ins.done()

    t = root.sub("train")
    train = None
    if t is not None:
        ckpt = t.get("output", str, join(output, "ckpt"))
        train = config_options(t, TrainConfig, {"data": fuse.output, "model": target.spec, "output": ckpt})
        t.done()

    ev = root.sub("eval")
    demo_heldout = None
    evaluation = None
    if ev is not None:
        demo_heldout = _demo(ev.sub("demo"), {"per_domain": 2, "max_chars": 1500, "skip": 20})
        held = ev.strings("data", [join(output, "heldout.jsonl")] if demo_heldout else [])
        tasks = ev.strings("tasks", ["quartz", "socialiqa"])
        from fusedata.evaluate import TASKS

        for task in tasks:
            if task not in TASKS:
                raise UsageError(f"eval.tasks: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
        evaluation = EvalSpec(train.output if train else target.spec, held, tasks, ev.positive("limit", 200),
                              ev.positive("max_length", 1024), join(output, EVAL_NAME))
        ev.done()
        if not held and not tasks:
            raise UsageError("eval: nothing to evaluate (give eval.data, eval.tasks or [eval.demo])")
    root.done()
    return Pipeline(path=path, output=output, executor=executor, address=address, workers=workers, verify=verify,
                    target=target, sources=sources, demo_corpus=demo_corpus, corpus_inputs=inputs, extract=extract,
                    align=align, fuse=fuse, export=export, plots=plots, train=train, demo_heldout=demo_heldout, eval=evaluation)
