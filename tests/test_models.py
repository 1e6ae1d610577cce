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
