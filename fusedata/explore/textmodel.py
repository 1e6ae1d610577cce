"""One model as explore uses it: batched generation and label scoring, loaded once.

The same object serves in-process and inside a Ray actor (jobs/explore_ray.py). Sampling is
seeded per call, so a resumed run regenerates a killed round identically.
"""

from __future__ import annotations

from typing import Any

from fusedata.explore.prompts import JUDGE_LABELS, answer_prompt, clean_answer, first_line


class TextModel:
    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 8, threads: int = 0) -> None:
        import torch

        from fusedata.models.spec import load_model

        if threads:
            torch.set_num_threads(threads)
        ref = self._setup(spec, device, batch_size)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(ref, device, "float32")

    def _setup(self, spec: str, device: str, batch_size: int) -> Any:
        """What both backends hold: the model's name, its own tokenizer and the judge's label ids.
        Returns the resolved ModelRef."""
        from fusedata.models.spec import load_tokenizer, resolve

        ref = resolve(spec)
        self.name, self.device, self.batch_size = spec, device, batch_size
        self.tokenizer = load_tokenizer(ref)
        self.label_ids = [self._label_id(c) for c in JUDGE_LABELS]
        return ref

    def _label_id(self, letter: str) -> int:
        """The token a model would write after 'Answer' for this letter (' A', '▁A', ...)."""
        ids = self.tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        return int(ids[-1] if len(ids) > 1 and self.tokenizer.decode(ids[:1]).strip() == "" else ids[0])

    def _chunks(self, prompts: list[str]) -> list[list[int]]:
        """Prompt indices in length order, batch_size at a time (less padding per batch)."""
        lengths = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 one_line: bool = False) -> list[str]:
        """Continuations of each prompt (greedy at temperature 0). one_line: stop at a line break."""
        import torch

        out: list[str] = [""] * len(prompts)
        tok = self.tokenizer
        tok.padding_side = "left"  # generation appends on the right
        for c, chunk in enumerate(self._chunks(prompts)):
            enc = tok([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(self.device)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
            if temperature > 0:
                torch.manual_seed(seed * 1_000_003 + c)
                kwargs.update(do_sample=True, temperature=temperature, top_p=0.95, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if one_line:
                kwargs.update(stop_strings=["\n"], tokenizer=tok)
            with torch.no_grad():
                ids = self.model.generate(**enc, **kwargs)  # [b, prompt + new]
            new = ids[:, enc["input_ids"].shape[1]:]
            for i, row in zip(chunk, new, strict=True):
                text = tok.decode(row, skip_special_tokens=True)
                out[i] = first_line(text) if one_line else text
        return out

    def answer(self, questions: list[str], max_new_tokens: int) -> list[str]:
        prompts = [answer_prompt(self.tokenizer, q) for q in questions]
        return [clean_answer(t) for t in self.generate(prompts, max_new_tokens)]

    def close(self) -> None:
        """Nothing to release: the weights go with the object."""

    def label_scores(self, prompts: list[str], n_labels: list[int]) -> list[list[float]]:
        """For each prompt, the model's probabilities of the next token being ' A', ' B', ...
        (the first n_labels[i] letters), renormalised over those letters."""
        import torch

        tok = self.tokenizer
        tok.padding_side = "right"  # the last real position is then at length − 1
        scores: list[list[float]] = [[] for _ in prompts]
        for chunk in self._chunks(prompts):
            enc = tok([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits  # [b, T, V]
            last = enc["attention_mask"].sum(1) - 1  # [b]
            logp = torch.log_softmax(logits[torch.arange(len(chunk)), last].float(), dim=-1)  # [b, V]
            for row, i in enumerate(chunk):
                ids = torch.tensor(self.label_ids[: n_labels[i]])
                scores[i] = torch.softmax(logp[row, ids], dim=-1).tolist()  # [n_labels]
        return scores


class VllmTextModel(TextModel):
    """The same model served by vLLM (`make vllm`), in a child process of its own environment
    (fusedata/vllm_backend.py). Prompts are tokenised here with the model's own tokenizer, so
    both backends see the same token ids; label scores are the prompt log-prob of each label
    appended to the prompt."""

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 8, threads: int = 0,
                 max_model_len: int = 2048, kv_cache_gb: float = 1.0) -> None:
        from fusedata.vllm_backend import VllmEngine

        ref = self._setup(spec, device, batch_size)
        self.max_model_len = max_model_len
        self.engine = VllmEngine(ref.path, max_logprobs=1, max_model_len=max_model_len, kv_cache_gb=kv_cache_gb,
                                 threads=f"0-{threads - 1}" if threads else "")

    def _ids(self, prompts: list[str], room: int) -> list[list[int]]:
        """Token ids of each prompt, cut from the left so that `room` more tokens fit."""
        keep = self.max_model_len - room
        return [ids[-keep:] for ids in self.tokenizer(prompts)["input_ids"]]

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 one_line: bool = False) -> list[str]:
        new = self.engine.generate(self._ids(prompts, max_new_tokens), max_new_tokens, temperature,
                                   seed * 1_000_003, ["\n"] if one_line else None)
        texts = [self.tokenizer.decode(ids.tolist(), skip_special_tokens=True) for ids in new]
        return [first_line(t) if one_line else t for t in texts]

    def label_scores(self, prompts: list[str], n_labels: list[int]) -> list[list[float]]:
        import numpy as np

        seqs, owner = [], []
        for i, ids in enumerate(self._ids(prompts, 1)):
            for label in self.label_ids[: n_labels[i]]:
                seqs.append(np.asarray(ids + [label], np.int32))  # the label's log-prob is the last position's gold
                owner.append(i)
        gold = [float(w.gold_logprob[-1]) for w in self.engine.topk(seqs, 1)]
        scores: list[list[float]] = []
        for i in range(len(prompts)):
            lp = np.asarray([g for g, o in zip(gold, owner, strict=True) if o == i], np.float64)  # [n_labels]
            p = np.exp(lp - lp.max())
            scores.append((p / p.sum()).tolist())
        return scores

    def close(self) -> None:
        self.engine.close()


def load_text_model(spec: str, backend: str = "hf", device: str = "cpu", batch_size: int = 8,
                    threads: int = 0) -> TextModel:
    """A model for explore on the chosen backend: "hf" (transformers) or "vllm"."""
    if backend == "vllm":
        return VllmTextModel(spec, device, batch_size, threads)
    if backend != "hf":
        from fusedata.errors import UsageError

        raise UsageError(f"unknown backend {backend!r}: use hf or vllm")
    return TextModel(spec, device, batch_size, threads)
