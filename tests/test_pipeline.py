"""`fusedata run` / `fusedata plan`: pipeline file validation, a whole run on the tiny models
with the local executor (then a rerun that does nothing), checksum repair of a damaged shard,
and the plan's estimates and disk warning."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fusedata.pipeline.plan
from cli.main import main
from fusedata.codec import decode_topk
from fusedata.errors import UsageError
from fusedata.pipeline import load_pipeline, plan_pipeline, render_plan, run_pipeline, verify_dataset
from schemas.manifest import MANIFEST_NAME, Manifest


def tiny_toml(out: Path, llama: Path, gemma: Path, corpus: Path, extra: str = "") -> str:
    return f"""
[pipeline]
output = "{out}"
top_k = 5
executor = "local"

[corpus]
inputs = ["{corpus}"]
docs_per_shard = 2

[models]
target = {{ name = "llama", model = "{llama}" }}
sources = [{{ name = "gemma", model = "{gemma}" }}]

[extract]
max_length = 24
batch_tokens = 256

[align]
cache_dir = "{out.parent / 'vocab'}"

[fuse]
method = "mince"

[train]
max_steps = 2
batch_tokens = 64
warmup_steps = 1
lr = 1e-3

[eval]
data = ["{corpus}"]
tasks = []
max_length = 24
{extra}"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipeline.toml"
    p.write_text(text, encoding="utf-8")
    return p


MINIMAL = """
[pipeline]
output = "out"
[corpus]
inputs = ["c.jsonl"]
[models]
target = "m1"
"""


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "[extract]\nfoo = 1\n", "extract.foo: unknown key"),
    (MINIMAL.replace('output = "out"', 'output = "out"\ntop_k = "ten"'), "pipeline.top_k: expected int"),
    (MINIMAL.replace('output = "out"', 'output = "out"\ntop_k = 0'), "pipeline.top_k: must be > 0"),
    (MINIMAL + '[fuse]\nmethod = "best"\n', "fuse.method: must be one of mince, avgce"),
    (MINIMAL + '[align]\nvocab = "fuzzy"\n', "align.vocab: must be one of"),
    (MINIMAL + "[train]\nlam = 2\n", "train.lam: must be between 0 and 1"),
    (MINIMAL + '[train]\nmax_steps = "2"\n', "train.max_steps: expected int"),
    (MINIMAL + '[eval]\ntasks = ["nope"]\n', "eval.tasks: unknown task 'nope'"),
    (MINIMAL + "[extras]\na = 1\n", "extras: unknown key"),
    (MINIMAL.replace('target = "m1"', 'target = "m1"\nsources = ["x/m1"]'), "two models share a name"),
    (MINIMAL.replace('target = "m1"', 'target = { model = "m1", size = 3 }'), "models.target.size: unknown key"),
    (MINIMAL.replace('[models]\ntarget = "m1"', '[models]'), "models.target: missing"),
    (MINIMAL.replace('inputs = ["c.jsonl"]', ""), "corpus.inputs: missing"),
    (MINIMAL.replace('output = "out"', ""), "pipeline.output: missing"),
    (MINIMAL.replace('output = "out"', 'output = "out"\ncodec = "gzip9"'), "pipeline.codec"),
    (MINIMAL + "[fuse\n", "not valid TOML"),
    (MINIMAL + '[extract]\nbackend = "onnx"\n', "extract.backend: must be one of hf, vllm"),
    (MINIMAL + "[extract]\nvllm_kv_cache_gb = 0\n", "extract.vllm_kv_cache_gb: must be > 0"),
    (MINIMAL + "[extract]\nvllm_batch_tokens = -1\n", "extract.vllm_batch_tokens: must be >= 0"),
])
def test_validation_names_the_bad_key(tmp_path, text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_pipeline(_write(tmp_path, text))


def test_minimal_defaults(tmp_path):
    pipe = load_pipeline(_write(tmp_path, MINIMAL))
    assert pipe.extract[0].output == str(Path("out") / "topk" / "m1")
    assert pipe.extract[0].config.top_k == 10 and pipe.extract[0].config.codec == "zq"
    assert pipe.align == [] and pipe.train is None and pipe.eval is None
    assert pipe.fuse.aligned == [] and pipe.fuse.output == str(Path("out") / "fused")
    assert pipe.extract[0].config.backend == "hf" and pipe.extract[0].config.batch_tokens == 0


def test_extract_backend_options_reach_every_model(tmp_path):
    text = MINIMAL.replace('target = "m1"', 'target = "m1"\nsources = ["m2"]') + (
        '[extract]\nbackend = "vllm"\nvllm_kv_cache_gb = 2\nvllm_threads = "0-3"\nvllm_batch_tokens = 512\n')
    pipe = load_pipeline(_write(tmp_path, text))
    for job in pipe.extract:
        c = job.config
        assert (c.backend, c.vllm_kv_cache_gb, c.vllm_threads, c.vllm_batch_tokens) == ("vllm", 2.0, "0-3", 512)
        assert c.wants_gpu()


def test_fuse_alm_source_names_a_model_of_the_pipeline(tmp_path):
    """`[fuse] alm_source` is FuseConfig's field; a pipeline file gives the model's name, which is
    resolved to that model's topk folder of the pipeline."""
    text = MINIMAL.replace('target = "m1"', 'target = "m1"\nsources = ["m2"]')
    pipe = load_pipeline(_write(tmp_path, text + '[fuse]\nalm_source = "m2"\n'))
    assert pipe.fuse.config.alm_source == str(Path("out") / "topk" / "m2") == pipe.extract[1].output
    assert load_pipeline(_write(tmp_path, text)).fuse.config.alm_source == ""
    with pytest.raises(UsageError, match=r"fuse\.alm_source: 'm3' is not a model of this pipeline \(one of: m1, m2\)"):
        load_pipeline(_write(tmp_path, text + '[fuse]\nalm_source = "m3"\n'))


def test_cli_reports_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["run", str(_write(tmp_path, MINIMAL + "[extract]\nfoo = 1\n"))])
    assert result.exit_code == 2
    assert "error: extract.foo: unknown key" in result.output


def _read_topk(folder: Path):
    names = [s.name for s in Manifest.read(folder).shards]
    return [decode_topk(pq.read_table(folder / n)) for n in names]


@pytest.fixture(scope="module")
def pipeline_run(tiny_llama, tiny_gemma, corpus_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    out = root / "out"
    path = _write(root, tiny_toml(out, tiny_llama, tiny_gemma, corpus_file, "\n[inspect]\nplot = true\n"))
    logs: list[str] = []
    results = run_pipeline(path, log=logs.append)
    return path, out, results, logs


def test_run_produces_every_stage(pipeline_run):
    path, out, results, _ = pipeline_run
    assert [r.step for r in results] == ["extract llama", "extract gemma", "align gemma", "fuse", "inspect",
                                         "train", "eval"]
    assert all(r.status == "ran" for r in results)
    for folder, kind in [("topk/llama", "topk"), ("topk/gemma", "topk"), ("aligned/gemma", "aligned"),
                         ("fused", "fused")]:
        m = Manifest.read(out / folder)
        assert m.kind == kind and m.rows > 0
    assert json.loads((out / "ckpt" / "trainer_state.json").read_text())["step"] == 2
    result = json.loads((out / "eval.json").read_text())["result"]
    assert result["heldout"]["bits_per_byte"] > 0
    assert list((out / "plots").glob("*.png"))


def test_rerun_does_nothing(pipeline_run):
    path, out, _, _ = pipeline_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    results = run_pipeline(path, log=lambda m: None)
    assert [r.status for r in results] == ["skipped"] * 7
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_cli_run_and_plan(pipeline_run):
    path, out, _, _ = pipeline_run
    result = CliRunner().invoke(main, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in json.loads(result.stdout)} == {"skipped"}
    result = CliRunner().invoke(main, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert all(s["done"] for s in plan["stages"])  # everything is finished: nothing left to do
    assert plan["total"]["disk_bytes"] == 0


def test_corrupted_shard_is_detected_and_recomputed(pipeline_run):
    path, out, _, _ = pipeline_run
    folder = out / "topk" / "gemma"
    shard = folder / "shard-00001.parquet"
    good = _read_topk(folder)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle of the file
    shard.write_bytes(bytes(data))
    assert verify_dataset(folder) == ["shard-00001.parquet"]
    assert verify_dataset(out / "topk" / "llama") == []
    logs: list[str] = []
    results = run_pipeline(path, log=logs.append)
    status = {r.step: r.status for r in results}
    assert status["extract gemma"] == "repaired"
    assert status["extract llama"] == "skipped" and status["fuse"] == "skipped"
    assert any("fail their checksum" in m for m in logs)
    assert any("resuming, 2 of 3 shards already written" in m for m in logs)
    assert verify_dataset(folder) == []
    for a, b in zip(good, _read_topk(folder), strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    assert (folder / MANIFEST_NAME).is_file()


def test_plan_estimates(tiny_llama, tiny_gemma, corpus_file, tmp_path, monkeypatch):
    path = _write(tmp_path, tiny_toml(tmp_path / "out", tiny_llama, tiny_gemma, corpus_file))
    plan = plan_pipeline(path, sample_docs=3)
    assert plan["corpus"]["docs"] == 5 and plan["corpus"]["sample_docs"] == 3
    assert [s["stage"] for s in plan["stages"]] == ["extract llama", "extract gemma", "align gemma", "fuse",
                                                    "train", "eval"]
    for s in plan["stages"]:
        assert s["tokens"] > 0 and s["seconds"] > 0 and not s["done"]
    assert all(s["disk_bytes"] > 0 for s in plan["stages"] if s["stage"] != "eval")
    for m in plan["models"]:
        assert m["params"] > 0 and m["tokens_per_s"] > 0 and 0.05 < m["tokens_per_byte"] < 1.5
    assert plan["warnings"] == []
    text = render_plan(plan)
    assert "extract llama" in text and "free disk" in text

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fusedata.pipeline.plan.shutil, "disk_usage", lambda p: usage(10_000, 9_990, 10))
    plan = plan_pipeline(path, sample_docs=3)
    assert any("not enough disk" in w for w in plan["warnings"])
    assert "warning: not enough disk" in render_plan(plan)


def test_plan_measured_rate(tiny_llama, corpus_file, tmp_path):
    text = tiny_toml(tmp_path / "out", tiny_llama, tiny_llama, corpus_file)
    text = text.replace('sources = [{ name = "gemma", model = ', 'sources = [{ name = "llama2", model = ')
    plan = plan_pipeline(_write(tmp_path, text), sample_docs=2, measure=True)
    assert plan["models"][0]["rate_from"] == "measured" and plan["models"][0]["tokens_per_s"] > 0


@pytest.mark.parametrize("value", ["0", "-0.5", "nan"])
def test_fuse_temperature_must_be_positive(tmp_path, value):
    with pytest.raises(UsageError, match=r"fuse\.temperature: must be > 0"):
        load_pipeline(_write(tmp_path, MINIMAL + f'[fuse]\nmethod = "avgce"\ntemperature = {value}\n'))


def test_export_section_writes_each_layout_after_fuse(pipeline_run, tmp_path):
    path, out, _, _ = pipeline_run
    text = path.read_text() + '\n[[export]]\nlayout = "plain"\n\n[[export]]\nlayout = "axolotl"\n'
    logs: list[str] = []
    results = run_pipeline(_write(tmp_path, text), log=logs.append)
    status = {r.step: r.status for r in results}
    assert [r.step for r in results][3:6] == ["fuse", "export plain", "export axolotl"]
    assert status["export plain"] == status["export axolotl"] == "ran"
    assert all(v == "skipped" for k, v in status.items() if not k.startswith("export"))
    fused = Manifest.read(out / "fused")
    for layout, kind in (("plain", "plain"), ("axolotl", "axolotl-kd")):
        m = Manifest.read(out / f"fused-{layout}")
        assert m.kind == kind and m.rows == fused.rows and m.run["layout"] == layout
    again = run_pipeline(_write(tmp_path, text), log=lambda m: None)
    assert {r.status for r in again} == {"skipped"}
    plan = plan_pipeline(_write(tmp_path, text))
    assert [s["done"] for s in plan["stages"] if s["stage"].startswith("export")] == [True, True]


@pytest.mark.parametrize("extra, message", [
    ('[export]\nlayout = "csv"\n', "export.layout: must be one of"),
    ('[export]\nlayout = 3\n', "export.layout: expected str"),
    ('[export]\nlayuot = "plain"\n', "export.layuot: unknown key"),
    ('[[export]]\nlayout = "plain"\n[[export]]\nlayout = "plain"\n', r"export\[1\]\.output: .* already written"),
])
def test_export_section_validation(tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        load_pipeline(_write(tmp_path, MINIMAL + extra))


def test_export_section_defaults(tmp_path):
    pipe = load_pipeline(_write(tmp_path, MINIMAL + '[export]\nlayout = "trl"\noutput = "elsewhere"\n'))
    (job,) = pipe.export
    assert (job.source, job.output, job.config.layout) == (str(Path("out") / "fused"), "elsewhere", "trl")
    assert load_pipeline(_write(tmp_path, MINIMAL)).export == []
    (job,) = load_pipeline(_write(tmp_path, MINIMAL + "[export]\n")).export
    assert (job.config.layout, job.output) == ("plain", str(Path("out") / "fused-plain"))
