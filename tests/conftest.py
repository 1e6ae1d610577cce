"""Session fixtures: tiny models of two architectures (built in-process) and a small corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Never reach for a model hub from the tests; keep transformers' loading bars out of the output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).parent))  # `import tiny_models` from any test file

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a 2-layer Llama with a byte-level BPE tokenizer (no BOS)."""
    return tiny_models.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    """Folder of a 2-layer Gemma3 text model with a SentencePiece-style tokenizer (adds <bos>)."""
    return tiny_models.build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(params=["llama", "gemma"])
def tiny_model(request, tiny_llama, tiny_gemma) -> Path:
    """Each tiny model in turn."""
    return {"llama": tiny_llama, "gemma": tiny_gemma}[request.param]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small JSONL corpus: prose, code and a line with multi-byte UTF-8 characters."""
    return tiny_models.write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def corpus_docs() -> list[dict]:
    return [dict(d) for d in tiny_models.CORPUS_DOCS]
