"""`fusedata explore`: Bohdi synthetic SFT data by domain-tree exploration (registered by cli/main.py)."""

from __future__ import annotations

import os

import click

from fusedata.explore.bandit import BanditConfig
from fusedata.explore.prompts import STYLES


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated options and comma-separated lists both work: --sources a,b or --sources a --sources b."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


@click.command("explore")
@click.option("--target", required=True, help="The model to improve (spec as for extract).")
@click.option("--sources", required=True, multiple=True, help="Source models (repeatable or comma-separated).")
@click.option("--budget", required=True, type=int, help="SFT pairs to keep (raise it later to explore further).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Explore folder (resumed if present).")
@click.option("--judge", default="", help="Model that scores the answers [default: the first source].")
@click.option("--depth", default=3, show_default=True, help="Levels below the root; leaves are harvested.")
@click.option("--seed-domain", "seed_domains", multiple=True, help="Start the tree with these domains (repeatable).")
@click.option("--styles", default=",".join(STYLES), show_default=True, help="Question styles the leader draws from.")
@click.option("--batch", default=8, show_default=True, help="Paths explored per round (one batched model call each).")
@click.option("--answer-tokens", default=96, show_default=True, help="Longest answer, in tokens.")
@click.option("--question-tokens", default=48, show_default=True)
@click.option("--rejudge", default=0.25, show_default=True, help="Share of judgements repeated in reversed order.")
@click.option("--window", default=BanditConfig.window, show_default=True, help="Rewards kept per node for rebirth.")
@click.option("--significance", default=BanditConfig.significance, show_default=True, help="Of the rebirth test.")
@click.option("--max-children", default=BanditConfig.max_children, show_default=True)
@click.option("--max-sprout-failures", default=BanditConfig.max_sprout_failures, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="Generation with transformers, or with vLLM in its own environment (make vllm).")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="ray: one actor per model (embedded Ray or --address); local: every model in this process.")
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS"), help="Ray cluster address (or RAY_ADDRESS).")
@click.option("--overwrite", is_flag=True, help="Discard another run's output in --output.")
def explore(target, sources, budget, output, judge, depth, seed_domains, styles, batch, answer_tokens,
            question_tokens, rejudge, window, significance, max_children, max_sprout_failures, seed, device,
            backend, executor, address, overwrite):
    """Grow a domain tree with the sources and harvest SFT pairs where the target is weakest (Bohdi).

    Writes OUTPUT/sft (pairs for `fusedata train`), OUTPUT/docs (documents for `fusedata extract`),
    OUTPUT/history and OUTPUT/tree.json; `fusedata inspect OUTPUT --plot DIR` draws the tree."""
    from fusedata.explore.run import ExploreConfig
    from fusedata.explore.run import explore as run_explore

    cfg = ExploreConfig(
        target=target, sources=_split(sources), output=output, budget=budget, judge=judge, depth=depth,
        seed=seed, seed_domains=_split(seed_domains), styles=_split((styles,)), batch=batch,
        answer_tokens=answer_tokens, question_tokens=question_tokens, rejudge=rejudge, device=device, backend=backend,
        bandit=BanditConfig(window=window, significance=significance, max_children=max_children,
                            max_sprout_failures=max_sprout_failures),
        overwrite=overwrite,
    )
    pool = None
    if executor == "ray" or address:
        from fusedata.explore.run import validate
        from jobs.explore_ray import RayPool

        validate(cfg)
        pool = RayPool(list(dict.fromkeys([*cfg.answerers, cfg.judge_model])), address, device, backend=backend)
    try:
        result = run_explore(cfg, pool, log=lambda m: click.echo(m, err=True))
    finally:
        if pool is not None:
            pool.close()
    consistency = result.get("judge_consistency")
    click.echo(f"{output}: {result['pairs']} pairs in {result['rounds']} rounds; a source beat the target in "
               f"{result.get('source_won', 0):.0%}; judge consistency "
               f"{'n/a' if consistency is None else f'{consistency:.0%}'} of {result.get('rejudged', 0)} re-judged",
               err=True)
