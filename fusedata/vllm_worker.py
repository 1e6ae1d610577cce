"""The vLLM side of `fusedata extract --backend vllm`: a standalone child process.

Runs in the vLLM environment (`make vllm` builds `.venv-vllm`), which has its own torch and
transformers, so this file imports vllm and numpy only, never fusedata. It is started as a
script with the isolated flag (`python -I .../vllm_worker.py ...`), so nothing of the caller's
environment reaches it: neither PYTHONPATH and the user site (fusedata's environment) nor the
folder holding it (fusedata's modules, which are not importable without their dependencies).

Protocol (fusedata/vllm_backend.py is the other side), frames on stdin/stdout, each an
8-byte little-endian length followed by an `np.savez` archive (no pickles):
  child -> parent once the engine is up: {"ready": vllm version}
  parent -> child: {"k": int, "lengths": int64 [B], "ids": int32 [sum(lengths)]}
  child -> parent: {"ids": int32 [N, k], "logprobs": float32 [N, k], "gold": float32 [N]}
                   where N = sum(lengths - 1), window after window; or {"error": message}
  parent -> child: {"op": "generate", "lengths", "ids" (prompts as above), "max_tokens": int,
                    "temperature": float, "seed": int, "stop": str [S] (optional)}
  child -> parent: {"lengths": int64 [B], "ids": int32 [sum(lengths)]}: the generated tokens
  an empty frame (length 0) from the parent: exit.
Real stdout is kept for frames; file descriptor 1 is pointed at stderr before vllm is
imported, so nothing vLLM (or a process it spawns) prints can corrupt the protocol.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import json
import os
import struct
import sys
import threading
import time
import traceback

import numpy as np

HEADER = struct.Struct("<Q")
PROFILE_ENV = "FUSEDATA_VLLM_PROFILE_DIR"  # set: every vLLM process writes its phase timers there

# The phases of one engine step, as (module, class, method): each is timed where it runs, which
# is the engine-core and model-worker processes when vLLM runs them apart (multiprocessing on).
PHASES = {
    "schedule": ("vllm.v1.core.sched.scheduler", "Scheduler", ("schedule", "update_from_output")),
    "engine_step": ("vllm.v1.engine.core", "EngineCore", ("step",)),
    "model_runner": ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", ("execute_model", "sample_tokens")),
    "forward": ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", ("_model_forward",)),
    "prompt_logprobs": ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", ("_get_prompt_logprobs_dict",)),
    "output_processing": ("vllm.v1.engine.output_processor", "OutputProcessor", ("process_outputs",)),
}


class PhaseTimers:
    """Wall seconds and calls per phase in this process, written to PROFILE_ENV/<pid>.json
    after every timed call (a few per engine step), so the frontend can add up all processes."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, f"{os.getpid()}.json")
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.facts: dict[str, object] = {"pid": os.getpid(), "argv0": sys.argv[0] if sys.argv else ""}
        self._lock = threading.Lock()

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(obj, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(obj, *args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
                    self.calls[phase] = self.calls.get(phase, 0) + 1
                if phase == "forward" and "model_worker" not in self.facts:
                    try:
                        self.facts["model_worker"] = model_worker_facts(obj)
                    except Exception as e:  # a report, never a reason to fail the step
                        self.facts["model_worker"] = {"error": repr(e)}
                self.dump()
        return timed

    def install(self) -> None:
        for phase, (module, cls, methods) in PHASES.items():
            klass = getattr(importlib.import_module(module), cls)
            for name in methods:
                setattr(klass, name, self.wrap(phase, getattr(klass, name)))
        self.dump()

    def dump(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seconds": self.seconds, "calls": self.calls, "facts": self.facts,
                       "cpu_s": time.process_time()}, f)
        os.replace(tmp, self.path)


def read_timers(folder: str) -> dict:
    """Every process's timers: {"seconds": {phase: s}, "calls": ..., "facts": [per process]}."""
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    facts = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                one = json.load(f)
        except (OSError, ValueError):
            continue
        for k, v in one["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
        for k, v in one["calls"].items():
            calls[k] = calls.get(k, 0) + v
        facts.append({**one["facts"], "cpu_s": one["cpu_s"], "phases": sorted(one["seconds"])})
    return {"seconds": seconds, "calls": calls, "facts": facts}


def thread_cores() -> list[str]:
    """The cores each thread of this process may run on (Cpus_allowed_list), e.g. ['0', '1', '0-1']."""
    out = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("Cpus_allowed_list"))
            out.append(line.split(":", 1)[1].strip())
        except (OSError, StopIteration):
            pass
    return out


def model_worker_facts(runner) -> dict:
    """What the process running the model uses: torch threads, the cores its threads are bound
    to, OpenMP settings, the kernels vLLM picked (attention backend, GEMM) and the KV cache."""
    import torch

    facts: dict[str, object] = {
        "torch_threads": torch.get_num_threads(),
        "thread_cores": thread_cores(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_tile": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "OMP_PLACES", "OMP_PROC_BIND",
                                               "KMP_AFFINITY", "LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND")
                if os.environ.get(k)},
    }
    try:
        facts["attention_backend"] = sorted({g.backend.get_name() for gs in runner.attn_groups for g in gs})
    except Exception as e:  # internal layout of this vLLM version
        facts["attention_backend"] = f"unknown ({type(e).__name__})"
    gemm = set()
    for module in runner.model.modules():
        fn = getattr(module, "cpu_linear", None)
        if fn is not None:
            code = getattr(fn, "__code__", None)
            names = set(code.co_names) if code else {getattr(fn, "__name__", "?")}
            gemm |= names & {"onednn_mm", "weight_packed_linear_cpu", "zentorch_linear_unary", "linear"}
    facts["gemm"] = sorted(gemm)
    try:
        cache = runner.cache_config
        facts["kv_cache"] = {"block_size": cache.block_size, "num_blocks": cache.num_gpu_blocks,
                             "bytes": cache.kv_cache_memory_bytes}
    except Exception as e:
        facts["kv_cache"] = f"unknown ({type(e).__name__})"
    return facts


if os.environ.get(PROFILE_ENV) and __name__ == "__mp_main__":
    # a process vLLM spawned re-imports this file as __mp_main__: time its phases too
    PhaseTimers(os.environ[PROFILE_ENV]).install()


def read_frame(f) -> bytes | None:
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    data = f.read(n)
    if len(data) < n:
        return None
    return data


def write_frame(f, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    f.write(HEADER.pack(len(data)))
    f.write(data)
    f.flush()


def fast_positions(prompt_logprobs, ids: np.ndarray, k: int):
    """The usual FlatLogprobs layout, vectorised: each position holds k + 1 entries, the actual
    token first, then ranks 1..k in order. None when the layout is anything else."""
    if not hasattr(prompt_logprobs, "start_indices") or len(prompt_logprobs) != len(ids):
        return None
    n = len(ids)
    starts = np.asarray(prompt_logprobs.start_indices[1:], np.int64)
    ends = np.asarray(prompt_logprobs.end_indices[1:], np.int64)
    if n < 2 or not np.all(ends - starts == k + 1) or not np.all(np.diff(starts) == k + 1):
        return None
    s0 = int(starts[0])
    tok = np.asarray(prompt_logprobs.token_ids[s0:], np.int64).reshape(n - 1, k + 1)
    lp = np.asarray(prompt_logprobs.logprobs[s0:], np.float64).reshape(n - 1, k + 1)
    rank = prompt_logprobs.ranks[s0:]
    if None in rank:
        return None
    rank = np.asarray(rank, np.int64).reshape(n - 1, k + 1)
    if not np.all(rank[:, 1:] == np.arange(1, k + 1)) or not np.array_equal(tok[:, 0], ids[1:]):
        return None
    return tok[:, 1:].astype(np.int32), lp[:, 1:].astype(np.float32), lp[:, 0].astype(np.float32)


def positions(prompt_logprobs, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids/log-probs [n-1, k] (rank order) and the gold log-prob [n-1] of one prompt.

    prompt_logprobs[i] is the distribution of token i given the tokens before it (entry 0 is
    None), so position t, which predicts token t+1, is prompt_logprobs[t + 1]. Every entry holds
    the k best tokens (ranks 1..k) and the actual token (with its own rank)."""
    n = len(ids)
    fast = fast_positions(prompt_logprobs, ids, k)
    if fast is not None:
        return fast
    out_ids = np.empty((n - 1, k), np.int32)
    out_lp = np.empty((n - 1, k), np.float32)
    gold = np.empty(n - 1, np.float32)
    flat = hasattr(prompt_logprobs, "start_indices")
    if flat:  # FlatLogprobs: primitive lists, no dict per position
        tok = np.asarray(prompt_logprobs.token_ids, np.int64)
        lp = np.asarray(prompt_logprobs.logprobs, np.float64)
        rank = np.asarray([-1 if r is None else r for r in prompt_logprobs.ranks], np.int64)
        starts, ends = prompt_logprobs.start_indices, prompt_logprobs.end_indices
    for t in range(n - 1):
        target = int(ids[t + 1])
        if flat:
            s, e = starts[t + 1], ends[t + 1]
            pt, pl, pr = tok[s:e], lp[s:e], rank[s:e]
        else:
            d = prompt_logprobs[t + 1]
            pt = np.fromiter(d.keys(), np.int64, len(d))
            pl = np.fromiter((v.logprob for v in d.values()), np.float64, len(d))
            pr = np.fromiter((-1 if v.rank is None else v.rank for v in d.values()), np.int64, len(d))
        hit = np.flatnonzero(pt == target)
        if len(hit) == 0:
            raise RuntimeError(f"position {t}: the actual token {target} is missing from prompt_logprobs")
        gold[t] = pl[hit[0]]
        # the k ranked entries, in rank order; the actual token may appear twice (its own entry
        # plus its top-k entry): keep each token once
        order = np.lexsort((-pl, pr))
        order = order[(pr[order] >= 1) & (pr[order] <= k)]
        _, first = np.unique(pt[order], return_index=True)
        order = order[np.sort(first)]
        if len(order) < k:
            raise RuntimeError(f"position {t}: prompt_logprobs holds {len(order)} ranked entries, expected {k}")
        out_ids[t] = pt[order[:k]]
        out_lp[t] = pl[order[:k]]
    return out_ids, out_lp, gold


def generate(llm, sampling_params, req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Continuations of each prompt: greedy at temperature 0, else seeded sampling (seed + i
    for prompt i, so a batch gives the same text whatever else is in it); `stop` strings end one."""
    lengths = req["lengths"].astype(np.int64)
    flat_ids = req["ids"].astype(np.int32)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    temperature, seed = float(req["temperature"]), int(req["seed"])
    stop = [str(x) for x in req["stop"]] if "stop" in req else []
    params = [
        sampling_params(max_tokens=int(req["max_tokens"]), temperature=temperature,
                        top_p=0.95 if temperature > 0 else 1.0, seed=seed + i if temperature > 0 else None,
                        stop=stop or None, detokenize=bool(stop))
        for i in range(len(lengths))
    ]
    prompts = [{"prompt_token_ids": flat_ids[bounds[i]: bounds[i + 1]].tolist()} for i in range(len(lengths))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    new = [np.asarray(o.outputs[0].token_ids, np.int32) for o in outs]
    return {"lengths": np.asarray([len(n) for n in new], np.int64),
            "ids": np.concatenate(new) if new else np.zeros(0, np.int32)}


CPU_ENGINE_STEP_TOKENS = 2048


def batch_tokens(requested: int) -> dict[str, int]:
    """The engine's token budget per step: as requested, else 2,048 on CPU and vLLM's own default
    elsewhere. On CPU every prompt position's log-softmax over the vocabulary is materialised, so
    vLLM's CPU default of 4,096 is memory-bound and slower (benchmarks/extract.py --vllm)."""
    if requested > 0:
        return {"max_num_batched_tokens": requested}
    from vllm.platforms import current_platform

    return {"max_num_batched_tokens": CPU_ENGINE_STEP_TOKENS} if current_platform.is_cpu() else {}


def serve(args: argparse.Namespace, fin, fout) -> None:
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    if args.layout == "one-process" and current_platform.is_cpu():
        # engine core and model runner in this process: no engine-core process polling for the
        # model's result through every step on cores the model needs (fusedata/vllm_backend.py)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    profile = os.environ.get(PROFILE_ENV)
    if profile:
        PhaseTimers(profile).install()
    llm = LLM(
        model=args.model,
        max_logprobs=args.max_logprobs,
        enable_prefix_caching=False,  # every position's distribution must be computed, none reused
        dtype=args.dtype,
        enforce_eager=True,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len,
        seed=0,
        trust_remote_code=args.trust_remote_code,  # False unless fusedata's opt-in was given
        **batch_tokens(args.max_num_batched_tokens),
    )
    facts = {"vllm": vllm.__version__, "torch": torch.__version__,
             "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0",
             "frontend_thread_cores": thread_cores(), "frontend_torch_threads": torch.get_num_threads()}
    write_frame(fout, {"ready": np.array(vllm.__version__), "facts": np.array(json.dumps(facts))})
    while True:
        data = read_frame(fin)
        if not data:
            return
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as req:
                if "op" in req.files and str(req["op"]) == "generate":
                    write_frame(fout, generate(llm, SamplingParams, {key: req[key] for key in req.files}))
                    continue
                k = int(req["k"])
                lengths = req["lengths"].astype(np.int64)
                flat_ids = req["ids"].astype(np.int32)
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            seqs = [flat_ids[bounds[i] : bounds[i + 1]] for i in range(len(lengths))]
            params = SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs], params, use_tqdm=False)
            t1 = time.perf_counter()
            parts = [positions(o.prompt_logprobs, s, k) for o, s in zip(outs, seqs, strict=True)]
            reply = {
                "ids": np.concatenate([p[0] for p in parts]).reshape(-1, k),
                "logprobs": np.concatenate([p[1] for p in parts]).reshape(-1, k),
                "gold": np.concatenate([p[2] for p in parts]),
            }
            if profile:  # cumulative timers of every vLLM process, and this call's generate and parse
                timers = read_timers(profile)
                timers["call"] = {"generate_s": t1 - t0, "parse_s": time.perf_counter() - t1}
                reply["profile"] = np.array(json.dumps(timers))
            write_frame(fout, reply)
        except Exception:
            write_frame(fout, {"error": np.array(traceback.format_exc())})


def main() -> None:
    p = argparse.ArgumentParser(description="fusedata's vLLM extract worker (speaks frames on stdin/stdout)")
    p.add_argument("--model", required=True, help="safetensors model folder")
    p.add_argument("--max-logprobs", type=int, required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--kv-cache-bytes", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-batched-tokens", type=int, default=0, help="0: 2048 on CPU, else vLLM's default")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model folder's own Python code run")
    p.add_argument("--cores", default="", help="comma-separated cores this process keeps to (before torch starts)")
    p.add_argument("--layout", choices=("one-process", "vllm"), default="one-process",
                   help="on CPU, run vLLM's engine core and model runner here, or in vLLM's own processes")
    args = p.parse_args()
    if args.cores and hasattr(os, "sched_setaffinity"):
        # the process, not each thread: OpenMP's threads may move between these cores
        os.sched_setaffinity(0, [int(c) for c in args.cores.split(",")])
    # keep the real stdout for frames; everything else written to fd 1 goes to stderr
    fout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(args, sys.stdin.buffer, fout)


if __name__ == "__main__":  # vLLM spawns processes that re-import this file: nothing may run on import
    main()
