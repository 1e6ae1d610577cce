"""`fusedata explore`: grow the domain tree and harvest SFT pairs until the budget is spent.

A round: draw `batch` Thompson descents from the current posteriors; a descent that draws an
`unk` sprouts (every source proposes names for the parent, a vote picks one) and goes on into
the new child; the descents that reach a leaf harvest (a randomly drawn leader source writes a
question in a randomly drawn style, the target and every source answer, the judge scores the
answers shown in a random order, recorded; a share is judged again in reverse order and the
scores averaged over both orders; reward 1 if a source beat the target); posteriors are updated
along each path, stale ones reborn. Each model call of a round is batched over all its prompts.

Checkpointing: a round writes its shards (named by round), then tree.json, then state.json
last. A killed run resumes at the first round state.json does not record, with the RNG state
saved there, so it makes the same choices again. Raising --budget continues a finished run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusedata.dataset import DatasetDir, atomic_write_text, shard_name
from fusedata.errors import UsageError
from fusedata.explore.bandit import BanditConfig, choose_child, descend, record_sprout, update_path
from fusedata.explore.names import parse_proposals, vote
from fusedata.explore.pool import LocalPool, ModelPool
from fusedata.explore.prompts import STYLES, judge_prompt, names_prompt, question_prompt, usable_question
from fusedata.explore.report import SFT_COLUMNS, pair_stats
from fusedata.explore.tree import Tree
from fusedata.writer_lock import WriterLock
from schemas.explore import DOCS_SCHEMA, HISTORY_SCHEMA, SFT_SCHEMA
from schemas.manifest import MANIFEST_NAME

STATE_NAME = "state.json"
TREE_NAME = "tree.json"
MAX_IDLE_ROUNDS = 20  # rounds in a row that neither sprout nor harvest anything: give up


@dataclass(frozen=True)
class ExploreConfig:
    target: str
    sources: tuple[str, ...]
    output: str
    budget: int  # SFT pairs to keep
    judge: str = ""  # "" = the first source
    depth: int = 3
    seed: int = 0
    seed_domains: tuple[str, ...] = ()
    styles: tuple[str, ...] = tuple(STYLES)
    batch: int = 8  # descents per round
    name_tokens: int = 24
    question_tokens: int = 48
    answer_tokens: int = 96
    rejudge: float = 0.25  # share of judgements repeated with the answers in reverse order
    bandit: BanditConfig = field(default_factory=BanditConfig)
    device: str = "cpu"
    backend: str = "hf"  # generation: "hf" (transformers) or "vllm"
    overwrite: bool = False

    @property
    def judge_model(self) -> str:
        return self.judge or self.sources[0]

    @property
    def answerers(self) -> list[str]:
        return [self.target, *self.sources]


def run_identity(cfg: ExploreConfig) -> dict[str, Any]:
    """What must match to resume: everything that shapes the choices, not the budget (raise it
    to explore further), the output path or the device."""
    d = asdict(cfg)
    for key in ("output", "budget", "device", "backend", "overwrite", "batch"):
        d.pop(key)
    d["judge"] = cfg.judge_model
    d["stage"] = "explore"
    return json.loads(json.dumps(d))  # tuples → lists, as read back from _run.json


def validate(cfg: ExploreConfig) -> None:
    if cfg.budget < 1:
        raise UsageError("--budget must be at least 1")
    if not cfg.sources:
        raise UsageError("give at least one --sources model")
    if cfg.target in cfg.sources:
        raise UsageError(f"{cfg.target!r} is the target; it cannot also be a source")
    if len(set(cfg.sources)) != len(cfg.sources):
        raise UsageError("a source is listed twice")
    if len(cfg.answerers) > 8:
        raise UsageError("at most 7 sources (the judge labels answers A to H)")
    if not 1 <= cfg.depth <= 5:
        raise UsageError("--depth must be between 1 and 5")
    unknown = [s for s in cfg.styles if s not in STYLES]
    if unknown or not cfg.styles:
        raise UsageError(f"unknown question style {unknown[0] if unknown else ''!r}; choose from {', '.join(STYLES)}")
    if cfg.backend not in ("hf", "vllm"):
        raise UsageError(f"unknown backend {cfg.backend!r}: use hf or vllm")
    if not 0.0 <= cfg.rejudge <= 1.0:
        raise UsageError("--rejudge must be between 0 and 1")


@dataclass
class State:
    round: int = 0
    harvested: int = 0
    events: int = 0
    idle_rounds: int = 0
    sft_shards: list[str] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    tree: dict[str, Any] = field(default_factory=dict)


def _load_state(out: Path, cfg: ExploreConfig) -> tuple[State, Tree, np.random.Generator]:
    rng = np.random.default_rng(cfg.seed)
    path = out / STATE_NAME
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        state = State(**{k: v for k, v in saved.items() if k in State.__dataclass_fields__})
        rng.bit_generator.state = state.rng
        return state, Tree.from_dict(state.tree), rng
    tree = Tree.new(cfg.depth, list(cfg.seed_domains))
    return State(), tree, rng


def _save_state(out: Path, state: State, tree: Tree, rng: np.random.Generator, budget: int) -> None:
    state.tree, state.rng = tree.to_dict(), rng.bit_generator.state
    atomic_write_text(out / TREE_NAME, json.dumps(tree.to_dict(), indent=1))
    atomic_write_text(out / STATE_NAME, json.dumps({**asdict(state), "budget": budget}))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def sprout_round(pool: ModelPool, cfg: ExploreConfig, tree: Tree, parents: list[list[str]],
                 rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Every source proposes names for every parent (one batched call per source); then, parent
    by parent, a vote adds one child or the sprout fails. Returns the events and, per parent,
    the new child's name (None where the sprout failed)."""
    if not parents:
        return [], []
    prompts = [names_prompt(p, [c.name for c in tree.node(p).real_children]) for p in parents]
    seed = _seed(rng)
    texts = pool.call([(s, "generate", (prompts, cfg.name_tokens, 0.8, seed, True)) for s in cfg.sources])
    events: list[dict[str, Any]] = []
    added: list[str | None] = []
    for j, parent in enumerate(parents):
        node = tree.node(parent)
        unk = node.unk()
        if unk is not None and len(node.real_children) >= cfg.bandit.max_children:
            unk.closed = True  # full already (seed domains, or a lower --max-children on resume)
        if unk is None or unk.closed:  # or closed by an earlier sprout of this round
            added.append(None)
            continue
        taken = {c.name.casefold() for c in node.real_children} | {n.casefold() for n in parent}
        result = vote([parse_proposals(t[j]) for t in texts], taken)
        if result.winner is not None:
            tree.add_child(parent, result.winner)
        record_sprout(tree, parent, result.winner is not None, cfg.bandit)
        added.append(result.winner)
        events.append({"kind": "sprout", "path": parent, "success": result.winner is not None, "reward": None,
                       "detail": result.reason, "rebirths": []})
    return events, added


def descend_round(pool: ModelPool, cfg: ExploreConfig, tree: Tree, n: int,
                  rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """DynaBranches for `n` paths at once, level by level. A path that draws `unk` sprouts a
    new child and goes on into it (sprouts of one level are batched), so every path that does
    not fail reaches a leaf to harvest. Returns the sprout events and the leaf paths."""
    paths: list[list[str]] = [[] for _ in range(n)]
    events: list[dict[str, Any]] = []
    for _level in range(tree.depth):
        sprouting: list[int] = []
        for i, path in enumerate(paths):
            chosen = choose_child(tree, path, rng)
            if chosen is None:
                paths[i] = []
                continue
            if chosen.is_unk:
                sprouting.append(i)
            else:
                path.append(chosen.name)
        new_events, added = sprout_round(pool, cfg, tree, [list(paths[i]) for i in sprouting], rng)
        events += new_events
        for i, name in zip(sprouting, added, strict=True):
            if name is None:
                paths[i] = []  # a failed sprout ends this path for the round
            else:
                paths[i].append(name)
        paths = [p for p in paths if p]
        if not paths:
            break
    return events, [p for p in paths if len(p) == tree.depth]


def harvest_round(pool: ModelPool, cfg: ExploreConfig, tree: Tree, leaves: list[list[str]],
                  rng: np.random.Generator, round_no: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Questions, answers, judgements for each leaf; returns (events, kept SFT rows)."""
    if not leaves:
        return [], []
    leaders = [cfg.sources[int(rng.integers(len(cfg.sources)))] for _ in leaves]
    styles = [cfg.styles[int(rng.integers(len(cfg.styles)))] for _ in leaves]
    seed = _seed(rng)
    questions = [""] * len(leaves)
    by_leader = {s: [i for i, lead in enumerate(leaders) if lead == s] for s in cfg.sources}
    calls = [(s, "generate", ([question_prompt(leaves[i], styles[i]) for i in idx], cfg.question_tokens, 1.0, seed, True))
             for s, idx in by_leader.items() if idx]
    for (s, _, _), texts in zip(calls, pool.call(calls), strict=True):
        for i, text in zip(by_leader[s], texts, strict=True):
            questions[i] = text.strip()
    good = [i for i, q in enumerate(questions) if usable_question(q)]
    answers: dict[str, list[str]] = {}
    if good:
        qs = [questions[i] for i in good]
        replies = pool.call([(m, "answer", (qs, cfg.answer_tokens)) for m in cfg.answerers])
        answers = dict(zip(cfg.answerers, replies, strict=True))

    # the judge sees the answers in a random order (recorded); some again in the reverse order
    m = len(cfg.answerers)
    orders = [rng.permutation(m).tolist() for _ in good]
    rejudge = [bool(rng.random() < cfg.rejudge) for _ in good]
    prompts, n_labels = [], []
    for g, i in enumerate(good):
        shown = [answers[cfg.answerers[o]][g] for o in orders[g]]
        prompts.append(judge_prompt(questions[i], shown))
        n_labels.append(m)
        if rejudge[g]:
            prompts.append(judge_prompt(questions[i], shown[::-1]))
            n_labels.append(m)
    scored = pool.call([(cfg.judge_model, "label_scores", (prompts, n_labels))])[0] if prompts else []

    events: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    cursor = 0
    good_index = {i: g for g, i in enumerate(good)}
    for i, path in enumerate(leaves):
        if i not in good_index:
            events.append({"kind": "harvest", "path": path, "success": False, "reward": None,
                           "detail": f"{leaders[i]} wrote no usable question", "rebirths": []})
            continue
        g = good_index[i]
        order = orders[g]
        shown_models = [cfg.answerers[o] for o in order]
        score_of = dict(zip(shown_models, scored[cursor], strict=True))
        cursor += 1
        shown_winner = max(cfg.answerers, key=lambda a: score_of[a])  # ties: the target, then source order
        swapped = None
        if rejudge[g]:  # both orders: the mean cancels a bias toward the first or the last label
            back = dict(zip(shown_models[::-1], scored[cursor], strict=True))
            cursor += 1
            swapped = max(cfg.answerers, key=lambda a: back[a])
            score_of = {a: (score_of[a] + back[a]) / 2 for a in cfg.answerers}
        winner = max(cfg.answerers, key=lambda a: score_of[a])
        reward = int(max(score_of[s] for s in cfg.sources) > score_of[cfg.target])
        reborn = update_path(tree, path, reward, cfg.bandit)
        pair_id = f"r{round_no:05d}-{len(rows):03d}"
        rows.append({
            "id": pair_id, "prompt": questions[i], "response": answers[winner][g], "domain_path": path,
            "style": styles[i], "leader": leaders[i], "winner": winner, "source_won": bool(reward),
            "reward": reward, "models": shown_models, "answers": [answers[a][g] for a in shown_models],
            "scores": [score_of[a] for a in shown_models], "judge": cfg.judge_model,
            "shown_winner": shown_winner, "swapped_winner": swapped, "round": round_no,
        })
        events.append({"kind": "harvest", "path": path, "success": True, "reward": reward,
                       "detail": winner, "rebirths": reborn})
    return events, rows


def _finish(out: Path, run: dict[str, Any], state: State) -> dict[str, Any]:
    import pyarrow.parquet as pq

    tables = [pq.read_table(out / "sft" / n, columns=SFT_COLUMNS) for n in state.sft_shards]
    stats: dict[str, Any] = {"pairs": state.harvested, "rounds": state.round, "events": state.events}
    if tables:
        stats.update(pair_stats(pa.concat_tables(tables).to_pydict()))
    DatasetDir(out / "sft").finish("sft", run, state.sft_shards, stats)
    DatasetDir(out / "docs").finish("docs", run, state.sft_shards, {"docs": state.harvested})
    return stats


def explore(cfg: ExploreConfig, pool: ModelPool | None = None, log: Any = print) -> dict[str, Any]:
    """Explore until cfg.budget SFT pairs are kept; returns a summary. Resumes from cfg.output."""
    validate(cfg)
    out = Path(cfg.output)
    run = run_identity(cfg)
    parts = ("sft", "docs", "history")
    with DatasetDir(out).writing("explore", log) as lock:  # no other run writes the folder meanwhile
        return _explore_locked(cfg, pool, log, out, run, parts, lock)


def _explore_locked(cfg: ExploreConfig, pool: ModelPool | None, log: Any, out: Path, run: dict[str, Any],
                    parts: tuple[str, ...], lock: WriterLock) -> dict[str, Any]:
    DatasetDir(out).begin(run, overwrite=cfg.overwrite, owned=(STATE_NAME, TREE_NAME, *parts))
    dirs = {name: DatasetDir(out / name) for name in parts}
    for d in dirs.values():
        d.begin(run)
    state, tree, rng = _load_state(out, cfg)
    if state.harvested >= cfg.budget and (out / "sft" / MANIFEST_NAME).is_file():
        log(f"{out}: {state.harvested} pairs already kept (budget {cfg.budget}); nothing to do")
        return {"pairs": state.harvested, "rounds": state.round, "tree": tree.to_dict()}
    for name in ("sft", "docs"):  # a continued run lists its new shards when it finishes
        (out / name / MANIFEST_NAME).unlink(missing_ok=True)
    own_pool = pool is None
    pool = pool or LocalPool(cfg.device, backend=cfg.backend)
    try:
        while state.harvested < cfg.budget:
            if descend(tree, rng) is None:
                raise UsageError("the domain tree cannot grow: every unk is closed and no leaf exists "
                                 "(the sources proposed no usable names); try --seed-domain or other sources")
            n = min(cfg.batch, cfg.budget - state.harvested)
            events, leaves = descend_round(pool, cfg, tree, n, rng)
            harvest_events, rows = harvest_round(pool, cfg, tree, leaves, rng, state.round)
            events += harvest_events
            _write_round(dirs, state, events, rows)
            state.harvested += len(rows)
            state.events += len(events)
            state.idle_rounds = 0 if any(e["success"] for e in events) else state.idle_rounds + 1
            state.round += 1
            _save_state(out, state, tree, rng, cfg.budget)
            log(_round_line(state, events, cfg.budget))
            if state.idle_rounds >= MAX_IDLE_ROUNDS:
                raise UsageError(f"{MAX_IDLE_ROUNDS} rounds in a row kept nothing; the models write no usable "
                                 "names or questions (the run so far is kept)")
    finally:
        if own_pool:
            pool.close()
    lock.check()
    stats = _finish(out, run, state)
    return {**stats, "tree": tree.to_dict()}


def _write_round(dirs: dict[str, DatasetDir], state: State, events: list[dict[str, Any]],
                 rows: list[dict[str, Any]]) -> None:
    """This round's shards; the SFT/docs shards only when pairs were kept."""
    name = shard_name(state.round)
    for n, e in enumerate(events):
        e.update(round=state.round, event=state.events + n)
    dirs["history"].write_shard(name, pa.Table.from_pylist(events, schema=HISTORY_SCHEMA), HISTORY_SCHEMA)
    if rows:
        dirs["sft"].write_shard(name, pa.Table.from_pylist(rows, schema=SFT_SCHEMA), SFT_SCHEMA)
        docs = [{"id": r["id"], "text": f"{r['prompt']}\n\n{r['response']}"} for r in rows]
        dirs["docs"].write_shard(name, pa.Table.from_pylist(docs, schema=DOCS_SCHEMA), DOCS_SCHEMA)
        if name not in state.sft_shards:
            state.sft_shards.append(name)


def _round_line(state: State, events: list[dict[str, Any]], budget: int) -> str:
    sprouts = [e for e in events if e["kind"] == "sprout"]
    harvests = [e for e in events if e["kind"] == "harvest" and e["success"]]
    added = [e["detail"].split(" (")[0] for e in sprouts if e["success"]]
    parts = [f"round {state.round}: {state.harvested}/{budget} pairs"]
    if sprouts:
        parts.append(f"sprouts {len(added)}/{len(sprouts)}" + (f" (+{', '.join(added)})" if added else ""))
    if harvests:
        parts.append(f"harvests {len(harvests)}, a source won {sum(e['reward'] for e in harvests)}")
    return "  ".join(parts)
