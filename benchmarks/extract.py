"""Extract throughput vs a bare forward pass of the same model on the same batches.

For each bundled model: the windows of the demo corpus are cut and batched once; then the
extract path (base model + chunked LM head + top-k + log-sum-exp) and a bare
`model(input_ids, attention_mask).logits` run alternately on those batches, each in its own
subprocess so that peak memory (max RSS) is measured per mode. Prints a markdown table.

    .venv/bin/python benchmarks/extract.py [--models smollm2-135m gemma3-270m] [--rounds 2]

With --vllm, the extract stage itself (tokenise, windows, forward, top-k, codec: what
`fusedata extract` runs per shard) is timed instead, on the whole corpus, with `--backend hf` and
`--backend vllm` (its engine in its own environment: `make vllm` or FUSEDATA_VLLM_PYTHON), each in
a fresh process, in --rounds separate rounds (3 by default): steady state, timed on a second pass
over the corpus, set-up (model load or engine start, plus the first pass) reported apart. Both
backends use the same cores (every core this process may run on; the hf stage sets its torch
threads to that count instead of inheriting OMP_NUM_THREADS). It prints the environment (CPU
model and flags, cores, load, versions, the threads, cores, kernels and KV cache vLLM's model
worker actually uses), the min / median / max of the vllm ÷ hf ratio over the rounds, and where
the time of a vLLM pass goes per phase of the engine step (timed inside vLLM's own processes:
FUSEDATA_VLLM_PROFILE=1). CPU seconds are reported beside wall seconds: on a shared machine
tokens per CPU-second (the cost of the work) move much less than tokens per second, and CPU ÷
wall says how many cores the computation actually got. Writes benchmarks/results/extract.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "extract.json"
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def bound_cores() -> list[int]:
    """The cores this process may run on (what both backends are given)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs: a VM's share of time taken by other guests."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def environment() -> dict:
    """CPU model and flags, cores, load and versions of the machine this runs on."""
    import platform

    import torch

    model, flags, mhz = platform.processor(), set(), 0.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("cpu MHz") and not mhz:
                    mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    return {
        "cpu": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cpu_mhz": mhz, "cpus_online": os.cpu_count(),
        "kernel": platform.release(),
        "cores_bound": bound_cores(), "loadavg": list(os.getloadavg()),
        "OMP_NUM_THREADS (caller)": os.environ.get("OMP_NUM_THREADS", "unset"),
        "python": platform.python_version(), "torch (hf)": torch.__version__,
        "torch cpu capability (hf)": torch.backends.cpu.get_cpu_capability(),
    }


def linear_flops_per_token(model: str) -> dict[str, float]:
    """FLOPs of one token's matrix products (2 per multiply-add): the decoder layers' projections
    and the LM head over the whole vocabulary (attention scores, norms and softmax left out: a few
    % at windows of 256). From the converted model's config.json."""
    from fusedata.models.cache import cache_root

    cfg = json.loads((cache_root() / model / "config.json").read_text())
    c = cfg.get("text_config", cfg)
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    per_layer = 2 * h * (2 * heads * hd + 2 * kv * hd) + 2 * 3 * h * c["intermediate_size"]  # q, o, k, v; gate, up, down
    return {"layers": layers * per_layer, "lm_head": 2 * h * vocab, "total": layers * per_layer + 2 * h * vocab}


def peak_flops_per_core(env: dict) -> float | None:
    """fp32 FLOP/s of one core at the nominal clock with two FMA units (AVX-512: 16 lanes,
    AVX2: 8): an upper bound no fp32 engine passes; turbo clocks may lift it by ~20-40 %."""
    if not env.get("cpu_mhz"):
        return None
    lanes = 16 if "avx512f" in env["cpu_flags"] else 8 if "fma" in env["cpu_flags"] else 4
    return 2 * 2 * lanes * env["cpu_mhz"] * 1e6


def _measure(model: str, mode: str, corpus: str, max_length: int, batch_tokens: int, top_k: int) -> dict:
    """Runs in a subprocess: tokens/s and CPU seconds of one mode and the process's peak RSS."""
    import torch

    from fusedata.corpus import read_corpus
    from fusedata.stages.extract import ExtractConfig, ExtractStage
    from fusedata.windows import batch_by_budget

    backend = "vllm" if mode.startswith("vllm") else "hf"  # "stage": the hf extract stage, timed like vllm
    if backend == "vllm":
        os.environ["FUSEDATA_VLLM_PROFILE"] = "1"  # phase timers in every vLLM process
        os.environ["FUSEDATA_VLLM_MULTIPROCESS"] = "1" if mode == "vllm-mp" else "0"  # vLLM's own process layout
    threads = 0 if backend == "vllm" else len(bound_cores())  # hf: every core, whatever OMP_NUM_THREADS says
    stage = ExtractStage(ExtractConfig(model=model, top_k=top_k, max_length=max_length, batch_tokens=batch_tokens,
                                       backend=backend, threads=threads))
    t_setup = time.perf_counter()
    stage.setup()
    setup_s = time.perf_counter() - t_setup
    docs, _ = read_corpus([corpus])
    before = None
    if mode != "bare" and mode != "extract":  # the whole stage per pass, as `fusedata extract` runs a shard
        t_warm = time.perf_counter()
        stage(docs)  # warm-up on the same documents: an engine's first requests (new shapes) are slow
        setup_s += time.perf_counter() - t_warm
        if stage.engine is not None:
            before = (copy.deepcopy(stage.engine.profile), dict(stage.engine.call_s))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu0, t0 = _cpu_s(), time.perf_counter()
        table = stage(docs)
        tokens = sum(len(x) for x in table["input_ids"].to_pylist())
    else:  # the same batches through the extract forward or a bare forward
        wins = stage.windows(docs)
        batches = [[wins[i].ids for i in b] for b in batch_by_budget([len(w.ids) for w in wins], batch_tokens)]
        tokens = sum(len(w.ids) for w in wins)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu0, t0 = _cpu_s(), time.perf_counter()
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
    out = {
        "setup_s": setup_s,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "cpu_s": _cpu_s() - cpu0,  # this process; the vLLM processes are added below
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_before / 1024,
        "torch_threads": torch.get_num_threads() if backend == "hf" else None,
    }
    if before is not None:
        out["vllm"] = _vllm_pass(stage.engine, before, seconds)
        out["cpu_s"] += sum(p["cpu_s"] for p in out["vllm"]["processes"])
    stage.teardown()
    return out


def _vllm_pass(engine, before: tuple[dict, dict], wall: float) -> dict:
    """Where one timed pass's wall time went, by phase of the engine step, and each vLLM
    process's CPU seconds: from the timers every vLLM process keeps (fusedata/vllm_worker.py)."""
    (p0, c0), p1, c1 = before, engine.profile, engine.call_s
    sec = {k: v - p0["seconds"].get(k, 0.0) for k, v in p1["seconds"].items()}
    calls = {k: v - p0["calls"].get(k, 0) for k, v in p1["calls"].items()}
    call = {k: c1[k] - c0[k] for k in c1}
    cpu0 = {f["pid"]: f["cpu_s"] for f in p0.get("facts", [])}
    processes = []
    for f in p1["facts"]:
        ph = set(f["phases"])
        role = ("frontend + engine core + model worker (one process)" if {"forward", "output_processing"} <= ph
                else "model worker" if "forward" in ph else "engine core" if "schedule" in ph else "frontend")
        processes.append({"role": role, "pid": f["pid"], "cpu_s": f["cpu_s"] - cpu0.get(f["pid"], 0.0)})
    worker = next((f["model_worker"] for f in p1["facts"] if "model_worker" in f), {})
    g = sec.get
    phases = {
        "schedule (scheduler)": g("schedule", 0.0),
        "forward (decoder layers)": g("forward", 0.0),
        "prompt log-probs (LM head, log-softmax, top-k, full vocabulary)": g("prompt_logprobs", 0.0),
        "rest of the model runner (inputs, sampling, bookkeeping)":
            g("model_runner", 0.0) - g("forward", 0.0) - g("prompt_logprobs", 0.0),
        "executor (engine core <-> model worker)": g("engine_step", 0.0) - g("model_runner", 0.0) - g("schedule", 0.0),
        "frontend: output processing": g("output_processing", 0.0),
        "frontend: rest of generate (requests, engine-core IPC)":
            call["generate_s"] - g("engine_step", 0.0) - g("output_processing", 0.0),
        "fusedata worker: parse prompt log-probs": call["parse_s"],
        "fusedata: frames over pipes": call["roundtrip_s"] - call["generate_s"] - call["parse_s"],
        "fusedata: tokenise, windows, codec": wall - call["roundtrip_s"],
    }
    return {"phases_s": phases, "engine_steps": calls.get("engine_step", 0), "processes": processes,
            "model_worker": worker, "engine": engine.facts, "forward_cpu_per_wall": _worker_parallelism(processes, sec)}


def _worker_parallelism(processes: list[dict], sec: dict) -> float | None:
    """CPU seconds of the process running the model per wall second of its model runner: the
    cores the computation actually got (2.0 = both cores of a 2-core machine, all the time)."""
    busy = sec.get("model_runner", 0.0)
    cpu = sum(p["cpu_s"] for p in processes if "model worker" in p["role"])
    return cpu / busy if busy > 0 else None


def run_one(model: str, mode: str, corpus: str, args: argparse.Namespace) -> dict:
    batch = args.hf_batch_tokens if mode == "stage" else args.batch_tokens
    cmd = [sys.executable, __file__, "--child", model, mode, corpus, str(args.max_length), str(batch), str(args.top_k)]
    steal0 = _steal_ticks()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child {mode} on {model} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    steal1 = _steal_ticks()
    result["steal_share"] = (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
    result["loadavg_after"] = list(os.getloadavg())
    return result


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _print_environment(env: dict, vllm_run: dict | None) -> None:
    print("\nenvironment\n")
    for key, value in env.items():
        print(f"- {key}: {value}")
    if vllm_run:
        eng, w = vllm_run["engine"], vllm_run["model_worker"]
        print(f"- vLLM {eng.get('vllm')} (torch {eng.get('torch')}), engine core in its own process: "
              f"{eng.get('multiprocessing')}, vLLM processes: {', '.join(p['role'] for p in vllm_run['processes'])}")
        print(f"- vLLM model worker: torch threads {w.get('torch_threads')}, cores of its threads "
              f"{sorted(set(w.get('thread_cores', [])))}, OpenMP env {w.get('env')}")
        print(f"- vLLM kernels: attention {w.get('attention_backend')}, GEMM {w.get('gemm')}, CPU capability "
              f"{w.get('cpu_capability')} (AMX tiles: {w.get('amx_tile')}), KV cache {w.get('kv_cache')}")


def main_vllm(args: argparse.Namespace, corpus: str, env: dict) -> dict:
    results = {}
    for model in args.models:
        rounds = []
        for r in range(args.rounds):  # separate rounds: each backend in a fresh process, hf first
            hf, vl = run_one(model, "stage", corpus, args), run_one(model, "vllm", corpus, args)
            rounds.append({"hf": hf, "vllm": vl, "ratio": vl["tok_s"] / hf["tok_s"],
                           "cpu_ratio": (vl["tokens"] / vl["cpu_s"]) / (hf["tokens"] / hf["cpu_s"])})
            if args.vllm_multiprocess:  # the same engine in vLLM's own three-process layout
                mp = run_one(model, "vllm-mp", corpus, args)
                rounds[-1].update({"vllm_mp": mp, "mp_ratio": mp["tok_s"] / hf["tok_s"]})
            print(f"{model} round {r + 1}: hf {hf['tok_s']:,.0f} tok/s, vllm {vl['tok_s']:,.0f} tok/s, "
                  f"ratio {rounds[-1]['ratio']:.2f} (load {vl['loadavg_after'][0]:.1f})", file=sys.stderr)
        phase_names = list(rounds[0]["vllm"]["vllm"]["phases_s"])
        results[model] = {
            "tokens": rounds[0]["hf"]["tokens"], "rounds": rounds, "flops_per_token": linear_flops_per_token(model),
            "ratio": _spread([x["ratio"] for x in rounds]), "cpu_ratio": _spread([x["cpu_ratio"] for x in rounds]),
            "phase_share_median": {
                name: statistics.median(x["vllm"]["vllm"]["phases_s"][name] / x["vllm"]["seconds"] for x in rounds)
                for name in phase_names},
        }
    _print_environment(env, results[args.models[0]]["rounds"][0]["vllm"]["vllm"])
    print(f"\nthe extract stage, --backend vllm vs hf: the same documents, fp32 CPU, k={args.top_k}, hf batches of "
          f"{args.hf_batch_tokens} tokens on {len(env['cores_bound'])} torch threads, {args.rounds} separate rounds, "
          "each timed on a second pass (the first, with the set-up, apart)\n")
    print("| model | round | tokens | hf tok/s | vllm tok/s | vllm ÷ hf | hf tok/CPU-s | vllm tok/CPU-s | "
          "vllm worker CPU ÷ wall | load (1 min) | steal | set-up + first pass hf / vllm (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, res in results.items():
        for i, x in enumerate(res["rounds"], 1):
            hf, vl = x["hf"], x["vllm"]
            par = vl["vllm"]["forward_cpu_per_wall"]
            print(f"| {model} | {i} | {hf['tokens']:,} | {hf['tok_s']:,.0f} | {vl['tok_s']:,.0f} | {x['ratio']:.2f} | "
                  f"{hf['tokens'] / hf['cpu_s']:,.0f} | {vl['tokens'] / vl['cpu_s']:,.0f} | "
                  f"{'-' if par is None else f'{par:.2f}'} | {vl['loadavg_after'][0]:.1f} | {vl['steal_share']:.0%} | "
                  f"{hf['setup_s']:.1f} / {vl['setup_s']:.1f} |")
    print("\n| model | vllm ÷ hf (tok/s) min / median / max | vllm ÷ hf per CPU-second min / median / max |")
    print("|---|---:|---:|")
    for model, res in results.items():
        r, c = res["ratio"], res["cpu_ratio"]
        print(f"| {model} | {r['min']:.2f} / **{r['median']:.2f}** / {r['max']:.2f} | "
              f"{c['min']:.2f} / {c['median']:.2f} / {c['max']:.2f} |")
    for model, res in results.items():
        if "vllm_mp" not in res["rounds"][0]:
            continue
        mp = _spread([x["mp_ratio"] for x in res["rounds"]])
        print(f"\n{model}, vLLM's own three-process layout (FUSEDATA_VLLM_MULTIPROCESS=1) in the same rounds: vllm ÷ hf "
              f"{mp['min']:.2f} / {mp['median']:.2f} / {mp['max']:.2f} (min / median / max)")
        for i, x in enumerate(res["rounds"], 1):
            v = x["vllm_mp"]["vllm"]
            cpus = ", ".join(f"{p['role']} {p['cpu_s']:.1f}" for p in v["processes"])
            par = v["forward_cpu_per_wall"]
            print(f"- round {i}: {x['vllm_mp']['tok_s']:,.0f} tok/s, model worker CPU ÷ wall "
                  f"{'-' if par is None else f'{par:.2f}'}, CPU seconds per process: {cpus}")
    peak = peak_flops_per_core(env)
    peak_text = "unknown" if peak is None else f"{peak / 1e9:.0f} GFLOP/s per core at {env['cpu_mhz']:.0f} MHz"
    print("\nwhat the arithmetic allows: fp32 FLOPs of the matrix products per token, the machine's peak on the "
          f"bound cores ({peak_text}), and the GFLOP each backend gets out of one CPU-second (medians over rounds)\n")
    print("| model | GFLOP per token (layers + LM head) | ceiling tok/s | hf tok/s (% of ceiling) | "
          "vllm tok/s (% of ceiling) | hf GFLOP per CPU-s | vllm GFLOP per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, res in results.items():
        f = res["flops_per_token"]
        ceiling = None if peak is None else peak * len(env["cores_bound"]) / f["total"]
        res["ceiling_tok_s"] = ceiling
        hf = statistics.median(x["hf"]["tok_s"] for x in res["rounds"])
        vl = statistics.median(x["vllm"]["tok_s"] for x in res["rounds"])
        hf_eff = statistics.median(x["hf"]["tokens"] * f["total"] / x["hf"]["cpu_s"] / 1e9 for x in res["rounds"])
        vl_eff = statistics.median(x["vllm"]["tokens"] * f["total"] / x["vllm"]["cpu_s"] / 1e9 for x in res["rounds"])
        pct_hf, pct_vl = ("", "") if ceiling is None else (f" ({hf / ceiling:.0%})", f" ({vl / ceiling:.0%})")
        print(f"| {model} | {f['total'] / 1e9:.3f} ({f['layers'] / 1e9:.3f} + {f['lm_head'] / 1e9:.3f}) | "
              f"{'-' if ceiling is None else f'{ceiling:,.0f}'} | {hf:,.0f}{pct_hf} | {vl:,.0f}{pct_vl} | "
              f"{hf_eff:.0f} | {vl_eff:.0f} |")
    for model, res in results.items():
        print(f"\nwhere a vLLM pass's wall time goes ({model}, median share over rounds; timed inside vLLM's processes)\n")
        print("| phase | share of the pass | seconds (round 1) |")
        print("|---|---:|---:|")
        for name, share in res["phase_share_median"].items():
            print(f"| {name} | {share:.1%} | {res['rounds'][0]['vllm']['vllm']['phases_s'][name]:.2f} |")
    return results


def main_bare(args: argparse.Namespace, corpus: str) -> list[dict]:
    rows = []
    for model in args.models:
        runs: dict[str, list[dict]] = {"bare": [], "extract": []}
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(run_one(model, mode, corpus, args))
        ext = statistics.median(r["tok_s"] for r in runs["extract"])
        bare = statistics.median(r["tok_s"] for r in runs["bare"])
        rows.append({"model": model, "tokens": runs["extract"][0]["tokens"], "bare_tok_s": bare, "extract_tok_s": ext,
                     "ratio": ext / bare, "peak_rss_bare_mb": max(r["peak_rss_mb"] for r in runs["bare"]),
                     "peak_rss_extract_mb": max(r["peak_rss_mb"] for r in runs["extract"])})
    print(f"\nextract vs bare forward — fp32 CPU, batches of {args.batch_tokens} tokens, windows ≤ {args.max_length}, "
          f"k={args.top_k}, median of {args.rounds} alternating rounds\n")
    print("| model | tokens | bare forward tok/s | extract tok/s | extract ÷ bare | peak RSS bare (MB) | peak RSS extract (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']} | {r['bare_tok_s']:,.0f} | {r['extract_tok_s']:,.0f} | {r['ratio']:.2f} | "
              f"{r['peak_rss_bare_mb']:,.0f} | {r['peak_rss_extract_mb']:,.0f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--rounds", type=int, default=None, help="rounds per mode (default 2, with --vllm 3)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=2048, help="8 x 256; a bare forward materialises [B,T,V]")
    p.add_argument("--hf-batch-tokens", type=int, default=1024,
                   help="batch of the hf extract stage in the --vllm comparison (its fastest on 2 cores)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--per-domain", type=int, default=8)
    p.add_argument("--vllm", action="store_true", help="time the extract stage with --backend vllm vs hf instead")
    p.add_argument("--vllm-multiprocess", action="store_true",
                   help="with --vllm, also time vLLM's own process layout (engine core and model worker apart)")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        m, mode, corpus, ml, bt, k = args.child
        print(json.dumps(_measure(m, mode, corpus, int(ml), int(bt), int(k))))
        return
    args.rounds = args.rounds or (3 if args.vllm else 2)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    from fusedata.demo_corpus import build_demo_corpus

    corpus = str(Path(tempfile.mkdtemp()) / "corpus.jsonl")
    build_demo_corpus(Path(corpus), per_domain=args.per_domain, max_chars=1500)
    env = environment()
    steal0, t0 = _steal_ticks(), time.time()
    part = main_vllm(args, corpus, env) if args.vllm else main_bare(args, corpus)
    steal1 = _steal_ticks()
    env.update({"loadavg_after": list(os.getloadavg()), "minutes": (time.time() - t0) / 60,
                "steal_share": (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])})
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["vllm" if args.vllm else "extract_vs_bare"] = {
        "environment": env, "args": {k: v for k, v in vars(args).items() if k != "child"}, "results": part}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nload average {env['loadavg']} before, {env['loadavg_after']} after; steal {env['steal_share']:.0%}; "
          f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
