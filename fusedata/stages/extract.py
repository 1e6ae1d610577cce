"""The extract stage: a model's top-k next-token distributions for every window of a corpus.

`ExtractStage` is a pure function of a docs table (plus a model loaded once in `setup()`), so
the same object runs in a test, in the local executor and inside a Ray actor. It never pads
to a fixed length (windows are batched by a token budget, padded only to the longest window
of their batch) and computes the LM head in chunks of positions, so a 262k vocabulary never
materialises a [B, T, V] logits tensor. Given an `ExtractJob` (the corpus and the output) it is
also a dataset stage (fusedata/stages/base.py): one shard per `docs_per_shard` documents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.codec import DEFAULT_CODEC, get_codec
from fusedata.corpus import CorpusStats, corpus_hash, expand_inputs, read_corpus, shard_docs
from fusedata.dataset import DatasetDir, read_shard, shard_metadata, shard_name
from fusedata.errors import UsageError, check_options, field_choices
from fusedata.models.spec import (
    ModelRef,
    load_config,
    load_model,
    load_tokenizer,
    resolve,
    tokenizer_hash,
    weights_hash,
)
from fusedata.stages.base import Resources, Stage, Task
from fusedata.topk import TopK, tail_mass
from fusedata.windows import Window, batch_by_budget, tokenize_windows
from schemas.manifest import Manifest
from schemas.topk import topk_schema

VLLM_CALL_TOKENS = 32768  # tokens handed to the vLLM engine per call
# padded tokens per transformers forward when --batch-tokens is 0: on CPU small batches win
# (benchmarks/extract.py; the figures are in the README's extract benchmark)
CPU_BATCH_TOKENS = 1024
GPU_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    top_k: int = 10
    max_length: int = 1024  # tokens per window, including the one shared with the next window
    batch_tokens: int = 0  # padded tokens per forward batch (0: 1,024 on CPU, 8,192 on a GPU)
    # logits materialised at once: positions per chunk = this // V (a tuning knob of tests and benchmarks)
    lm_head_floats: int = field(default=1 << 25, metadata={"internal": True})
    device: str = "cpu"
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16")})
    codec: str = DEFAULT_CODEC
    threads: int = 0  # torch threads in this worker; 0 keeps torch's default
    # "hf": transformers forward + chunked LM head; "vllm": fusedata/vllm_backend.py
    backend: str = field(default="hf", metadata={"choices": ("hf", "vllm")})
    vllm_kv_cache_gb: float = 1.0  # vLLM KV cache size
    vllm_threads: str = ""  # vLLM CPU cores to bind, e.g. "0-3" (default: all this process may use)
    vllm_batch_tokens: int = 0  # vLLM tokens per engine step (0: 2048 on CPU, vLLM's default on GPU)

    def __post_init__(self) -> None:
        # top_k against the vocabulary is checked once the tokenizer is loaded (ExtractStage.prepare)
        check_options([
            *field_choices(self),
            ("max_length", self.max_length >= 2, "must be at least 2"),
            ("batch_tokens", self.batch_tokens >= 0, f"must be >= 0 (0: the default), got {self.batch_tokens}"),
            ("lm_head_floats", self.lm_head_floats >= 1, "must be >= 1"),
            ("threads", self.threads >= 0, "must be >= 0 (0: torch's default)"),
            ("vllm_kv_cache_gb", math.isfinite(self.vllm_kv_cache_gb) and self.vllm_kv_cache_gb > 0,
             f"must be > 0, got {self.vllm_kv_cache_gb}"),
            ("vllm_batch_tokens", self.vllm_batch_tokens >= 0,
             f"must be >= 0 (0: the default), got {self.vllm_batch_tokens}"),
        ])

    def wants_gpu(self) -> bool:
        """A CUDA model or a vLLM engine: on Ray, each worker asks for a GPU where there are some."""
        return self.device.startswith("cuda") or self.backend == "vllm"


@dataclass(frozen=True)
class ExtractJob:
    """An extract run: the corpus, the output folder and the model settings."""

    inputs: list[str]
    output: str
    config: ExtractConfig
    text_field: str = "text"
    id_field: str = "id"
    skip_bad_lines: bool = False
    docs_per_shard: int = 64
    overwrite: bool = False
    quiet: bool = False
    log: Any = field(default=print, repr=False)

    def __post_init__(self) -> None:
        check_options([("docs_per_shard", self.docs_per_shard >= 1, "must be >= 1")])


class ExtractStage(Stage):
    """docs table (doc_id, text) -> topk table (schemas/topk.py), one row per window; with a job,
    the dataset stage over its corpus."""

    kind = "topk"
    count_docs = True

    def __init__(self, config: ExtractConfig, ref: ModelRef | None = None, job: ExtractJob | None = None) -> None:
        self.config = config
        self.ref = ref
        self.job = job
        self.model = None
        self.engine = None  # the vLLM backend's engine (fusedata/vllm_backend.py)
        self.tokenizer = None
        self.output = job.output if job else ""
        self.label = f"extract {config.model}"
        self.resources = Resources(gpus=1.0 if config.wants_gpu() else 0.0)
        self._docs: pa.Table | None = None
        self._cstats: CorpusStats | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a Ray actor gets: settings and the resolved model, not the model, tokenizer or corpus."""
        state = dict(self.__dict__)
        for key in ("model", "engine", "tokenizer", "_nbytes", "_docs"):
            state[key] = None
        return state

    # -- set-up (driver and worker) -------------------------------------------------------
    def prepare(self) -> None:
        """Resolve the model and load its tokenizer: cheap, safe to run in the driver."""
        if self.ref is None:
            self.ref = resolve(self.config.model)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.ref)
        self.vocab_size = self._vocab_size()
        if not 1 <= self.config.top_k <= self.vocab_size:
            raise UsageError(f"--top-k {self.config.top_k} must be between 1 and the vocabulary size {self.vocab_size}")
        self.codec = get_codec(self.config.codec)
        self.codec.check_k(self.config.top_k)  # before the run claims (and perhaps overwrites) its folder
        self.schema = topk_schema(self.codec.fields(), self.codec.metadata(), self.config.top_k)

    def token_nbytes(self) -> np.ndarray:
        """int64 [len(tokenizer)]: bytes each token stands for (0 for special tokens)."""
        if getattr(self, "_nbytes", None) is None:
            from fusedata.vocab import token_bytes

            self._nbytes = np.array([len(b) if b is not None else 0 for b in token_bytes(self.tokenizer)], np.int64)
        return self._nbytes

    def _vocab_size(self) -> int:
        cfg = load_config(self.ref)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(cfg.vocab_size)

    def setup(self) -> None:
        """Load the model (once per worker); the vLLM backend starts its engine instead."""
        self.prepare()
        if self.config.backend == "vllm":
            if self.engine is None:
                from fusedata.vllm_backend import VllmEngine

                self.engine = VllmEngine(
                    self.ref.path, max_logprobs=self.config.top_k, max_model_len=self.config.max_length,
                    kv_cache_gb=self.config.vllm_kv_cache_gb, threads=self.config.vllm_threads,
                    dtype=self.config.dtype, batch_tokens=self.config.vllm_batch_tokens,
                )
            return
        import torch

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.model = load_model(self.ref, self.config.device, self.config.dtype)
        head = self.model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0])
        text_cfg = self.model.config.get_text_config()
        self.softcap = getattr(text_cfg, "final_logit_softcapping", None)
        self._check_head()

    def teardown(self) -> None:
        """Stop the vLLM engine's child process now (else it stops when the stage is dropped) and
        let go of the model; a later call loads them again."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.model = None

    def model_identity(self) -> dict[str, Any]:
        """Everything about the model and settings that changes this stage's output."""
        self.prepare()
        # vLLM's kernels give log-probs that differ from the transformers path by ~1e-4 and may
        # order near-ties differently: a dataset records which backend made it (hf, the default,
        # is left out so that existing runs keep their identity and still resume)
        backend = {"backend": self.config.backend} if self.config.backend != "hf" else {}
        return {
            "model": self.config.model,
            "model_path": self.ref.path,
            "model_hash": weights_hash(self.ref.path),
            "licence": self.ref.licence,
            "tokenizer_hash": tokenizer_hash(self.tokenizer),
            "vocab_size": self.vocab_size,
            "top_k": self.config.top_k,
            "max_length": self.config.max_length,
            "dtype": self.config.dtype,
            "codec": self.codec.spec(),
            **backend,
        }

    def identity(self) -> dict[str, Any]:
        """The run record: the model's identity, and with a job the corpus and its sharding."""
        if self.job is None:
            return self.model_identity()
        docs = self.docs()
        return {
            "stage": "extract",
            **self.model_identity(),
            "corpus_hash": corpus_hash(docs),
            "docs": docs.num_rows,
            "docs_per_shard": self.job.docs_per_shard,
        }

    # -- the dataset stage (with a job) --------------------------------------------------
    def docs(self) -> pa.Table:
        """The job's corpus, read once in the driver."""
        if self._docs is None:
            assert self.job is not None
            self._docs, self._cstats = read_corpus(self.job.inputs, self.job.text_field, self.job.id_field,
                                                   self.job.skip_bad_lines)
        return self._docs

    def inputs(self) -> list[str]:
        return [str(p) for p, _ in expand_inputs(self.job.inputs)] if self.job else []

    def tasks(self) -> list[Task]:
        assert self.job is not None
        return [Task(shard_name(i), t) for i, t in enumerate(shard_docs(self.docs(), self.job.docs_per_shard))]

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        assert task.table is not None
        return self(task.table, on_tokens)

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        result = topk_stats(out, names)
        cstats = self._cstats or CorpusStats()
        result.update(
            files=cstats.files,
            empty_docs_skipped=cstats.empty_skipped,
            docs_too_short=self.docs().num_rows - result["docs"],  # fewer than two tokens: nothing to predict
            bad_lines_skipped=cstats.bad_skipped,
            tokens_per_second_this_run=round(rate, 1),
        )
        return result

    def summary(self, manifest: Manifest) -> str:
        return (f"{self.output}: {manifest.rows} windows, {manifest.tokens:,} tokens, "
                f"mean CE {manifest.stats['mean_ce']:.3f} nats, {manifest.stats['bytes_per_token']:.1f} bytes/token")

    # -- the pure part -------------------------------------------------------------------
    def windows(self, docs: pa.Table) -> list[Window]:
        """Tokenise every document with byte offsets and cut it into windows."""
        return tokenize_windows(self.tokenizer, docs.column("text").to_pylist(), self.config.max_length,
                                self.token_nbytes())

    def __call__(self, docs: pa.Table, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        if self.model is None and self.engine is None:
            self.setup()
        wins = self.windows(docs)
        per_window: list[TopK | None] = [None] * len(wins)
        # vLLM schedules its own batches: handing it many windows per call keeps its engine busy
        # (small calls are slower; benchmarks/extract.py --vllm measures it)
        budget = max(self.batch_tokens(), VLLM_CALL_TOKENS) if self.engine is not None else self.batch_tokens()
        for batch in batch_by_budget([len(w.ids) for w in wins], budget):
            for i, topk in zip(batch, self.forward([wins[i].ids for i in batch]), strict=True):
                per_window[i] = topk
            if on_tokens is not None:
                on_tokens(sum(len(wins[i].ids) for i in batch))
        return self.to_table(docs, wins, per_window)

    def batch_tokens(self) -> int:
        """Padded tokens per forward batch: as configured, else by device."""
        if self.config.batch_tokens > 0:
            return self.config.batch_tokens
        return CPU_BATCH_TOKENS if self.config.device == "cpu" else GPU_BATCH_TOKENS

    def forward(self, seqs: list[np.ndarray]) -> list[TopK]:
        """Top-k distributions of a batch of token sequences (right-padded to the longest)."""
        if self.engine is not None:
            return self.engine.topk(seqs, self.config.top_k)
        import torch

        lengths = [len(s) for s in seqs]
        T = max(lengths)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(seqs), T), dtype=torch.long)  # [B, T]
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[b, : len(s)] = 1
        ids, mask = ids.to(self.config.device), mask.to(self.config.device)
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
            has_next = mask[:, 1:].bool()  # [B, T-1] position t predicts token t+1
            h = hidden[:, :-1][has_next]  # [N, H] row-major: window by window
            labels = ids[:, 1:][has_next]  # [N]
            topk = self.head_topk(h, labels)
        topk.lengths = np.asarray([n - 1 for n in lengths], dtype=np.int64)
        return [topk.window(i) for i in range(len(seqs))]

    def head_topk(self, h: Any, labels: Any) -> TopK:
        """LM head over chunks of positions: top-k log-probs, gold log-prob, tail mass."""
        import torch

        head = self.model.get_output_embeddings()
        k = self.config.top_k
        chunk = max(1, self.config.lm_head_floats // self.vocab_size)
        n = h.shape[0]
        ids = np.empty((n, k), dtype=np.int32)
        lps = np.empty((n, k), dtype=np.float32)
        gold = np.empty(n, dtype=np.float32)
        for s in range(0, n, chunk):
            logits = head(h[s : s + chunk]).float()  # [C, V]
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [C, 1]
            values, top = logits.topk(k, dim=-1)  # [C, k] sorted descending
            ids[s : s + chunk] = top.cpu().numpy()
            lps[s : s + chunk] = (values - lse).cpu().numpy()
            gold[s : s + chunk] = (logits.gather(1, labels[s : s + chunk, None]) - lse)[:, 0].cpu().numpy()
        return TopK(ids, lps, gold, tail_mass(lps), np.asarray([n], dtype=np.int64))

    def _check_head(self) -> None:
        """Refuse an architecture whose logits are not lm_head(last hidden state) (+softcap):
        compare the chunked path against the model's own forward on a short input."""
        import torch

        ids = torch.arange(3, 11, dtype=torch.long)[None] % self.vocab_size  # [1, 8]
        with torch.inference_mode():
            ref = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # [7, V]
            hidden = self.model.base_model(input_ids=ids).last_hidden_state[0, :-1]  # [7, H]
            got = self.head_topk(hidden, ids[0, 1:])
        want = ref.gather(1, torch.from_numpy(got.ids).long()).numpy()
        if not np.allclose(got.logprobs, want, atol=1e-3):
            raise UsageError(
                f"{self.config.model}: the chunked LM head does not reproduce the model's logits "
                "(unsupported architecture)"
            )

    def to_table(self, docs: pa.Table, wins: list[Window], per_window: list[TopK | None]) -> pa.Table:
        doc_ids = docs.column("doc_id").to_pylist()
        topk = TopK.concat([t for t in per_window if t is not None]) if wins else None
        cols: dict[str, Any] = {
            "doc_id": [doc_ids[w.doc] for w in wins],
            "window": [w.index for w in wins],
            "byte_start": [int(w.start[0]) for w in wins],
            "byte_end": [int(w.end.max()) for w in wins],
            "input_ids": [w.ids for w in wins],
            "token_start": [w.start for w in wins],
            "token_end": [w.end for w in wins],
            "ce": [float(-t.gold_logprob.mean()) for t in per_window],
        }
        if topk is None:
            return self.schema.empty_table()
        cols.update(self.codec.encode(topk))
        return pa.table(cols, schema=self.schema)


def topk_stats(out: DatasetDir, names: list[str]) -> dict[str, Any]:
    """Summary statistics read back from the written shards (so a resumed run counts all)."""
    positions = 0
    ce_sum = 0.0
    tokens = 0
    docs: set[str] = set()
    total_bytes = 0
    for name in names:
        path = out.shard_path(name)
        t = read_shard(path, columns=["doc_id", "input_ids", "ce"])
        n = t.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        # windows of n tokens predict n-1 positions (the BOS-prefixed ones too)
        pos = np.maximum(n - 1, 0)
        positions += int(pos.sum())
        tokens += int(n.sum())
        ce_sum += float((t.column("ce").to_numpy() * pos).sum())
        docs.update(t.column("doc_id").to_pylist())
        total_bytes += path.size()
    return {
        "docs": len(docs),
        "windows": sum(shard_metadata(out.shard_path(n)).num_rows for n in names),
        "tokens": tokens,
        "positions": positions,
        "mean_ce": ce_sum / max(positions, 1),
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(positions, 1),
    }


def run_extract(job: ExtractJob, executor: Any = None) -> Manifest:
    """Extract `job.config.model`'s top-k over the job's corpus into `job.output`."""
    from fusedata.stages.base import run_stage

    stage = ExtractStage(job.config, job=job)
    return run_stage(stage, executor, overwrite=job.overwrite, quiet=job.quiet, log=job.log).manifest
