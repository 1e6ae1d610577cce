"""Fused training step time ÷ plain CLM step time, same model, same batch, one run.

A step is forward + loss + backward + clip + AdamW update. The batch is real text from the
demo corpus; the fused target is a sparse top-k (ids, probabilities, tail) of the same shape a
fused dataset holds. Steps alternate between the two losses; medians are reported.

    .venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--steps 6] [--batch 2x512] [--k 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=6, help="timed steps per loss (after one warm-up each)")
    p.add_argument("--batch", default="2x512", help="rows x tokens")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--lam", type=float, default=0.9)
    args = p.parse_args()

    import torch

    from fusedata.corpus import read_corpus
    from fusedata.demo_corpus import build_demo_corpus
    from fusedata.models.spec import load_model, load_tokenizer, resolve
    from fusedata.train import Batch, compute_loss

    rows, length = (int(x) for x in args.batch.split("x"))
    corpus = Path(tempfile.mkdtemp()) / "c.jsonl"
    build_demo_corpus(corpus, per_domain=8, max_chars=4000)
    docs, _ = read_corpus([str(corpus)])
    ref = resolve(args.model)
    tok, model = load_tokenizer(ref), load_model(ref)
    model.train()
    stream = np.concatenate([tok(t)["input_ids"] for t in docs.column("text").to_pylist()])
    ids = torch.from_numpy(stream[: rows * length].astype(np.int64)).view(rows, length)  # [B, T]
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    topk_ids = torch.randint(0, vocab, (rows, length - 1, args.k), generator=g)  # [B, T-1, k]
    q = torch.softmax(torch.randn(rows, length - 1, args.k, generator=g), -1) * 0.9
    batch = Batch(ids, torch.ones_like(ids), ids[:, 1:].clone(), topk_ids, q, 1 - q.sum(-1), rows * length)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(lam: float) -> float:
        t0 = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        loss, _ = compute_loss(model, batch, lam)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        return time.perf_counter() - t0

    step(1.0)
    step(args.lam)
    times: dict[float, list[float]] = {1.0: [], args.lam: []}
    for _ in range(args.steps):
        for lam in (1.0, args.lam):
            times[lam].append(step(lam))
    clm, fused = statistics.median(times[1.0]), statistics.median(times[args.lam])
    print(f"\ntraining step, {args.model}, fp32 CPU, batch {rows}x{length}, k={args.k}, median of {args.steps}\n")
    print("| loss | step s | tokens/s | ÷ CLM |")
    print("|---|---:|---:|---:|")
    print(f"| CLM (λ=1) | {clm:.2f} | {rows * length / clm:,.0f} | 1.00 |")
    print(f"| fused (λ={args.lam}) | {fused:.2f} | {rows * length / fused:,.0f} | {fused / clm:.3f} |")


if __name__ == "__main__":
    main()
