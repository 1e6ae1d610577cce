"""The extract stage: a model's top-k next-token distributions for every window of a corpus.

`ExtractStage` is a pure function of a docs table (plus a model loaded once in `setup()`), so
the same object runs in a test, in the local executor and inside a Ray actor. It never pads
to a fixed length (windows are batched by a token budget, padded only to the longest window
of their batch) and computes the LM head in chunks of positions, so a 262k vocabulary never
materialises a [B, T, V] logits tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.codec import DEFAULT_CODEC, get_codec
from fusedata.errors import UsageError
from fusedata.models.spec import ModelRef, load_model, load_tokenizer, resolve, tokenizer_hash, weights_hash
from fusedata.topk import TopK, tail_mass
from schemas.topk import topk_schema

VLLM_CALL_TOKENS = 32768  # tokens handed to the vLLM engine per call
# padded tokens per transformers forward when --batch-tokens is 0: on CPU small batches win
# (2 cores, windows of 1,024: SmolLM2 461-493 tok/s at 1,024 vs 305-320 at 8,192; Gemma-3 186 vs 159-177)
CPU_BATCH_TOKENS = 1024
GPU_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    top_k: int = 10
    max_length: int = 1024  # tokens per window, including the one shared with the next window
    batch_tokens: int = 0  # padded tokens per forward batch (0: 1,024 on CPU, 8,192 on a GPU)
    lm_head_floats: int = 1 << 25  # logits materialised at once: positions per chunk = this // V
    device: str = "cpu"
    dtype: str = "float32"
    codec: str = DEFAULT_CODEC
    threads: int = 0  # torch threads in this worker; 0 keeps torch's default
    backend: str = "hf"  # "hf": transformers forward + chunked LM head; "vllm": fusedata/vllm_backend.py
    vllm_kv_cache_gb: float = 1.0  # vLLM KV cache size
    vllm_threads: str = ""  # vLLM CPU cores to bind, e.g. "0-3" (default: all this process may use)
    vllm_batch_tokens: int = 0  # vLLM tokens per engine step (0: 2048 on CPU, vLLM's default on GPU)

    def wants_gpu(self) -> bool:
        """A CUDA model or a vLLM engine: on Ray, each worker asks for a GPU where there are some."""
        return self.device.startswith("cuda") or self.backend == "vllm"


@dataclass
class Window:
    doc: int  # row in the docs table
    index: int  # window number within the document
    ids: np.ndarray  # int32 [n]
    start: np.ndarray  # int32 [n] byte offsets
    end: np.ndarray  # int32 [n]


def char_to_byte(text: str) -> np.ndarray:
    """int64 [len(text)+1]: UTF-8 byte offset of every character boundary."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    nbytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(nbytes)])


def window_bounds(n_tokens: int, max_length: int, bos_prefixed: bool = False) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most max_length tokens, each token after the first
    predicted exactly once. Without a BOS, consecutive windows share one token. With a BOS
    (the document starts with it), windows do not overlap and each later window gets the BOS
    re-prepended by the caller, so its length budget here is max_length - 1 (Gemma-3 degrades
    badly on a window that does not start with <bos>). Windows predicting nothing are dropped."""
    if max_length < 2 + int(bos_prefixed):
        raise UsageError(f"--max-length must be at least {2 + int(bos_prefixed)}")
    if bos_prefixed:
        step = max_length - 1
        return [(s, min(s + step, n_tokens)) for s in range(1, n_tokens, step)]
    if n_tokens < 2:
        return []
    step = max_length - 1
    return [(s, min(s + max_length, n_tokens)) for s in range(0, n_tokens - 1, step)]


def split_character_spans(ids: np.ndarray, start: np.ndarray, end: np.ndarray, nbytes: np.ndarray) -> None:
    """Give tokens that split a character their own bytes, in place.

    Tokenizer offsets are in characters, so pieces of one multi-byte character (byte-level
    pieces like `Ã` `»` or `ĠðŁĺ` `Ģ`, byte fallback `<0xC3>` `<0xBB>`) report the whole
    character's span and overlap. Each maximal run of consecutive tokens whose span length
    differs from their byte length is laid out again, byte by byte from the run's start; the
    new layout is kept only if it ends exactly where the run ended (else the tokenizer had a
    normaliser that changed the text, and its spans are left as they were).
    """
    n = len(ids)
    lengths = np.where(ids < len(nbytes), nbytes[np.minimum(ids, len(nbytes) - 1)], 0)  # [n]
    off = (lengths > 0) & (end - start != lengths)  # [n]
    i = 0
    while i < n:
        if not off[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and off[j + 1]:
            j += 1
        group = np.arange(i, j + 1)
        first = start[i] + np.concatenate([[0], np.cumsum(lengths[group])[:-1]])
        if first[-1] + lengths[j] == end[group].max():
            start[group], end[group] = first, first + lengths[group]
        i = j + 1


def tokenize_windows(tokenizer: Any, texts: list[str], max_length: int, token_nbytes: np.ndarray) -> list[Window]:
    """Tokenise texts with byte offsets and cut each into windows (extract's, and eval's)."""
    if not texts:  # transformers' batch tokenizer fails on an empty list
        return []
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    bos = tokenizer.bos_token_id
    out: list[Window] = []
    for d, text in enumerate(texts):
        ids = np.asarray(enc["input_ids"][d], dtype=np.int32)  # [n]
        chars = np.asarray(enc["offset_mapping"][d], dtype=np.int64).reshape(-1, 2)  # [n, 2]
        byte_at = char_to_byte(text)
        start, end = byte_at[chars[:, 0]].astype(np.int32), byte_at[chars[:, 1]].astype(np.int32)
        split_character_spans(ids, start, end, token_nbytes)
        bos_prefixed = bos is not None and len(ids) > 0 and int(ids[0]) == bos
        for w, (s, e) in enumerate(window_bounds(len(ids), max_length, bos_prefixed)):
            if bos_prefixed:  # [BOS] + body tokens; the BOS covers no bytes
                sel = np.concatenate([[0], np.arange(s, e)])
                st, en = start[sel], end[sel]
                st[0] = en[0] = start[s]
                out.append(Window(d, w, ids[sel], st, en))
            else:
                out.append(Window(d, w, ids[s:e], start[s:e], end[s:e]))
    return out


def batch_by_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Group window indices (longest first) so that rows × longest row ≤ budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class ExtractStage:
    """docs table (doc_id, text) -> topk table (schemas/topk.py), one row per window."""

    def __init__(self, config: ExtractConfig, ref: ModelRef | None = None) -> None:
        self.config = config
        self.ref = ref
        self.model = None
        self.engine = None  # the vLLM backend's engine (fusedata/vllm_backend.py)
        self.tokenizer = None

    # -- set-up (driver and worker) -------------------------------------------------------
    def prepare(self) -> None:
        """Resolve the model and load its tokenizer: cheap, safe to run in the driver."""
        if self.config.backend not in ("hf", "vllm"):
            raise UsageError(f"unknown extract backend {self.config.backend!r}: use hf or vllm")
        if self.ref is None:
            self.ref = resolve(self.config.model)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.ref)
        self.vocab_size = self._vocab_size()
        for name in ("batch_tokens", "vllm_batch_tokens"):
            if getattr(self.config, name) < 0:
                raise UsageError(f"{name} must be >= 0 (0: the default), got {getattr(self.config, name)}")
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
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.ref.path)
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

    def close(self) -> None:
        """Stop the vLLM engine's child process now (else it stops when the stage is dropped)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def identity(self) -> dict[str, Any]:
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
        # (measured on CPU: 2,048-token calls ran ~20 % slower than 32k-token calls)
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


def corpus_hash(docs: pa.Table) -> str:
    """Identity of the documents (ids and texts) an extract ran over."""
    h = hashlib.sha256()
    for doc_id, text in zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist(), strict=True):
        h.update(doc_id.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    return h.hexdigest()

