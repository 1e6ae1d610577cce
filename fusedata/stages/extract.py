"""The extract stage: a model's top-k next-token distributions for every window of a corpus.

`ExtractStage` is a pure function of a docs table (plus a model loaded once in `setup()`), so
the same object runs in a test, in the local executor and inside a Ray actor. It never pads
to a fixed length (windows are batched by a token budget, padded only to the longest window
of their batch) and computes the LM head in chunks of positions, so a 262k vocabulary never
materialises a [B, T, V] logits tensor. Given an `ExtractJob` (the corpus and the output) it is
also a dataset stage (fusedata/stages/base.py): the driver plans shards of about `docs_per_shard`
documents from the corpus listing (fusedata/corpus.py), and each worker reads its own shard's
pieces, recording the hash of what it read in the shard's metadata (schemas/topk.py INPUT_KEY).

Targets (`targets`): "topk:K" (the default, K = top_k) keeps the K most probable ids; "sampled:N"
keeps an unbiased estimate of the whole distribution instead (Sparse Logit Sampling): the model's
top-1 id with its exact probability p1, and N draws from the rest of the distribution
(renormalised, p_i / (1 − p1)), stored as the distinct ids with probability (1 − p1)·count/N.
Every id's expected stored probability is its true one; see `sample_targets`. Draws come from a
generator seeded per window (the seed, the document id and the window number), so a rerun, a
resumed run or another batching gives the same draws.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusedata.codec import DEFAULT_CODEC, get_codec
from fusedata.corpus import CorpusPlan, ReadOptions, add_content, check_unique, plan_corpus, read_pieces
from fusedata.dataset import DatasetDir, read_shard, shard_metadata, shard_name
from fusedata.errors import OptionError, UsageError, check_options, field_choices
from fusedata.models.spec import (
    ModelRef,
    load_config,
    load_model,
    load_tokenizer,
    resolve,
    tokenizer_hash,
    weights_hash,
)
from fusedata.stages.base import Resources, ShardResult, Stage, Task
from fusedata.storage import Location
from fusedata.topk import PAD_ID, TopK, merge_sparse, tail_mass
from fusedata.windows import Window, batch_by_budget, tokenize_windows
from schemas.manifest import Manifest
from schemas.topk import INPUT_KEY, topk_schema

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
    # "topk:K" (or "": top_k's K) or "sampled:N"; with sampled:N, top_k becomes N + 1 (the entries stored)
    targets: str = ""
    sample_seed: int = 0  # sampled targets: the seed every window's generator is derived from

    def __post_init__(self) -> None:
        kind, n = parse_targets(self.targets, self.top_k)
        if kind == "sampled":
            check_options([("backend", self.backend == "hf", "sampled targets need the hf backend (vLLM returns "
                                                               "only the top log-probs, not the whole distribution)")])
        object.__setattr__(self, "top_k", n + 1 if kind == "sampled" else n)  # frozen: normalised once, here
        object.__setattr__(self, "targets", f"{kind}:{n}")
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

    @property
    def sample_n(self) -> int:
        """Draws per position (0: top-k targets)."""
        kind, n = self.targets.split(":")
        return int(n) if kind == "sampled" else 0

    def wants_gpu(self) -> bool:
        """A CUDA model or a vLLM engine: on Ray, each worker asks for a GPU where there are some."""
        return self.device.startswith("cuda") or self.backend == "vllm"


def parse_targets(spec: str, top_k: int) -> tuple[str, int]:
    """("topk", K) or ("sampled", N) from "topk:K" / "sampled:N" ("" and "topk": K = top_k)."""
    kind, _, count = (spec or "topk").partition(":")
    if kind not in ("topk", "sampled"):
        raise OptionError("targets", f"must be topk:K or sampled:N, got {spec!r}")
    if not count:
        if kind == "sampled":
            raise OptionError("targets", "sampled needs a number of draws, e.g. sampled:12")
        return kind, top_k
    if not count.isdigit() or int(count) < 1:
        raise OptionError("targets", f"the count must be a whole number >= 1, got {spec!r}")
    if kind == "topk" and int(count) != top_k and top_k != 10:  # 10: top_k's default, i.e. not given
        raise OptionError("targets", f"{spec} disagrees with top_k {top_k}; give one of them")
    return kind, int(count)


def window_seed(seed: int, doc_id: str, window: int) -> int:
    """The seed of one window's sampling generator: a function of what the window is, not of
    where it lands in a batch or a shard."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}\x00{doc_id}\x00{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_targets(logp: Any, uniforms: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sampled targets of positions from their full log-softmax.

    logp float [C, V]; uniforms float64 [C, N] in [0, 1). Returns ids int32 [C, N+1] and probs
    float64 [C, N+1] (PAD_ID / 0 where fewer ids are distinct), sorted by probability descending.

    Estimator: p̂_top1 = p_top1 (exact); for every other id i, p̂_i = (1 − p1)·c_i/N with
    c ~ Multinomial(N, p_i / (1 − p1)) (inverse-CDF draws from the distribution without its
    top-1). E[p̂_i] = p_i (unbiased) and Var[p̂_i] = p_i (1 − p1 − p_i) / N, below the
    p_i (1 − p_i) / N of plain sampling; Σ p̂ = 1 exactly, so there is no tail.
    """
    import torch

    p = torch.exp(logp.double())  # [C, V]
    p1, top1 = p.max(dim=-1)  # [C]
    rest = p.scatter(1, top1[:, None], 0.0)  # [C, V] the distribution without its top-1
    cdf = rest.cumsum(-1)  # [C, V]
    draws = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp(max=p.shape[1] - 1)  # [C, N]
    n, draws_per = draws.shape
    weight = ((1.0 - p1) / draws_per).cpu().numpy()  # [C] the probability one draw stands for
    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), draws_per)])
    ids = np.concatenate([top1.cpu().numpy(), draws.cpu().numpy().ravel()])
    probs = np.concatenate([p1.cpu().numpy(), np.repeat(weight, draws_per)])
    return merge_sparse(rows, ids, probs, n, draws_per + 1)


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
        self._plan: CorpusPlan | None = None
        self._ids: DigestIndex | None = None  # the driver's index of this run's document ids (shard_done)
        self._id_shards: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        """What a Ray actor gets: settings and the resolved model, not the model, tokenizer or corpus."""
        state = dict(self.__dict__)
        for key in ("model", "engine", "tokenizer", "_nbytes", "_plan", "_ids"):
            state[key] = None
        state["_id_shards"] = []
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
            **self.targets_identity(),
        }

    def targets_identity(self) -> dict[str, Any]:
        """Sampled targets are recorded in the run (so readers know the kind); top-k adds nothing,
        so existing top-k runs keep their identity."""
        if not self.config.sample_n:
            return {}
        return {"targets": self.config.targets, "sample_seed": self.config.sample_seed}

    def identity(self) -> dict[str, Any]:
        """The run record: the model's identity, and with a job the corpus and its sharding."""
        if self.job is None:
            return self.model_identity()
        # the corpus from its listing: skip_bad_lines is not part of it (it only decides whether a
        # shard holding a bad line fails or skips it, so a rerun with it retries just those shards)
        return {
            "stage": "extract",
            **self.model_identity(),
            "corpus_hash": self.plan().identity(),
            "docs_per_shard": self.job.docs_per_shard,
        }

    # -- the dataset stage (with a job) --------------------------------------------------
    def read_options(self) -> ReadOptions:
        assert self.job is not None
        return ReadOptions(self.job.text_field, self.job.id_field, self.job.skip_bad_lines)

    def plan(self) -> CorpusPlan:
        """The shard plan, from the corpus listing (made once, in the driver)."""
        if self._plan is None:
            assert self.job is not None
            self._plan = plan_corpus(self.job.inputs, self.job.docs_per_shard, self.read_options())
        return self._plan

    def inputs(self) -> list[Location]:
        # Locations, not names: a URI's settings (endpoint, credentials in its query) stay with each file
        return [f.location() for f in self.plan().files] if self.job else []

    def tasks(self) -> list[Task]:
        plan = self.plan()
        return [Task(shard_name(i), pieces, rows) for i, (pieces, rows) in enumerate(zip(plan.shards, plan.shard_docs,
                                                                                          strict=True))]

    def process(self, task: Task, on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        """Read this shard's pieces (here, in the worker) and extract them; what was read goes
        into the table's metadata (INPUT_KEY), which the shard file keeps."""
        assert task.source is not None
        docs, read = read_pieces(task.source, self.read_options())
        check_unique(docs.column("doc_id").to_pylist())  # within the shard; across shards: shard_done, topk_stats
        table = self(docs, on_tokens)
        record = {"sha256": read.sha256, "bytes": read.bytes_read, "docs": read.docs,
                  "empty_skipped": read.empty_skipped, "bad_skipped": read.bad_skipped,
                  "content": f"{read.content:064x}"}
        return table.replace_schema_metadata({**(table.schema.metadata or {}), INPUT_KEY: json.dumps(record).encode()})

    def shard_done(self, out: DatasetDir, result: ShardResult) -> None:
        """A document id that a shard written earlier in this run holds stops the run as soon as
        the second shard is written (the shards of an earlier, resumed run are checked at the end,
        with the rest: `topk_stats`)."""
        if self._ids is None:
            self._ids, self._id_shards = DigestIndex(), []
        ids = read_shard(out.shard_path(result.name), columns=["doc_id"]).column("doc_id").unique().to_pylist()
        digests = _id_digests(ids)
        earlier = self._ids.find(digests)
        if earlier is not None:
            before = self._id_shards[earlier]
            both = set(read_shard(out.shard_path(before), columns=["doc_id"]).column("doc_id").to_pylist()) & set(ids)
            if both:  # else two ids with the same 8-byte digest: not a duplicate
                raise UsageError(f"duplicate document id {min(both)!r} (in {before} and {result.name}): give each "
                                 "record a unique id field or rename the files")
        self._ids.add(digests, len(self._id_shards))
        self._id_shards.append(result.name)

    def stats(self, out: DatasetDir, names: list[str], rate: float) -> dict[str, Any]:
        result = topk_stats(out, names)
        read = result.pop("input")
        if read["docs"] == 0:
            raise UsageError("the corpus holds no non-empty documents")
        result.update(
            files=len(self.plan().files),
            empty_docs_skipped=read["empty_skipped"],
            docs_too_short=read["docs"] - result["docs"],  # fewer than two tokens: nothing to predict
            bad_lines_skipped=read["bad_skipped"],
            input_bytes=read["bytes"],
            input_sha256=read["sha256"],  # of the shards' input hashes, in order: the bytes read
            tokens_per_second_this_run=round(rate, 1),
        )
        if read["content"]:  # every shard recorded its documents' digest (not so in shards of older runs)
            result["corpus_content"] = read["content"]  # align and fuse compare corpora by it (check_same_corpus)
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
        doc_ids = docs.column("doc_id").to_pylist()
        for batch in batch_by_budget([len(w.ids) for w in wins], budget):
            seeds = [window_seed(self.config.sample_seed, doc_ids[wins[i].doc], wins[i].index) for i in batch]
            for i, topk in zip(batch, self.forward([wins[i].ids for i in batch], seeds), strict=True):
                per_window[i] = topk
            if on_tokens is not None:
                on_tokens(sum(len(wins[i].ids) for i in batch))
        return self.to_table(docs, wins, per_window)

    def batch_tokens(self) -> int:
        """Padded tokens per forward batch: as configured, else by device."""
        if self.config.batch_tokens > 0:
            return self.config.batch_tokens
        return CPU_BATCH_TOKENS if self.config.device == "cpu" else GPU_BATCH_TOKENS

    def forward(self, seqs: list[np.ndarray], seeds: list[int] | None = None) -> list[TopK]:
        """Top-k (or sampled) distributions of a batch of token sequences (right-padded to the
        longest); `seeds`, one per sequence, seed the sampled targets' draws."""
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
            uniforms = None
            if self.config.sample_n:
                seeds = seeds if seeds is not None else list(range(len(seqs)))
                uniforms = torch.cat([torch.rand((n - 1, self.config.sample_n), dtype=torch.float64,
                                                 generator=torch.Generator().manual_seed(s))
                                      for n, s in zip(lengths, seeds, strict=True)]).to(h.device)  # [N, draws]
            topk = self.head_topk(h, labels, uniforms)
        topk.lengths = np.asarray([n - 1 for n in lengths], dtype=np.int64)
        return [topk.window(i) for i in range(len(seqs))]

    def head_topk(self, h: Any, labels: Any, uniforms: Any = None) -> TopK:
        """LM head over chunks of positions: top-k log-probs, gold log-prob, tail mass; with
        `uniforms` float64 [N, draws], sampled targets instead of the top-k (`sample_targets`)."""
        import torch

        head = self.model.get_output_embeddings()
        k = self.config.top_k
        # sampling holds three float64 [C, V] arrays (probabilities, the rest, its CDF): smaller chunks
        chunk = max(1, self.config.lm_head_floats // self.vocab_size // (4 if uniforms is not None else 1))
        n = h.shape[0]
        ids = np.empty((n, k), dtype=np.int32)
        lps = np.empty((n, k), dtype=np.float32)
        gold = np.empty(n, dtype=np.float32)
        for s in range(0, n, chunk):
            logits = head(h[s : s + chunk]).float()  # [C, V]
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [C, 1]
            if uniforms is not None:
                s_ids, s_p = sample_targets(logits - lse, uniforms[s : s + chunk])  # [C, k]
                ids[s : s + chunk] = s_ids
                with np.errstate(divide="ignore"):
                    lps[s : s + chunk] = np.where(s_ids == PAD_ID, -np.inf, np.log(s_p))
            else:
                values, top = logits.topk(k, dim=-1)  # [C, k] sorted descending
                ids[s : s + chunk] = top.cpu().numpy()
                lps[s : s + chunk] = (values - lse).cpu().numpy()
            gold[s : s + chunk] = (logits.gather(1, labels[s : s + chunk, None]) - lse)[:, 0].cpu().numpy()
        # sampled targets sum to 1 by construction: no tail
        tail = np.zeros(n, np.float32) if uniforms is not None else tail_mass(lps)
        return TopK(ids, lps, gold, tail, np.asarray([n], dtype=np.int64))

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


def _id_digests(ids: list[str]) -> np.ndarray:
    """uint64 [len(ids)]: 8-byte digests of document ids (counting distinct documents over a
    whole corpus costs 8 bytes each, not a set of strings in the driver)."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                    dtype=np.uint64)


class DigestIndex:
    """The document ids of the shards a run has written, as 8-byte digests with the number of the
    shard each came from (12 bytes per document, not a set of strings in the driver): sorted runs
    merged as they grow, sizes halving down the list (a binary counter), so adding n ids costs
    O(n log n) in all and a lookup one binary search per run."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (digests uint64 [n] sorted, shard int32 [n])

    def find(self, digests: np.ndarray) -> int | None:
        """The shard number of an indexed digest among `digests`, or None."""
        for keys, shards in self.runs:
            at = np.minimum(np.searchsorted(keys, digests), len(keys) - 1)  # [len(digests)]
            hit = np.flatnonzero(keys[at] == digests)
            if len(hit):
                return int(shards[at[hit[0]]])
        return None

    def add(self, digests: np.ndarray, shard: int) -> None:
        keys, shards = np.sort(digests), np.full(len(digests), shard, np.int32)
        while self.runs and len(self.runs[-1][0]) <= len(keys):
            k, sh = self.runs.pop()
            keys, shards = np.concatenate([k, keys]), np.concatenate([sh, shards])
            order = np.argsort(keys, kind="stable")
            keys, shards = keys[order], shards[order]
        if len(keys):
            self.runs.append((keys, shards))


def shard_input(meta: pq.FileMetaData) -> dict[str, Any]:
    """What the worker of an extract shard read (schemas/topk.py INPUT_KEY); {} for older shards."""
    raw = (meta.metadata or {}).get(INPUT_KEY)
    return json.loads(raw) if raw else {}


def topk_stats(out: DatasetDir, names: list[str]) -> dict[str, Any]:
    """Summary statistics read back from the written shards (so a resumed run counts all), one
    shard at a time; `input` sums what the workers read. A document id found in two shards is refused."""
    positions = 0
    ce_sum = 0.0
    tokens = windows = 0
    digests: list[np.ndarray] = []
    total_bytes = 0
    read = {"docs": 0, "empty_skipped": 0, "bad_skipped": 0, "bytes": 0}
    content = hashlib.sha256()  # the workers' input hashes in shard order
    documents: str | None = "0" * 64  # the sum of the shards' document digests (corpus.content_digest)
    for name in names:
        path = out.shard_path(name)
        t = read_shard(path, columns=["doc_id", "input_ids", "ce"])
        n = t.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        # windows of n tokens predict n-1 positions (the BOS-prefixed ones too)
        pos = np.maximum(n - 1, 0)
        positions += int(pos.sum())
        tokens += int(n.sum())
        windows += t.num_rows
        ce_sum += float((t.column("ce").to_numpy() * pos).sum())
        digests.append(np.unique(_id_digests(t.column("doc_id").unique().to_pylist())))
        record = shard_input(shard_metadata(path))
        for key, value in record.items():
            if key in read:
                read[key] += value
        content.update(record.get("sha256", "").encode())
        documents = add_content(documents, record["content"]) if documents and "content" in record else None
        total_bytes += path.size()
    every = np.concatenate(digests) if digests else np.zeros(0, np.uint64)
    distinct = np.unique(every)
    if len(distinct) < len(every):
        _refuse_duplicate(out, names, every)
    return {
        "docs": int(len(distinct)),
        "windows": windows,
        "tokens": tokens,
        "positions": positions,
        "mean_ce": ce_sum / max(positions, 1),
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(positions, 1),
        "input": read | {"sha256": content.hexdigest(), "content": documents},
    }


def _refuse_duplicate(out: DatasetDir, names: list[str], every: np.ndarray) -> None:
    values, counts = np.unique(every, return_counts=True)
    twice = set(values[counts > 1].tolist())
    found: dict[str, list[str]] = {}
    for name in names:
        for doc_id in read_shard(out.shard_path(name), columns=["doc_id"]).column("doc_id").unique().to_pylist():
            if int(_id_digests([doc_id])[0]) in twice:
                found.setdefault(doc_id, []).append(name)
    doc_id, where = next((d, w) for d, w in found.items() if len(w) > 1)
    raise UsageError(f"duplicate document id {doc_id!r} (in {where[0]} and {where[1]}): give each record a unique "
                     "id field or rename the files")


def run_extract(job: ExtractJob, executor: Any = None) -> Manifest:
    """Extract `job.config.model`'s top-k over the job's corpus into `job.output`."""
    from fusedata.stages.base import run_stage

    stage = ExtractStage(job.config, job=job)
    return run_stage(stage, executor, overwrite=job.overwrite, quiet=job.quiet, log=job.log).manifest
