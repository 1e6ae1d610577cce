"""`fusedata run` and `fusedata plan`: one pipeline file instead of a sequence of commands.

Registered by cli/main.py. Like every command here: parse options, call one library function.
"""

from __future__ import annotations

import json

import click


def pipeline_executor(pipe, executor: str | None, address: str | None, workers: int | None):
    """The executor of a pipeline run: command-line options override the file's [pipeline] keys."""
    kind = executor or pipe.executor
    address = address or pipe.address
    workers = workers or pipe.workers
    if kind == "local" and not address:
        from fusedata.stages.base import LocalExecutor

        return LocalExecutor()
    from jobs.ray_executor import RayExecutor

    return RayExecutor(address=address, workers=workers)


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--executor", type=click.Choice(["ray", "local"]), default=None,
              help="Override [pipeline] executor (ray: embedded local Ray or --address; local: one process).")
@click.option("--address", default=None, help="Ray cluster address (overrides [pipeline] address; else RAY_ADDRESS).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Ray actors per stage (overrides [pipeline] workers).")
@click.option("--no-verify", is_flag=True, help="Do not check finished shards against their manifest checksums.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary of the steps at the end.")
def run(pipeline, executor, address, workers, no_verify, as_json):
    """Run every stage of a pipeline file in order; finished stages are skipped, damaged shards recomputed."""
    from dataclasses import asdict

    from fusedata.pipeline import load_pipeline, run_pipeline

    def log(m: str) -> None:
        click.echo(m, err=True)

    pipe = load_pipeline(pipeline, log)
    results = run_pipeline(pipe, pipeline_executor(pipe, executor, address, workers), log,
                           verify=False if no_verify else None)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            click.echo(f"{r.step:<22} {r.status:<9} {r.seconds:8.1f} s  {r.output}{'  ' + r.detail if r.detail else ''}")


def _scale_options(f):
    """The what-if options, one per ScaleConfig field (its default shown, its check done there)."""
    from dataclasses import fields

    from fusedata.pipeline.plan import ScaleConfig

    for fld in reversed(fields(ScaleConfig)):
        name = "--" + fld.name.replace("_", "-")
        if fld.type == "bool":
            f = click.option(f"{name}/--no-{fld.name}", default=None, help=f"What-if (default {fld.default}).")(f)
        else:
            kind = {"int": int, "float": float}.get(fld.type, str)
            f = click.option(name, type=kind, default=None, help=f"What-if (default {fld.default:g})."
                             if kind is not str else f"What-if (default {fld.default}).")(f)
    return f


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False), required=False)
@click.option("--sample-docs", default=64, show_default=True, help="Documents tokenised to estimate token counts.")
@click.option("--measure", is_flag=True, help="Time a real forward pass on the sample (loads each model).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable plan.")
@_scale_options
def plan(pipeline, sample_docs, measure, as_json, **what_if):
    """Estimate tokens, disk and time per stage of a pipeline file, and warn if the disk is too small.
    Without a file, a what-if run (by default MiniPile: 1M documents, 1.8B tokens, three 7B models,
    8 GPUs): tokens, disk per model, hours per stage and the stage that bounds the run."""
    given = {k: v for k, v in what_if.items() if v is not None}
    if pipeline is None:
        from fusedata.pipeline.plan import ScaleConfig, plan_scale, render_scale

        result = plan_scale(ScaleConfig(**given))
        click.echo(json.dumps(result, indent=2) if as_json else render_scale(result))
        return
    if given:
        raise click.UsageError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: what-if options "
                               "plan a run without a pipeline file; leave out PIPELINE or these options")
    from fusedata.pipeline import plan_pipeline, render_plan

    result = plan_pipeline(pipeline, sample_docs, measure)
    click.echo(json.dumps(result, indent=2) if as_json else render_plan(result))
