"""Extract throughput vs a bare forward pass of the same model on the same batches.

For each bundled model: the windows of the demo corpus are cut and batched once; then the
extract path (base model + chunked LM head + top-k + log-sum-exp) and a bare
`model(input_ids, attention_mask).logits` run alternately on those batches, each in its own
subprocess so that peak memory (max RSS) is measured per mode. Prints a markdown table.

    .venv/bin/python benchmarks/extract.py [--models smollm2-135m gemma3-270m] [--rounds 2]

With --vllm, the extract stage itself (tokenise, windows, forward, top-k, codec: what
`fusedata extract` runs per shard) is timed on the whole corpus with `--backend hf` and with
`--backend vllm` (its engine in its own environment: `make vllm` or FUSEDATA_VLLM_PYTHON): steady
state, timed on a second pass over the corpus; set-up (model load or engine start, plus the first
pass) reported apart. The hf stage runs at --hf-batch-tokens (1,024: its fastest on 2 CPU cores of
512..8,192), vLLM at its own default engine step (2,048 tokens on CPU). A second table compares
the two. Peak RSS is not comparable there (vLLM computes in child processes), so it is left out.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _measure(model: str, mode: str, corpus: str, max_length: int, batch_tokens: int, top_k: int) -> dict:
    """Runs in a subprocess: tokens/s of one mode and the process's peak RSS."""
    import torch

    from fusedata.corpus import read_corpus
    from fusedata.stages.extract import ExtractConfig, ExtractStage
    from fusedata.windows import batch_by_budget

    backend = "vllm" if mode == "vllm" else "hf"  # "stage": the hf extract stage, timed like vllm
    stage = ExtractStage(ExtractConfig(model=model, top_k=top_k, max_length=max_length, batch_tokens=batch_tokens,
                                       backend=backend))
    t_setup = time.perf_counter()
    stage.setup()
    setup_s = time.perf_counter() - t_setup
    docs, _ = read_corpus([corpus])
    if mode in ("stage", "vllm"):  # the whole stage per pass, as `fusedata extract` runs a shard
        t_warm = time.perf_counter()
        stage(docs)  # warm-up on the same documents: an engine's first requests (new shapes) are slow
        setup_s += time.perf_counter() - t_warm
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        table = stage(docs)
        tokens = sum(len(x) for x in table["input_ids"].to_pylist())
    else:  # the same batches through the extract forward or a bare forward
        wins = stage.windows(docs)
        batches = [[wins[i].ids for i in b] for b in batch_by_budget([len(w.ids) for w in wins], batch_tokens)]
        tokens = sum(len(w.ids) for w in wins)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        for seqs in batches:
            if mode == "extract":
                stage.forward(seqs)
                continue
            T = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), T), dtype=torch.long)  # [B, T]
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.from_numpy(s.astype("int64"))
                mask[b, : len(s)] = 1
            with torch.inference_mode():
                _ = stage.model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    seconds = time.perf_counter() - t0
    stage.teardown()
    return {
        "setup_s": setup_s,
        "tokens": tokens,
        "tok_s": tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_before / 1024,
    }


def run_one(model: str, mode: str, corpus: str, args: argparse.Namespace) -> dict:
    batch = args.hf_batch_tokens if mode == "stage" else args.batch_tokens
    cmd = [sys.executable, __file__, "--child", model, mode, corpus, str(args.max_length), str(batch), str(args.top_k)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode (median reported)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=2048, help="8 x 256; a bare forward materialises [B,T,V]")
    p.add_argument("--hf-batch-tokens", type=int, default=1024,
                   help="batch of the hf extract stage in the --vllm comparison (its fastest on 2 cores)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--per-domain", type=int, default=8)
    p.add_argument("--vllm", action="store_true", help="also time --backend vllm on the same batches")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        m, mode, corpus, ml, bt, k = args.child
        print(json.dumps(_measure(m, mode, corpus, int(ml), int(bt), int(k))))
        return

    from fusedata.demo_corpus import build_demo_corpus

    corpus = str(Path(tempfile.mkdtemp()) / "corpus.jsonl")
    build_demo_corpus(Path(corpus), per_domain=args.per_domain, max_chars=1500)
    rows = []
    vllm_rows = []
    modes = ("bare", "extract", "stage", "vllm") if args.vllm else ("bare", "extract")
    for model in args.models:
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(run_one(model, mode, corpus, args))
        ext = statistics.median(r["tok_s"] for r in runs["extract"])
        bare = statistics.median(r["tok_s"] for r in runs["bare"])
        rows.append((model, runs["extract"][0]["tokens"], bare, ext, ext / bare,
                     max(r["peak_rss_mb"] for r in runs["bare"]), max(r["peak_rss_mb"] for r in runs["extract"])))
        if args.vllm:
            vl = statistics.median(r["tok_s"] for r in runs["vllm"])
            hf = statistics.median(r["tok_s"] for r in runs["stage"])
            vllm_rows.append((model, runs["vllm"][0]["tokens"], hf, vl, vl / hf,
                              statistics.median(r["setup_s"] for r in runs["stage"]),
                              statistics.median(r["setup_s"] for r in runs["vllm"])))
    print(f"\nextract vs bare forward — fp32 CPU, batches of {args.batch_tokens} tokens, windows ≤ {args.max_length}, "
          f"k={args.top_k}, median of {args.rounds} alternating rounds\n")
    print("| model | tokens | bare forward tok/s | extract tok/s | extract ÷ bare | peak RSS bare (MB) | peak RSS extract (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, n, b, e, r, rb, re_ in rows:
        print(f"| {m} | {n} | {b:,.0f} | {e:,.0f} | {r:.2f} | {rb:,.0f} | {re_:,.0f} |")
    if vllm_rows:
        print(f"\nthe extract stage, --backend vllm vs hf — the same documents, fp32 CPU, k={args.top_k}, "
              f"hf batches of {args.hf_batch_tokens} tokens, median of {args.rounds} alternating rounds, timed on a second pass (the first, with the set-up, apart)\n")
        print("| model | tokens | hf extract tok/s | vllm extract tok/s | vllm ÷ hf | hf set-up + first pass (s) | vllm engine start + first pass (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for m, n, h, v, r, sh, sv in vllm_rows:
            print(f"| {m} | {n} | {h:,.0f} | {v:,.0f} | {r:.2f} | {sh:.1f} | {sv:.1f} |")


if __name__ == "__main__":
    main()
