"""Model loading: a folder's own Python code never runs unless the user opts in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusedata.errors import UsageError
from fusedata.models import spec
from fusedata.models.spec import TRUST_REMOTE_CODE_ENV, ModelRef

ROOT = Path(__file__).resolve().parent.parent

EVIL_PY = """\
import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class EvilConfig(LlamaConfig):
    model_type = "evil_llama"

class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _evil_folder(tiny_llama: Path, tmp_path: Path, config_name: str = "config.json") -> tuple[Path, Path]:
    """A copy of the tiny Llama whose `config_name` maps its classes to evil.py, which writes a
    marker file when imported. Returns (folder, marker)."""
    folder, marker = tmp_path / "evil-model", tmp_path / "marker.txt"
    shutil.copytree(tiny_llama, folder)
    (folder / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    cfg = json.loads((folder / config_name).read_text())
    if config_name == "config.json":  # a model type transformers does not know: only evil.py can build it
        cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                       "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / config_name).write_text(json.dumps(cfg))
    return folder, marker


def test_cli_refuses_a_folder_that_asks_for_its_code(tiny_llama, corpus_file, tmp_path):
    """Even with `y` on stdin (transformers' `[y/N]` prompt): one error line, exit 2, nothing ran."""
    folder, marker = _evil_folder(tiny_llama, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != TRUST_REMOTE_CODE_ENV}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "cli.main", "extract", "--model", str(folder), "--input",
                          str(corpus_file), "--output", str(tmp_path / "out"), "--executor", "local", "--quiet"],
                         input="y\n", capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert not marker.exists()
    assert "[y/N]" not in out.stdout + out.stderr and "trust_remote_code" not in out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "evil.py" in lines[0] and TRUST_REMOTE_CODE_ENV in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config_name", ["config.json", "tokenizer_config.json"])
def test_every_loader_refuses_custom_code(tiny_llama, tmp_path, monkeypatch, config_name):
    """resolve() refuses first; a ModelRef built from a stored path (align reads the extract run's)
    is refused by each loader itself."""
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    folder, marker = _evil_folder(tiny_llama, tmp_path, config_name)
    with pytest.raises(UsageError, match=f"auto_map in {config_name} -> evil.py"):
        spec.resolve(str(folder))
    ref = ModelRef("stored", str(folder))
    for load in (spec.load_tokenizer, spec.load_config, spec.load_model):
        with pytest.raises(UsageError, match="asks to run its own Python code"):
            load(ref)
    assert not marker.exists()


def test_the_opt_in_lets_transformers_decide(tiny_llama, tmp_path, monkeypatch):
    folder, _ = _evil_folder(tiny_llama, tmp_path)
    ref = ModelRef("mine", str(folder))
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "0")
    with pytest.raises(UsageError):
        spec.trust_remote_code(ref)
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    assert spec.trust_remote_code(ref) is True
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV)
    assert spec.trust_remote_code(ModelRef("plain", str(tiny_llama))) is False  # no auto_map: nothing asked



def test_the_vllm_engine_refuses_it_before_starting(tiny_llama, tmp_path, monkeypatch):
    """The vLLM child gets `--trust-remote-code` only with the opt-in; without it nothing starts."""
    from fusedata.vllm_backend import WORKER, VllmEngine

    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    folder, marker = _evil_folder(tiny_llama, tmp_path)
    with pytest.raises(UsageError, match="asks to run its own Python code"):
        VllmEngine(str(folder), max_logprobs=1, max_model_len=8, python=sys.executable)
    usage = subprocess.run([sys.executable, "-I", str(WORKER), "--help"], capture_output=True, text=True, timeout=60)
    assert "--trust-remote-code" in usage.stdout and not marker.exists()

# -- GGUF conversion: every one checked against the GGUF-loaded model ---------------------------------

@pytest.fixture
def tiny_gguf(tiny_llama, tmp_path, monkeypatch) -> Path:
    """The tiny Llama as a GGUF file, and an empty model cache of this test's own."""
    import tiny_models

    monkeypatch.setenv("FUSEDATA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "gguf").mkdir()
    return tiny_models.write_tiny_gguf(tiny_llama, tmp_path / "gguf" / "tiny.gguf")


def _cache_entries(tmp_path: Path) -> list[str]:
    models = tmp_path / "cache" / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def test_a_gguf_conversion_is_checked_and_recorded(tiny_gguf, tiny_llama, tmp_path):
    import torch

    from fusedata.models.cache import CONVERSION_RECORD

    ref = spec.resolve(str(tiny_gguf))
    record = json.loads((Path(ref.path) / CONVERSION_RECORD).read_text())
    assert record["gguf"] == "tiny.gguf" and record["check_tokens"] > 10
    assert record["max_logprob_gap"] <= record["tolerance"]
    ids = torch.tensor([list(range(2, 40))])
    with torch.inference_mode():  # the round trip HF -> GGUF -> safetensors keeps the model
        a = spec.load_model(ref)(input_ids=ids).logits
        b = spec.load_model(ModelRef("hf", str(tiny_llama)))(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert spec.resolve(str(tiny_gguf)) == ref and _cache_entries(tmp_path) == [Path(ref.path).name]


def test_a_wrong_conversion_is_refused_and_nothing_is_cached(tiny_gguf, tmp_path, monkeypatch):
    """A converted model that drifts from the GGUF (as transformers 5.19 did on Gemma-3) is refused,
    with no cache entry or temporary folder left; the next, correct conversion succeeds."""
    import torch

    from fusedata.models import cache

    real = cache._rebuilt

    def drifted(loaded):
        model = real(loaded)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.05)
        return model

    monkeypatch.setattr(cache, "_rebuilt", drifted)
    with pytest.raises(UsageError, match=r"differ from the GGUF-loaded model's by up to .* probably converts "
                                         r"this architecture wrongly; nothing was cached"):
        spec.resolve(str(tiny_gguf))
    assert _cache_entries(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setenv("FUSEDATA_CACHE", str(tmp_path / "cache"))
    assert Path(spec.resolve(str(tiny_gguf)).path).is_dir()


def test_check_conversion_compares_tokens_and_log_probs(tiny_gguf, tiny_gemma, tmp_path):
    import torch

    from fusedata.models import cache

    tok, loaded = cache._load_gguf(tiny_gguf)
    good = tmp_path / "good"
    cache._rebuilt(loaded).save_pretrained(good)
    tok.save_pretrained(good)
    assert cache.check_conversion(tiny_gguf, tok, loaded, good)["max_logprob_gap"] == 0.0
    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(good, other_tokenizer)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gemma / f, other_tokenizer / f)
    with pytest.raises(UsageError, match="tokenizer splits the check text differently"):
        cache.check_conversion(tiny_gguf, tok, loaded, other_tokenizer)
    ids = torch.tensor([[3, 5, 7, 11]])
    nudged = cache._rebuilt(loaded)
    with torch.no_grad():
        nudged.lm_head.weight.add_(1e-2 * torch.randn_like(nudged.lm_head.weight))
    assert 0 < cache.logprob_gap(loaded, nudged, ids)
    assert cache.logprob_gap(loaded, loaded, ids) == 0.0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_gguf_is_one_error_line(tiny_gguf, tmp_path, corpus_file, damage):
    from test_cli import _assert_usage_error, _extract

    data = tiny_gguf.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({"garbage": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    code, stderr, result = _extract(bad, corpus_file, tmp_path / "out")
    _assert_usage_error(code, stderr, result, rf"{damage}\.gguf: not a readable GGUF file")
    assert _cache_entries(tmp_path) == []
