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
from s3 import s3, s3_server  # noqa: E402, F401  (a real S3 server on loopback: tests/s3.py)


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


@pytest.fixture(scope="session")
def spine(tiny_llama, tiny_gemma, corpus_file, tmp_path_factory) -> Path:
    """topk/llama, topk/gemma, aligned/gemma and fused (MinCE), built once for the session.
    Read-only for tests: a test that damages a dataset copies it first."""
    from fusedata.stages.align import AlignConfig, AlignJob, run_align
    from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
    from fusedata.stages.fuse import FuseConfig, FuseJob, run_fuse

    quiet = {"quiet": True, "log": lambda m: None}
    root = tmp_path_factory.mktemp("spine")
    for name, folder in (("llama", tiny_llama), ("gemma", tiny_gemma)):
        run_extract(ExtractJob([str(corpus_file)], str(root / "topk" / name),
                               ExtractConfig(model=str(folder), top_k=5, max_length=24), docs_per_shard=2, **quiet))
    run_align(AlignJob(str(root / "topk/llama"), str(root / "topk/gemma"), str(root / "aligned/gemma"),
                       AlignConfig(cache_dir=str(root / "vocab")), **quiet))
    run_fuse(FuseJob(str(root / "topk/llama"), [str(root / "aligned/gemma")], str(root / "fused"),
                     FuseConfig(method="mince"), **quiet))
    return root
