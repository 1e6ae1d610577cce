"""Turn a user's model spec into a local model folder and its identity.

Accepted specs: a bundled name (`smollm2-135m`, `gemma3-270m`), a local Hugging Face folder,
a `.gguf` file (converted once into the cache), or a hub id where a hub is reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fusedata.errors import UsageError
from fusedata.models.cache import BUNDLED, CONVERSION_RECORD, cache_root, convert_gguf, ensure_bundled

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The one opt-in to running a model folder's own Python code (its config's `auto_map`).
TRUST_REMOTE_CODE_ENV = "FUSEDATA_TRUST_REMOTE_CODE"
CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # where transformers reads `auto_map`


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user wrote
    path: str  # a local folder, or a hub id
    licence: str = "unknown"


def resolve(spec: str) -> ModelRef:
    if spec in BUNDLED:
        return ModelRef(spec, str(ensure_bundled(spec)), BUNDLED[spec].licence)
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UsageError(f"model file not found: {spec}")
        digest = _sha256(p)[:16]
        out = cache_root() / f"gguf-{p.stem}-{digest}"
        if not (out / CONVERSION_RECORD).is_file():  # converted and checked against the GGUF itself
            convert_gguf(p, out)
        return ModelRef(spec, str(out))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"{spec}: folder has no config.json; not a Hugging Face model folder")
        ref = ModelRef(spec, str(p.resolve()))
        trust_remote_code(ref)  # refused here, before anything is loaded
        return ref
    if HUB_ID.match(spec) and not p.exists():
        return ModelRef(spec, spec)
    names = ", ".join(sorted(BUNDLED))
    raise UsageError(f"unknown model spec {spec!r}: use a bundled name ({names}), a model folder or a .gguf file")


def remote_code_trusted() -> bool:
    """Whether the user opted in to running code from model folders (FUSEDATA_TRUST_REMOTE_CODE=1)."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _custom_code(folder: Path) -> list[str]:
    """What a model folder's configs ask transformers to import (their `auto_map`), one entry per file."""
    asks: list[str] = []
    for name in CODE_CONFIGS:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing or unreadable: transformers reports it when it loads
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not auto_map:
            continue
        targets = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        flat = [t for v in targets for t in (v if isinstance(v, list) else [v]) if isinstance(t, str)]
        # "module.Class" or "org/repo--module.Class": the file is module.py
        files = dict.fromkeys(t.split("--")[-1].rsplit(".", 1)[0] + ".py" for t in flat)
        asks.append(f"auto_map in {name}" + (f" -> {', '.join(files)}" if files else ""))
    return asks


def trust_remote_code(ref: ModelRef) -> bool:
    """The `trust_remote_code` of every transformers/vLLM load of `ref`: False, and a model folder whose
    config asks for its own Python code is refused, unless the user opted in (FUSEDATA_TRUST_REMOTE_CODE=1).
    transformers would otherwise ask `[y/N]` on the terminal and, on `y`, run that code."""
    if remote_code_trusted():
        return True
    folder = Path(ref.path)
    if folder.is_dir():
        asks = _custom_code(folder)
        if asks:
            raise UsageError(
                f"{ref.spec}: the model folder asks to run its own Python code ({', '.join(asks)}); fusedata "
                f"never runs code from a model folder unless you trust it and set {TRUST_REMOTE_CODE_ENV}=1"
            )
    return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the fast tokenizer's full JSON: equal hashes tokenise identically."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@lru_cache(maxsize=8)
def weights_hash(path: str) -> str:
    """sha256 over the model folder's config and weight files (identity of the model)."""
    folder = Path(path)
    if not folder.is_dir():
        return "hub:" + path
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        h.update(f.name.encode())
        h.update(_sha256(f).encode())
    return h.hexdigest()


def _first_line(exc: Exception) -> str:
    """transformers' loading errors run over several lines; the CLI prints one."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_tokenizer(ref: ModelRef) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code(ref))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the tokenizer of {ref.spec!r}: {_first_line(exc)}") from None
    if not getattr(tok, "is_fast", False):
        raise UsageError(f"{ref.spec!r}: fusedata needs a fast tokenizer (for byte offsets)")
    return tok


def load_config(ref: ModelRef) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code(ref))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the config of {ref.spec!r}: {_first_line(exc)}") from None


def load_model(ref: ModelRef, device: str = "cpu", dtype: str = "float32") -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code(ref))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model {ref.spec!r}: {_first_line(exc)}") from None
    return model.to(device).eval()
