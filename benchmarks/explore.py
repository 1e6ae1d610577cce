"""Explore throughput: SFT pairs per minute by backend and executor, in one run, same settings.

Each configuration runs `fusedata explore` from scratch (target SmolLM2-135M, source
Gemma-3-270M, the same seed, depth, batch and token limits) in a subprocess, after the models
are loaded (load and engine start-up reported apart), and reports pairs/min, the share of
sprouts that added a name, how often a source beat the target, and the judge's consistency
when the answers are shown in reverse order. Prints a markdown table.

    .venv/bin/python benchmarks/explore.py [--budget 12] [--batch 4] [--configs hf-local hf-ray vllm-local]

vllm-* needs the vLLM environment (`make vllm` or FUSEDATA_VLLM_PYTHON); it is skipped without it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET, SOURCE = "smollm2-135m", "gemma3-270m"


def _measure(config: str, out: str, budget: int, batch: int, depth: int, answer_tokens: int) -> dict:
    """Runs in a subprocess: one explore run, timed from the moment its models are loaded."""
    import pyarrow.parquet as pq

    from fusedata.explore.run import ExploreConfig, explore

    backend, executor = config.split("-")
    cfg = ExploreConfig(target=TARGET, sources=(SOURCE,), output=out, budget=budget, batch=batch, depth=depth,
                        answer_tokens=answer_tokens, rejudge=1.0, backend=backend)
    t0 = time.perf_counter()
    specs = [TARGET, SOURCE]
    if executor == "ray":
        from jobs.explore_ray import RayPool

        pool = RayPool(specs, backend=backend)
        pool.call([(s, "generate", (["Hello"], 1)) for s in specs])  # wait until both are loaded
    else:
        from fusedata.explore.pool import LocalPool

        pool = LocalPool(backend=backend)
        for s in specs:
            pool.model(s)
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = explore(cfg, pool, log=lambda m: None)
    seconds = time.perf_counter() - t1
    pool.close()
    history = pq.read_table(Path(out) / "history").to_pylist()
    sprouts = [e for e in history if e["kind"] == "sprout"]
    return {"config": config, "load_s": load, "seconds": seconds, "pairs": result["pairs"],
            "rounds": result["rounds"], "sprout_ok": sum(e["success"] for e in sprouts) / max(len(sprouts), 1),
            "source_won": result.get("source_won"), "consistency": result.get("judge_consistency"),
            "rejudged": result.get("rejudged", 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--configs", nargs="+", default=["hf-local", "hf-ray", "vllm-local"])
    p.add_argument("--_one", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        print(json.dumps(_measure(args._one, args._out, args.budget, args.batch, args.depth, args.answer_tokens)))
        return

    rows = []
    for config in args.configs:
        if config.startswith("vllm"):
            from fusedata.errors import UsageError
            from fusedata.vllm_backend import vllm_python

            try:
                vllm_python()
            except UsageError as exc:
                print(f"skipping {config}: {exc}", file=sys.stderr)
                continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--_one", config, "--_out", str(Path(tmp) / "explore"),
                   "--budget", str(args.budget), "--batch", str(args.batch), "--depth", str(args.depth),
                   "--answer-tokens", str(args.answer_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{config} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{config}: {rows[-1]}", file=sys.stderr, flush=True)

    base = next((r for r in rows if r["config"] == "hf-local"), rows[0] if rows else None)
    print(f"\nexplore: target {TARGET}, source {SOURCE} (also the judge), budget {args.budget} pairs, "
          f"batch {args.batch}, depth {args.depth}, answers ≤ {args.answer_tokens} tokens, every pair re-judged\n")
    print("| config | load s | explore s | pairs/min | ÷ hf-local | rounds | sprouts ok | source won | judge consistency |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rate = r["pairs"] / r["seconds"] * 60
        ratio = rate / (base["pairs"] / base["seconds"] * 60)
        cons = "n/a" if r["consistency"] is None else f"{r['consistency']:.0%} of {r['rejudged']}"
        print(f"| {r['config']} | {r['load_s']:.0f} | {r['seconds']:.0f} | {rate:.2f} | {ratio:.2f} | {r['rounds']} | "
              f"{r['sprout_ok']:.0%} | {r['source_won']:.0%} | {cons} |")


if __name__ == "__main__":
    main()
