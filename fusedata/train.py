"""The bundled trainer: distil a fused dataset into one target model, or fine-tune it on SFT pairs.

loss = λ·CLM + (1−λ)·distill, where distill is the cross-entropy toward the fused *sparse*
target: the stored top-k ids carry probabilities q_i and the tail carries t = 1 − Σq_i, so

    distill = −Σ_i q_i · log p(id_i) − t · log(1 − Σ_i p(id_i))

computed by gathering the model's log-probs at the stored ids ([N, k]); no dense [B, T, V]
target is ever built. λ = 1 is plain causal-LM training with the very same command. On a
dataset of sampled targets (`extract --targets sampled:N`) the same loss is the cross-entropy
toward the empirical distribution of the draws (its tail is 0), an unbiased estimate of the
full-distribution loss. `loss="uld"` and `loss="alm"` replace the distillation term by the
losses of fusedata/losses.py, which need no vocabulary map: ULD compares sorted probabilities,
ALM the likelihoods of byte chunks (the chunk columns `fuse --alm-source` writes).

The loop reads top to bottom: stream batches → forward → loss → backward (accumulate) → clip →
AdamW step with warm-up + cosine decay → log → checkpoint. Data order is a pure function of
the seed, so a resumed run skips the batches already seen and continues exactly.

An "sft" dataset (`fusedata explore`'s prompt/response pairs) is trained with a completion-only
CLM loss (λ = 1: there is no distillation target). Each pair is tokenised with the target's own
tokenizer in the format the target will be prompted with (`sft_text`):
- with a chat template: a user turn (prompt) and an assistant turn (response); the prompt part is
  the user turn with the generation prompt (`add_generation_prompt=True`);
- without one: `"Question: {prompt}\nAnswer: {response}"` + EOS; the prompt part is
  `"Question: {prompt}\nAnswer:"`.
Labels are -100 on the prompt part, so only response tokens are learned; pairs are cut to
`max_length` tokens and a pair whose response does not fit at all is dropped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from fusedata.codec import decode_topk
from fusedata.dataset import atomic_write_text, open_dataset, read_shard
from fusedata.errors import OptionError, UsageError, choice
from fusedata.storage import is_uri, locate
from fusedata.topk import PAD_ID
from schemas.manifest import Manifest

STATE_NAME = "trainer_state.json"
LOSSES = ("sparse", "uld", "alm")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    model: str
    output: str
    lam: float = 0.9  # weight of the CLM term; 1.0 = plain CLM
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    warmup_ratio: float = 0.0  # > 0: warm-up is this share of the run's steps (replaces warmup_steps)
    max_steps: int = 0  # 0: one pass over the data (epochs × batches / accumulation)
    epochs: int = 1
    batch_tokens: int = 2048  # padded tokens per micro-batch
    max_length: int = 1024  # sft data: tokens per pair (prompt + response); longer pairs are cut
    grad_accum: int = 1
    clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on GPU
    save_every: int = 0  # steps; 0: only at the end
    log_every: int = 1
    threads: int = 0
    init_config: str = ""  # a model config JSON: train a fresh model of it (seeded weights), tokenizer of `model`
    # the distillation term: "sparse" (cross-entropy toward the stored top-k or sampled target),
    # "uld" (sorted probabilities, fusedata/losses.py) or "alm" (byte-chunk likelihoods; needs chunk columns)
    loss: str = field(default="sparse", metadata={"choices": LOSSES})
    alm_temperature: float = 1.0  # ALM: chunk log-likelihoods are divided by this before the binary KL
    # check each data shard against its manifest sha256 (--no-verify: False); not part of the run's identity.
    # A pipeline sets it from its own `verify`, so it is no key of the [train] section.
    verify: bool = field(default=True, metadata={"internal": True})

    def __post_init__(self) -> None:
        checks = [
            ("lam", 0.0 <= self.lam <= 1.0, "must be between 0 and 1"),
            ("lr", self.lr >= 0, "must be >= 0"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "must be between 0 and 1"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)"),
            ("max_steps", self.max_steps >= 0, "must be >= 0 (0: --epochs passes)"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_tokens", self.batch_tokens >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("clip", self.clip > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            choice("loss", self.loss, LOSSES),
            ("alm_temperature", math.isfinite(self.alm_temperature) and self.alm_temperature > 0, "must be > 0"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise OptionError(name, message)

    def warmup(self, total_steps: int) -> int:
        """Warm-up steps of a run of `total_steps`: a share of it with warmup_ratio, else warmup_steps."""
        if self.warmup_ratio > 0:
            return max(1, round(self.warmup_ratio * total_steps))
        return self.warmup_steps


@dataclass
class Batch:
    input_ids: Any  # long [B, T]
    attention: Any  # long [B, T]
    labels: Any  # long [B, T-1], -100 where padded
    topk_ids: Any | None  # long [B, T-1, k] (fused target ids; PAD → 0 with q = 0)
    topk_q: Any | None  # float [B, T-1, k]
    tail: Any | None  # float [B, T-1]
    tokens: int
    chunk_of: Any | None = None  # long [B, T-1]: the ALM chunk of each position (-1: none), batch-wide numbering
    chunk_teacher: Any | None = None  # float [C]: each chunk's teacher log-likelihood


CHUNK_COLUMNS = ("chunk_start", "chunk_end", "chunk_teacher_ll")


def shard_windows(data_dir: str, shard: str, need_topk: bool, need_chunks: bool = False) -> list[dict[str, Any]]:
    """The windows of one fused shard: input_ids, labels, the sparse target, and (ALM) the chunks."""
    path = locate(data_dir) / shard
    table = read_shard(path)
    if need_chunks and not set(CHUNK_COLUMNS) <= set(table.column_names):
        raise UsageError(f"{path}: no ALM chunk columns ({', '.join(CHUNK_COLUMNS)}); "
                         "fuse the dataset with --alm-source to train with --loss alm")
    vocab = Manifest.read(locate(data_dir)).run.get("vocab_size")
    for column in ("input_ids", "labels"):
        values = pc.list_flatten(table.column(column))
        lo, hi = pc.min_max(values).values() if len(values) else (None, None)
        # labels may hold -100 (ignored positions); any other id must be in the target's vocabulary
        ok_lo = lo is None or lo.as_py() >= (-100 if column == "labels" else 0)
        if not ok_lo or (vocab and hi is not None and hi.as_py() >= int(vocab)):
            raise UsageError(f"{path}: column '{column}' holds token ids outside the vocabulary "
                             f"(0..{int(vocab) - 1 if vocab else '?'}): {lo}..{hi}; the shard is damaged")
    topk = decode_topk(table, shard) if need_topk else None
    off = topk.offsets() if topk is not None else None
    rows = []
    for i, (ids, labels) in enumerate(zip(table.column("input_ids").to_pylist(),
                                          table.column("labels").to_pylist(), strict=True)):
        row: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if topk is not None:
            s = slice(int(off[i]), int(off[i + 1]))
            row["topk_ids"], row["topk_lp"], row["tail"] = topk.ids[s], topk.logprobs[s], topk.tail_mass[s]
        rows.append(row)
    if need_chunks:
        for row, *chunks in zip(rows, *(table.column(c).to_pylist() for c in CHUNK_COLUMNS), strict=True):
            row["chunks"] = chunks  # [starts, ends, teacher log-likelihoods], positions of this window
    return rows


def sft_text(tokenizer: Any, prompt: str, response: str) -> tuple[str, str]:
    """(prompt part, whole pair) as text, in the format the target will be prompted with: its chat
    template's user + assistant turns if it has one, else plain "Question: ... Answer: ..." + EOS."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        return head, whole
    return f"Question: {prompt}\nAnswer:", f"Question: {prompt}\nAnswer: {response}{tokenizer.eos_token or ''}"


def sft_rows(data_dir: str, shard: str, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The pairs of one sft shard as windows: input_ids, and labels (length n-1 as in fused rows)
    that are -100 except where the next token is a response token. A pair whose response does
    not fit in `max_length` is dropped (it has nothing to learn)."""
    table = read_shard(locate(data_dir) / shard, columns=["prompt", "response"])
    responses = table.column("response").to_pylist()
    texts = [sft_text(tokenizer, p, r) for p, r in zip(table.column("prompt").to_pylist(), responses, strict=True)]
    if not texts:
        return []
    special = not getattr(tokenizer, "chat_template", None)  # a chat template writes its own BOS
    heads = tokenizer([h for h, _ in texts], add_special_tokens=special)["input_ids"]
    wholes = tokenizer([w for _, w in texts], add_special_tokens=special)["input_ids"]
    limit = min(max_length, tokenizer.model_max_length)
    rows = []
    for (head, whole), response, head_ids, ids in zip(texts, responses, heads, wholes, strict=True):
        if ids[: len(head_ids)] != head_ids:  # a token spans the boundary: tokenise the two parts apart
            rest = whole[len(head):] if whole.startswith(head) else response
            ids = head_ids + tokenizer(rest, add_special_tokens=False)["input_ids"]
        ids = ids[:limit]
        p = max(len(head_ids), 1)
        if len(ids) <= p:
            continue
        rows.append({"input_ids": ids, "labels": [-100] * (p - 1) + ids[p:]})  # labels[i] predicts ids[i+1]
    return rows


@dataclass
class ShardSource:
    """A dataset's shards as training windows, for either kind. The last shard read is kept, so
    an sft shard that is planned and then streamed (see `epoch_plan`) is tokenised once."""

    data_dir: str
    kind: str = "fused"
    need_topk: bool = False
    need_chunks: bool = False  # ALM
    tokenizer: Any = None  # sft only
    max_length: int = 1024  # sft only
    _last: tuple[str, list[dict[str, Any]]] | None = field(default=None, repr=False)

    def rows(self, shard: str) -> list[dict[str, Any]]:
        if self._last is None or self._last[0] != shard:
            if self.kind == "sft":
                rows = sft_rows(self.data_dir, shard, self.tokenizer, self.max_length)
            else:
                rows = shard_windows(self.data_dir, shard, self.need_topk, self.need_chunks)
            self._last = (shard, rows)
        return self._last[1]

    def lengths(self, shard: str) -> list[int]:
        """Window lengths; a fused shard not in memory is planned from its input_ids column alone."""
        if self.kind == "sft" or (self._last is not None and self._last[0] == shard):
            return [len(r["input_ids"]) for r in self.rows(shard)]
        col = read_shard(locate(self.data_dir) / shard, columns=["input_ids"]).column(0).combine_chunks()
        return col.value_lengths().to_numpy(zero_copy_only=False).tolist()


def pack(lengths: list[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Shuffle window indices, then pack them greedily into micro-batches by padded tokens."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and (len(current) + 1) * max(longest, lengths[i]) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def epoch_plan(source: ShardSource | str, shards: list[str], batch_tokens: int, seed: int,
               epoch: int) -> Iterator[tuple[str, list[list[int]]]]:
    """Per epoch: a seeded shard order and, per shard, its micro-batches (window indices); a str
    is a fused dataset folder. Planned lazily, shard by shard, so the shard just planned is the
    one streamed next (read once); fused shards are planned from lengths alone, memory stays flat."""
    if isinstance(source, str):
        source = ShardSource(source)
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(shards)
    rng.shuffle(order)
    for shard in order:
        yield shard, pack(source.lengths(shard), batch_tokens, rng)


def micro_batches(source: ShardSource, shards: list[str], cfg: TrainConfig,
                  skip: int) -> Iterator[list[dict[str, Any]]]:
    """Micro-batches in training order, forever (epochs repeat with new seeds), skipping the
    first `skip` (a resumed run). One shard is held in memory at a time."""
    seen = 0
    epoch = 0
    while True:
        for shard, batches in epoch_plan(source, shards, cfg.batch_tokens, cfg.seed, epoch):
            if seen + len(batches) <= skip:
                seen += len(batches)
                continue
            windows = source.rows(shard)
            for b in batches:
                if seen >= skip:
                    yield [windows[i] for i in b]
                seen += 1
        epoch += 1


def collate(rows: list[dict[str, Any]], with_topk: bool, with_chunks: bool = False) -> Batch:
    import torch

    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((B, T), dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T - 1), -100, dtype=torch.long)
    k = rows[0]["topk_ids"].shape[1] if with_topk else 0
    tk_ids = torch.zeros((B, T - 1, k), dtype=torch.long) if with_topk else None
    tk_q = torch.zeros((B, T - 1, k), dtype=torch.float32) if with_topk else None
    tail = torch.zeros((B, T - 1), dtype=torch.float32) if with_topk else None
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        att[b, :n] = 1
        labels[b, : n - 1] = torch.tensor(r["labels"])
        if with_topk:
            tid = torch.from_numpy(r["topk_ids"].astype(np.int64))  # [n-1, k]
            q = torch.from_numpy(np.exp(r["topk_lp"].astype(np.float32)))
            pad = tid == PAD_ID
            tk_ids[b, : n - 1] = tid.masked_fill(pad, 0)
            tk_q[b, : n - 1] = q.masked_fill(pad, 0.0)
            tail[b, : n - 1] = torch.from_numpy(r["tail"].astype(np.float32))
    chunk_of = chunk_teacher = None
    if with_chunks:
        chunk_of = torch.full((B, T - 1), -1, dtype=torch.long)
        teacher: list[float] = []
        for b, r in enumerate(rows):
            for start, end, ll in zip(*r["chunks"], strict=True):
                chunk_of[b, start:end] = len(teacher)
                teacher.append(ll)
        chunk_teacher = torch.tensor(teacher, dtype=torch.float32)
    return Batch(ids, att, labels, tk_ids, tk_q, tail, int(att.sum()), chunk_of, chunk_teacher)


def sparse_distill_loss(logp_k: Any, topk_q: Any, tail: Any) -> Any:
    """Cross-entropy toward a sparse target with tail mass, summed over positions.

    logp_k float [N, k]: the model's log-probs gathered at the target's ids; topk_q float [N, k]
    (0 on padding entries); tail float [N]. The listed ids and "everything else" are the buckets.
    """
    import torch

    covered = torch.exp(logp_k).masked_fill(topk_q == 0, 0.0).sum(-1)  # [N] model mass on the listed ids
    rest = torch.log1p(-covered.clamp(max=1 - 1e-6))  # [N] log of the model's mass elsewhere
    return (-(topk_q * logp_k).sum(-1) - tail * rest).sum()


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio · lr."""
    warmup = cfg.warmup(total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def compute_loss(model: Any, batch: Batch, lam: float, loss: str = "sparse",
                 alm_temperature: float = 1.0) -> tuple[Any, dict[str, float]]:
    """The bundled trainer's loss of one batch: `fusion_loss` of the model's logits."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention).logits  # [B, T, V]
    return fusion_loss(logits, batch.__dict__, lam, loss, alm_temperature)


def fusion_loss(logits: Any, batch: Any, lam: float = 0.9, loss: str = "sparse",
                alm_temperature: float = 1.0) -> tuple[Any, dict[str, float]]:
    """λ·CLM + (1−λ)·distill, CLM and the sparse/ULD terms averaged over the batch's real positions,
    ALM over its chunks; the public loss for any training loop (with
    `fusedata.torch_data.collate_fusion`'s batches). One log-softmax and one gather serve both terms,
    so distillation costs little over plain CLM.

    logits float [B, T, V] of the model on batch["input_ids"]; batch: labels long [B, T−1] (−100 where
    ignored) and, when lam < 1, topk_ids long / topk_q float [B, T−1, k] and tail float [B, T−1]
    (loss "alm": chunk_of long [B, T−1] and chunk_teacher float [C] instead).
    Returns the loss tensor and its parts as floats ({"clm", "distill"})."""
    import torch

    from fusedata.losses import alm_loss, uld_loss

    logits = logits[:, :-1]  # [B, T-1, V]: position i predicts labels[:, i]
    labels = batch["labels"]
    mask = labels != -100  # [B, T-1]
    n = mask.sum().clamp(min=1)
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # [N, V]
    index = labels[mask][:, None]  # [N, 1]
    if lam < 1.0 and loss == "sparse":
        index = torch.cat([index, batch["topk_ids"][mask]], dim=1)  # [N, 1+k]
    picked = logp.gather(1, index)  # [N, 1+k]
    clm = -picked[:, 0].sum() / n
    parts = {"clm": float(clm.detach())}
    total = clm
    if lam < 1.0:
        if loss == "uld":
            distill = uld_loss(logp, batch["topk_q"][mask], batch["tail"][mask]) / n
        elif loss == "alm":
            chunks = max(int(batch["chunk_teacher"].numel()), 1)
            distill = alm_loss(picked[:, 0], batch["chunk_of"][mask], batch["chunk_teacher"], alm_temperature) / chunks
        else:
            distill = sparse_distill_loss(picked[:, 1:], batch["topk_q"][mask], batch["tail"][mask]) / n
        total = lam * clm + (1 - lam) * distill
        parts["distill"] = float(distill.detach())
    return total, parts


def train(cfg: TrainConfig, log: Any = print, on_step: Any = None, *, _upload: Any = None) -> dict[str, Any]:
    """Train, checkpointing to cfg.output; resumes from the checkpoint found there. An output URI
    (s3://…) is written through a local working copy (`_train_via_local_copy`).

    `on_step(step, tokens, model)`, if given, is called before the first step of a fresh run
    (step 0) and after every optimizer step: the fusion benchmark draws learning curves with it.
    """
    if is_uri(cfg.output) and _upload is None:
        return _train_via_local_copy(cfg, log, on_step)
    import torch

    from fusedata.models.spec import load_model, load_tokenizer, resolve, tokenizer_hash

    manifest = open_dataset(cfg.data, verify=cfg.verify)
    if manifest.kind not in ("fused", "sft"):
        raise UsageError(f"{cfg.data}: is a '{manifest.kind}' dataset; expected a fused or sft dataset")
    sft = manifest.kind == "sft"
    if sft:  # no distillation target; λ = 1 also in the checkpoint's identity, so --lam never blocks a resume
        cfg = replace(cfg, lam=1.0)
    out = Path(cfg.output)
    state_file = out / STATE_NAME
    state: dict[str, Any] = {"step": 0, "tokens": 0}
    resume = state_file.is_file()
    if not resume and out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a fusedata checkpoint; choose another --output")
    if resume:
        state = json.loads(state_file.read_text())
        if not _same_run(state["config"], cfg):
            raise UsageError(f"{out} holds a checkpoint of a different training run; choose another --output")
        ref = resolve(str(out))
    else:
        ref = resolve(cfg.model)
    tokenizer = load_tokenizer(ref)
    if not sft and tokenizer_hash(tokenizer) != manifest.run.get("tokenizer_hash"):
        raise UsageError(f"{cfg.data} was made for another tokenizer than {cfg.model}'s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    on_gpu = cfg.device.startswith("cuda")
    dtype = {"auto": "bfloat16" if on_gpu else "float32"}.get(cfg.dtype, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if cfg.init_config and not resume:
        vocab = manifest.run.get("vocab_size") or len(tokenizer)
        model = model_from_config(cfg.init_config, tokenizer, int(vocab), cfg.seed).to(cfg.device, getattr(torch, dtype))
    else:
        model = load_model(ref, cfg.device, dtype)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume:
        optim.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
        torch.set_rng_state(torch.load(out / "rng.pt", weights_only=True))

    shards = [sh.name for sh in manifest.shards]
    distil = cfg.lam < 1.0
    source = ShardSource(cfg.data, manifest.kind, distil and cfg.loss != "alm", distil and cfg.loss == "alm",
                         tokenizer, cfg.max_length)
    plan = list(epoch_plan(source, shards, cfg.batch_tokens, cfg.seed, 0))
    per_epoch = sum(len(b) for _, b in plan)
    if not per_epoch:
        raise UsageError(f"{cfg.data}: no rows to train on")
    if sft:
        kept = sum(len(ix) for _, b in plan for ix in b)
        dropped = manifest.rows - kept
        note = f", {dropped} dropped (no response token within --max-length)" if dropped else ""
        log(f"sft data: {kept} pairs{note}; completion-only CLM (λ=1)")
    total_steps = cfg.max_steps or max(1, cfg.epochs * per_epoch // cfg.grad_accum)
    if cfg.warmup(total_steps) >= total_steps:
        log(f"warning: the warm-up ({cfg.warmup(total_steps)} steps) is not shorter than the run ({total_steps} "
            "steps): the learning rate never reaches its peak; use --warmup-ratio or fewer --warmup-steps")
    step, tokens = int(state["step"]), int(state["tokens"])
    history: list[dict[str, float]] = state.get("history", [])
    t0 = time.perf_counter()
    tokens_at_start = tokens
    stream = micro_batches(source, shards, cfg, skip=step * cfg.grad_accum)
    if on_step is not None and step == 0:
        on_step(0, 0, model)
    while step < total_steps:
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg, total_steps)
        optim.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = _to_device(collate(next(stream), source.need_topk, source.need_chunks), cfg.device)
            loss, parts = compute_loss(model, batch, cfg.lam, cfg.loss, cfg.alm_temperature)
            (loss / cfg.grad_accum).backward()
            tokens += batch.tokens
            for key, v in {"loss": float(loss.detach()), **parts}.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + v / cfg.grad_accum
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        optim.step()
        step += 1
        if on_step is not None:
            on_step(step, tokens, model)
        rate = (tokens - tokens_at_start) / max(time.perf_counter() - t0, 1e-9)
        history.append({"step": step, **{k: round(v, 5) for k, v in parts_sum.items()}, "grad_norm": round(grad_norm, 4)})
        if cfg.log_every and (step % cfg.log_every == 0 or step == total_steps):
            shown = " ".join(f"{k} {v:.4f}" for k, v in parts_sum.items())
            log(f"step {step}/{total_steps}  {shown}  lr {lr_at(step - 1, cfg, total_steps):.2e}  {rate:,.0f} tok/s")
        if step == total_steps or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(model, tokenizer, optim, out, {
                "step": step, "tokens": tokens, "config": _config_identity(cfg), "history": history,
                "data_tokenizer_hash": manifest.run.get("tokenizer_hash"),
            })
            if _upload is not None:
                _upload(out)
    return {"steps": step, "tokens": tokens, "final_loss": history[-1]["loss"] if history else None,
            "history": history}


def model_from_config(path: str, tokenizer: Any, vocab_size: int, seed: int) -> Any:
    """A freshly initialised causal LM of the architecture in a config JSON (a Hugging Face
    config.json, `model_type` included), sized to the target's vocabulary and special tokens.
    Weights are drawn from `seed`, so every arm of one seed starts from the same student."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        model_type = spec.pop("model_type")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise UsageError(f"--init-config {path}: not a model config JSON with a model_type ({exc})") from None
    spec.update(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    try:
        config = AutoConfig.for_model(model_type, **spec)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--init-config {path}: {exc}") from None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _to_device(batch: Batch, device: str) -> Batch:
    if device == "cpu":
        return batch
    moved = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.__dict__.items()}
    return Batch(**moved)


def _config_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (not the output path)."""
    d = asdict(cfg)
    for key in ("output", "save_every", "log_every", "threads", "device", "verify"):
        d.pop(key)
    return d


def _same_run(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a checkpoint's identity is this run's. A checkpoint written before a field existed
    lacks it and ran with its default, so missing keys count as defaults (old runs stay resumable)."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return {**defaults, **saved} == {**defaults, **_config_identity(cfg)}


def checkpoint_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of its run (its resume key)."""
    return _config_identity(cfg)


def checkpoint_done(cfg: TrainConfig) -> bool:
    """Whether cfg.output holds a checkpoint of this very run that already reached its last step."""
    state_file = locate(cfg.output) / STATE_NAME
    if not state_file.is_file():
        return False
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if not _same_run(state.get("config", {}), cfg):
        return False
    total = cfg.max_steps
    if not total:
        shards = [s.name for s in open_dataset(cfg.data, "fused").shards]
        per_epoch = sum(len(b) for _, b in epoch_plan(cfg.data, shards, cfg.batch_tokens, cfg.seed, 0))
        total = max(1, cfg.epochs * per_epoch // cfg.grad_accum)
    return int(state.get("step", 0)) >= total


def save_checkpoint(model: Any, tokenizer: Any, optim: Any, out: Path, state: dict[str, Any]) -> None:
    """Write the whole checkpoint to a temporary folder, then swap it in; state file last."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    torch.save(optim.state_dict(), tmp / "optimizer.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=1))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# -- a checkpoint at a URI ------------------------------------------------------------------------
UPLOADING_NAME = ".fusedata-uploading"  # at a URI while a checkpoint is being uploaded


def _train_via_local_copy(cfg: TrainConfig, log: Any, on_step: Any) -> dict[str, Any]:
    """`train --output s3://…`: train into a local working folder (a temporary one, holding the
    URI's checkpoint when there is one to resume) and upload each checkpoint saved there
    (`upload_checkpoint`), so the URI shows a checkpoint only once all of its files are there."""
    import tempfile

    remote = locate(cfg.output)
    with tempfile.TemporaryDirectory(prefix="fusedata-train-") as work:
        local = Path(work) / "ckpt"
        fetch_checkpoint(remote, local, log)
        return train(replace(cfg, output=str(local)), log, on_step, _upload=lambda out: upload_checkpoint(out, remote))


def fetch_checkpoint(remote: Any, local: Path, log: Any = print) -> None:
    """Download the checkpoint at `remote` into `local` to resume it (nothing when there is none). A
    folder without a state file that fusedata was uploading to (its marker is there) held an upload
    cut short: training starts again from the beginning; any other non-empty folder is refused."""
    import pyarrow.fs as pafs

    if (remote / STATE_NAME).is_file():
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(remote.path, str(local), source_filesystem=remote.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        (local / UPLOADING_NAME).unlink(missing_ok=True)
        return
    if not remote.is_dir() or not remote.iterdir():
        return
    if (remote / UPLOADING_NAME).is_file():
        log(f"{remote}: the upload of a checkpoint was cut short before it was complete; training from the start")
        return
    raise UsageError(f"{remote} exists and is not a fusedata checkpoint; choose another --output")


def upload_checkpoint(local: Path, remote: Any) -> None:
    """Upload the checkpoint saved in `local` to the URI. Object stores have no folder rename, so the
    order does the work: the marker first, then the previous state file goes (from here the URI
    holds no checkpoint, and a later run knows that an upload was cut short), then every other file
    (each object appears whole), the state file last, and the marker is removed."""
    import pyarrow.fs as pafs

    marker = remote / UPLOADING_NAME
    remote.mkdir()
    marker.write_bytes_atomic(b"")
    (remote / STATE_NAME).unlink(missing_ok=True)
    for f in sorted(local.iterdir()):
        if f.name != STATE_NAME:
            pafs.copy_files(str(f), (remote / f.name).path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=remote.fs)
    (remote / STATE_NAME).write_bytes_atomic((local / STATE_NAME).read_bytes())
    marker.unlink(missing_ok=True)
