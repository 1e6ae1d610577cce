"""Ray job entry point: run a whole pipeline file on the cluster this job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.run_pipeline pipelines/demo.toml [--workers 4] [--plan]

Inside a Ray job the driver already runs on the cluster (RAY_ADDRESS is set by `ray job`), so
the RayExecutor connects to it instead of starting an embedded Ray. Paths in the pipeline file
are relative to the job's working directory, which is a temporary copy on the head node:
give `[pipeline] output` (and the corpus) as absolute paths on storage every node sees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run (or plan) the pipeline; exit status 2 with one line on bad input."""
    from fusedata.errors import UsageError
    from fusedata.pipeline import load_pipeline, plan_pipeline, render_plan, run_pipeline
    from jobs.ray_executor import RayExecutor

    parser = argparse.ArgumentParser(prog="python -m jobs.run_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="pipeline TOML file")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or the file's)")
    parser.add_argument("--workers", type=int, default=None, help="actors per stage (default: the file's)")
    parser.add_argument("--no-verify", action="store_true", help="skip checksum verification of finished shards")
    parser.add_argument("--plan", action="store_true", help="print the plan instead of running")
    args = parser.parse_args(argv)

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    try:
        pipe = load_pipeline(args.pipeline, log)
        if args.plan:
            print(render_plan(plan_pipeline(pipe)))
            return 0
        address = args.address or os.environ.get("RAY_ADDRESS") or pipe.address
        executor = RayExecutor(address=address, workers=args.workers or pipe.workers)
        results = run_pipeline(pipe, executor, log, verify=False if args.no_verify else None)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
