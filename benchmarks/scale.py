"""Driver memory, time to first shard and tokens/s of `extract` on local Ray as the corpus grows.

For each corpus size (small JSONL documents, one file) an extract with a tiny random Llama (built
in a temporary folder as tests/tiny_models.py does) runs on an embedded local Ray in a child process
that is the driver: its peak RSS (VmHWM), the seconds from its start to the first shard file, and the
tokens/s of the shards written. With --before DIR (a checkout of the code before #19, e.g.
`git archive 3713bb5 | tar -x -C DIR`) the same runs are made with that code, side by side.
A point may stop --limit-s after its first shard: it then reports the shards written so far (partial).
The driver's time is split into its steps: Ray started, the shard plan made, the Ray dataset of
task descriptors built (`from_items`); the rest of the time to the first shard is the actors starting,
loading the model and computing that shard.

    .venv/bin/python benchmarks/scale.py [--docs 2000 20000 100000 400000] [--before DIR]
        [--output URI] [--storage local s3] [--limit-s 240] [--workers 1] [--docs-per-shard 256]

`--storage s3` writes every point's dataset to a real S3 server on loopback instead: moto's server
mode, started the way the tests start it (tests/s3.py `start_server`: a free 127.0.0.1 port, one
bucket, from .venv-s3, which `make s3` builds, or $FUSEDATA_MOTO_SERVER), the drivers and workers
pointed at it through AWS_ENDPOINT_URL and test credentials; the server is stopped at the end.

Prints a table, writes benchmarks/results/scale.json and a plot of driver RSS against documents
(benchmarks/results/scale.png). --output (a folder or a URI such as s3://bucket/prefix) is where the
local-storage points write their datasets: every point writes <output>/<code>-<docs>.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the", "river", "stone", "light", "market", "winter", "code", "value", "café", "north", "quiet", "paper")


def write_corpus(path: Path, n: int, seed: int = 0) -> int:
    """n small documents (~30 words) as JSONL; returns the file's size."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 45)))},
                               ensure_ascii=False) + "\n")
    return path.stat().st_size


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _shards(output: str) -> list[str]:
    import pyarrow.fs as pafs

    from fusedata.storage import resolve

    fs, path = resolve(output)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if Path(i.path).name.startswith("shard-") and i.path.endswith(".parquet"))


def driver_child(args: argparse.Namespace) -> None:
    """--driver-only: just what the driver does with the corpus before any worker starts (no model,
    no Ray), with whichever code is on PYTHONPATH: after #19 the shard plan and the pickled task
    descriptors a Ray dataset is built from; before it, reading the corpus, hashing it, slicing it
    into shards and turning them into the Python rows it gave `ray.data.from_items`."""
    t0 = time.perf_counter()
    base = _vm_hwm_mb()
    import pickle

    import fusedata.corpus as corpus

    if hasattr(corpus, "plan_corpus"):
        plan = corpus.plan_corpus([args.corpus], args.docs_per_shard)
        plan.identity()
        items = [pickle.dumps(p) for p in plan.shards]
    else:
        docs, _ = corpus.read_corpus([args.corpus])
        corpus.corpus_hash(docs)
        items = [t.to_pylist() for t in corpus.shard_docs(docs, args.docs_per_shard)]
    print(json.dumps({"docs": args.n, "driver_peak_rss_mb": round(_vm_hwm_mb(), 1),
                      "rss_growth_mb": round(_vm_hwm_mb() - base, 1), "tasks": len(items),
                      "seconds": round(time.perf_counter() - t0, 2)}), flush=True)


def child(args: argparse.Namespace) -> None:
    """One point, in this process as the Ray driver; prints one JSON line."""
    t0 = time.perf_counter()
    from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract

    if args.executor == "ray":
        from jobs.ray_executor import RayExecutor, init_ray

        init_ray(None, log=lambda m: None)
        executor = RayExecutor(workers=args.workers)
    else:  # the driver is its own worker: its memory then includes the model and one shard at a time
        from fusedata.stages.base import LocalExecutor

        executor = LocalExecutor()
    t_ray = time.perf_counter() - t0
    steps = _time_driver_steps(t0)
    first: list[float] = []
    done = threading.Event()
    poll_s = 0.05 if "://" not in args.out else 0.25  # a listing is a request on object storage

    def watch() -> None:
        while not done.is_set() and not first:
            if _shards(args.out):
                first.append(time.perf_counter() - t0)
                timer.start()  # --limit-s of work after the first shard
            time.sleep(poll_s)

    def report(complete: bool) -> None:
        done.set()
        rss = _vm_hwm_mb()  # before counting tokens, which reads the shards
        import pyarrow.parquet as pq

        from fusedata.storage import resolve

        fs, _ = resolve(args.out)
        files = _shards(args.out)
        tokens = sum(len(pq.read_table(p, columns=["input_ids"], filesystem=fs).column("input_ids").combine_chunks()
                         .flatten()) for p in files)
        elapsed = time.perf_counter() - t0
        work = elapsed - (first[0] if first else elapsed)
        print(json.dumps({
            "docs": args.n, "driver_peak_rss_mb": round(rss, 1), "ray_start_s": round(t_ray, 2),
            **{k: round(v, 2) for k, v in steps.items()},
            "first_shard_s": round(first[0], 2) if first else None, "elapsed_s": round(elapsed, 1),
            "shards_written": len(files), "tokens": tokens,
            "tokens_per_s": round(tokens / max(elapsed - t_ray, 1e-9), 1),
            "tokens_per_s_after_first_shard": round(tokens / work, 1) if work > 0 else None,
            "complete": complete,
        }), flush=True)

    def stop() -> None:
        report(False)
        os._exit(0)  # the Ray reaper (jobs/embedded_ray.py) stops this driver's Ray processes

    timer = threading.Timer(args.limit_s, stop)
    timer.daemon = True
    threading.Thread(target=watch, daemon=True).start()
    config = ExtractConfig(model=args.model, top_k=5, max_length=128, batch_tokens=1024, threads=1)
    run_extract(ExtractJob([args.corpus], args.out, config, docs_per_shard=args.docs_per_shard, quiet=True,
                           log=lambda m: None), executor)
    if timer.is_alive():
        timer.cancel()
    report(True)
    os._exit(0)


def _time_driver_steps(t0: float) -> dict[str, float]:
    """Seconds from the driver's start to the end of its steps (filled in as they happen): the shard
    plan (`plan_s`) and the Ray dataset of task descriptors (`dataset_s`), by wrapping the two calls."""
    import fusedata.stages.extract as extract

    steps: dict[str, float] = {}

    def timed(name: str, call):
        def wrapper(*a, **kw):
            result = call(*a, **kw)
            steps.setdefault(name, time.perf_counter() - t0)
            return result
        return wrapper

    extract.plan_corpus = timed("plan_s", extract.plan_corpus)
    try:
        import jobs.ray_executor as ray_executor
    except ImportError:  # --before: code without jobs/, or without Ray
        return steps
    if hasattr(ray_executor, "task_dataset"):
        ray_executor.task_dataset = timed("dataset_s", ray_executor.task_dataset)
    return steps


def _start_s3():
    """A moto S3 server on loopback with one bucket, as the tests start it (tests/s3.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3 import start_server

    try:
        return start_server()
    except BaseException as exc:  # pytest's skip/fail outcomes when no moto server can be found or started
        raise SystemExit(f"--storage s3: {exc} (`make s3` builds .venv-s3)") from None


def _point(code: Path, model: str, corpus: str, n: int, out: str, args: argparse.Namespace,
           extra_env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1", **(extra_env or {}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--corpus", corpus,
           "--n", str(n), "--out", out, "--limit-s", str(args.limit_s), "--workers", str(args.workers),
           "--docs-per-shard", str(args.docs_per_shard), "--executor", args.executor]
    cmd += ["--driver-only"] if args.driver_only else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code,
                          timeout=args.limit_s + 600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{code} at {n} docs failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def _plot(rows: list[dict], path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from fusedata.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for code, storage in sorted({(r["code"], r.get("storage", "local")) for r in rows}):
        pts = sorted((r["docs"], r["driver_peak_rss_mb"]) for r in rows
                     if r["code"] == code and r.get("storage", "local") == storage)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{code}, output {storage}")
    ax.set_xscale("log")
    ax.set_xlabel("documents")
    ax.set_ylabel("driver peak RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title("extract on local Ray: driver memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[2000, 20000, 100000, 400000])
    ap.add_argument("--before", type=Path, help="a checkout of the code before #19, run side by side")
    ap.add_argument("--output", default="", help="folder or URI for the datasets (default: a temporary folder)")
    ap.add_argument("--storage", nargs="+", choices=("local", "s3"), default=["local"],
                    help="local: --output; s3: a moto S3 server on loopback started here (tests/s3.py)")
    ap.add_argument("--limit-s", type=float, default=240.0, help="stop a point this many seconds after its first shard (partial)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--docs-per-shard", type=int, default=256)
    ap.add_argument("--executor", choices=("ray", "local"), default="ray",
                    help="ray: an embedded local Ray (the driver only plans); local: the driver computes too")
    ap.add_argument("--driver-only", action="store_true",
                    help="measure only the driver's corpus handling before any worker starts (no model, no Ray)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="a model folder (default: a tiny random Llama built in a temporary folder)")
    for name in ("--corpus", "--out"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return driver_child(args) if args.driver_only else child(args)

    rows = []
    s3 = _start_s3() if "s3" in args.storage else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or ""
            if not model and not args.driver_only:
                sys.path.insert(0, str(ROOT / "tests"))
                import tiny_models

                model = str(tiny_models.build_tiny_llama(Path(tmp) / "tiny-llama"))
            places = {"local": (args.output or str(Path(tmp) / "out"), {}),
                      "s3": (f"s3://{s3.bucket}/scale", s3.env) if s3 else ("", {})}
            codes = [("after", ROOT)] + ([("before", args.before.resolve())] if args.before else [])
            for n in args.docs:
                corpus = Path(tmp) / f"corpus-{n}.jsonl"
                size = write_corpus(corpus, n)
                for storage in args.storage:
                    output, env = places[storage]
                    for label, code in codes:
                        load_before = os.getloadavg()[0]
                        r = _point(code, model, str(corpus), n, f"{output.rstrip('/')}/{label}-{n}", args, env)
                        r.update(code=label, storage=storage, corpus_mb=round(size / 2**20, 1),
                                 load_before=load_before, load=os.getloadavg()[0])
                        rows.append(r)
                        print(json.dumps(r), flush=True)
                corpus.unlink()
    finally:
        if s3:
            from s3 import stop_server

            stop_server(s3)
    print()
    name = "scale-driver" if args.driver_only else "scale"
    if args.driver_only:
        print("| code | docs | corpus MB | driver peak RSS MB | growth MB | tasks | seconds | load |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['code']} | {r['docs']:,} | {r['corpus_mb']} | {r['driver_peak_rss_mb']:.0f} | "
                  f"{r['rss_growth_mb']:.0f} | {r['tasks']:,} | {r['seconds']} | {r['load']:.1f} |")
    else:
        print(f"executor: {args.executor}, {args.workers} worker(s), {args.docs_per_shard} docs per shard")
        print("| storage | code | docs | corpus MB | driver peak RSS MB | ray s | plan s | dataset s | first shard s "
              "| shards | tokens/s after first | run | load |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        def cell(r: dict, key: str) -> str:
            return "-" if r.get(key) is None else f"{r[key]}"

        for r in rows:
            rate = r["tokens_per_s_after_first_shard"]
            print(f"| {r['storage']} | {r['code']} | {r['docs']:,} | {r['corpus_mb']} | {r['driver_peak_rss_mb']:.0f} | "
                  f"{cell(r, 'ray_start_s')} | {cell(r, 'plan_s')} | {cell(r, 'dataset_s')} | {cell(r, 'first_shard_s')} | "
                  f"{r['shards_written']} | {f'{rate:,.0f}' if rate else '-'} | "
                  f"{'complete' if r['complete'] else 'partial'} {r['elapsed_s']} s | "
                  f"{r['load_before']:.1f}-{r['load']:.1f} |")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("child", "model", "corpus", "out", "n")}
    (results / f"{name}.json").write_text(json.dumps({"settings": settings, "points": rows}, indent=2) + "\n")
    _plot(rows, results / f"{name}.png")
    print(f"\nwrote {results / f'{name}.json'} and {results / f'{name}.png'}")


if __name__ == "__main__":
    main()
