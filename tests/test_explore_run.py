"""The explore loop's bookkeeping: posteriors agree with the history, SFT rows with the
judgements, a killed run resumes to the same result, a raised budget continues.

The models are replaced by a scripted pool (deterministic text, a judge that prefers one
model); tests/test_explore_real.py runs the same loop with the real bundled models.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fusedata.dataset import open_dataset
from fusedata.errors import UsageError
from fusedata.explore.bandit import BanditConfig
from fusedata.explore.prompts import JUDGE_LABELS
from fusedata.explore.run import ExploreConfig, explore
from fusedata.explore.tree import Tree

TARGET, SOURCES = "tgt", ("src-a", "src-b")
GREEK = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa", "Lambda", "Mu"]


class ScriptedPool:
    """Text that depends only on (model, prompt, seed, position), like seeded sampling, and a
    judge giving 0.7 to the answer of `strong(call number)` wherever it is shown."""

    def __init__(self, strong=lambda n: SOURCES[0], names=None, fail_after: int | None = None,
                 first_label: bool = False) -> None:
        self.strong, self.names, self.fail_after = strong, names, fail_after
        self.first_label = first_label  # a judge that always prefers Answer A (pure position bias)
        self.calls = 0
        self.judged = 0

    def call(self, calls):
        out = []
        for spec, method, args in calls:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise KeyboardInterrupt
            if method == "generate":
                prompts, _tokens, _temp, seed, _one_line = args
                out.append([self._generate(spec, p, seed, j) for j, p in enumerate(prompts)])
            elif method == "answer":
                out.append([f"{spec} says: {q}" for q in args[0]])
            else:
                out.append([self._judge(p, n) for p, n in zip(*args, strict=True)])
        return out

    def _generate(self, spec: str, prompt: str, seed: int, j: int) -> str:
        h = zlib.crc32(f"{spec}|{prompt}|{seed}|{j}".encode())
        if prompt.rstrip().endswith("Question:"):
            return f"What is worth knowing about item {h % 1000}?"
        if self.names is not None:
            return self.names
        return f"{GREEK[h % len(GREEK)]}, {GREEK[(h // 7) % len(GREEK)]}"

    def _judge(self, prompt: str, n: int) -> list[float]:
        self.judged += 1
        strong = self.strong(self.judged)
        shown = [line.split(": ", 1)[1].split(" says")[0] for line in prompt.splitlines() if line.startswith("Answer ")]
        assert len(shown) == n and all(f"Answer {JUDGE_LABELS[i]}:" in prompt for i in range(n))
        rest = 0.3 / (n - 1)
        if self.first_label:
            return [0.7] + [rest] * (n - 1)
        return [0.7 if m == strong else rest for m in shown]

    def close(self) -> None:
        pass


def _cfg(out: Path, **kw) -> ExploreConfig:
    base = dict(target=TARGET, sources=SOURCES, output=str(out), budget=10, depth=2, batch=4, seed=3)
    base.update(kw)
    return ExploreConfig(**base)


def _read(folder: Path) -> list[dict]:
    return sorted(pq.read_table(folder).to_pylist(), key=lambda r: (r.get("id") or "", r.get("event", 0)))


def test_posteriors_count_the_harvests_in_the_history(tmp_path):
    out = tmp_path / "ex"
    result = explore(_cfg(out), ScriptedPool(), log=lambda m: None)
    assert result["pairs"] == 10
    tree = Tree.from_dict(json.loads((out / "tree.json").read_text()))
    history = _read(out / "history")
    harvests = [e for e in history if e["kind"] == "harvest" and e["success"]]
    assert len(harvests) == 10 and all(e["reward"] == 1 for e in harvests)  # a source is always preferred
    for prefix in {tuple(e["path"][:d]) for e in harvests for d in (1, 2)}:
        through = sum(1 for e in harvests if tuple(e["path"][: len(prefix)]) == prefix)
        node = tree.node(list(prefix))
        assert (node.alpha, node.beta, node.visits) == (1 + through, 1, through)
    sprouts = [e for e in history if e["kind"] == "sprout"]
    for parent in {tuple(e["path"]) for e in sprouts}:
        ok = sum(1 for e in sprouts if tuple(e["path"]) == parent and e["success"])
        failed = sum(1 for e in sprouts if tuple(e["path"]) == parent and not e["success"])
        unk = tree.node(list(parent)).unk()
        assert (unk.alpha, unk.beta) == (1 + ok, 1 + failed)
        assert len(tree.node(list(parent)).real_children) == ok
    assert [e["event"] for e in sorted(history, key=lambda e: e["event"])] == list(range(len(history)))


def test_sft_rows_follow_the_judgement(tmp_path):
    out = tmp_path / "ex"
    explore(_cfg(out, rejudge=1.0), ScriptedPool(), log=lambda m: None)
    rows = _read(out / "sft")
    tree = Tree.from_dict(json.loads((out / "tree.json").read_text()))
    leaves = {tuple(p) for p in tree.leaves()}
    for r in rows:
        assert sorted(r["models"]) == sorted([TARGET, *SOURCES])
        assert r["winner"] == "src-a" and r["source_won"] and r["reward"] == 1
        assert r["response"] == r["answers"][r["models"].index("src-a")] == f"src-a says: {r['prompt']}"
        assert r["scores"][r["models"].index("src-a")] == pytest.approx(0.7)
        assert r["shown_winner"] == r["swapped_winner"] == "src-a"  # re-judged in reverse order, same winner
        assert tuple(r["domain_path"]) in leaves and r["leader"] in SOURCES and r["judge"] == "src-a"
    assert len({r["models"][0] for r in rows}) > 1  # the judge does not always see the same order
    docs = _read(out / "docs")
    assert [d["id"] for d in docs] == [r["id"] for r in rows]
    assert all(d["text"] == f"{r['prompt']}\n\n{r['response']}" for d, r in zip(docs, rows, strict=True))
    manifest = open_dataset(out / "sft", "sft")
    assert manifest.rows == 10 and manifest.stats["judge_consistency"] == 1.0 and manifest.stats["source_won"] == 1.0


def test_a_strong_target_earns_no_rewards(tmp_path):
    out = tmp_path / "ex"
    explore(_cfg(out, budget=6), ScriptedPool(strong=lambda n: TARGET), log=lambda m: None)
    rows = _read(out / "sft")
    assert all(r["reward"] == 0 and r["winner"] == TARGET and not r["source_won"] for r in rows)
    tree = Tree.from_dict(json.loads((out / "tree.json").read_text()))
    assert sum(c.beta - 1 for c in tree.root.real_children) == 6
    assert all(c.alpha == 1 for c in tree.root.real_children)


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    explore(_cfg(whole), ScriptedPool(), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        explore(_cfg(killed), ScriptedPool(fail_after=25), log=lambda m: None)
    state = json.loads((killed / "state.json").read_text())
    assert 0 < state["round"] and state["harvested"] < 10
    explore(_cfg(killed), ScriptedPool(), log=lambda m: None)
    for part in ("sft", "docs", "history"):
        assert _read(whole / part) == _read(killed / part)
    assert (whole / "tree.json").read_text() == (killed / "tree.json").read_text()


def test_raising_the_budget_continues_the_run(tmp_path):
    out = tmp_path / "ex"
    explore(_cfg(out, budget=4), ScriptedPool(), log=lambda m: None)
    assert open_dataset(out / "sft", "sft").rows == 4
    logs = []
    explore(_cfg(out, budget=4), ScriptedPool(), log=logs.append)
    assert "nothing to do" in logs[0]
    explore(_cfg(out, budget=9), ScriptedPool(), log=lambda m: None)
    manifest = open_dataset(out / "sft", "sft")
    assert manifest.rows == 9 and open_dataset(out / "docs", "docs").rows == 9
    assert len({r["id"] for r in _read(out / "sft")}) == 9


def test_another_run_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "ex"
    explore(_cfg(out, budget=2), ScriptedPool(), log=lambda m: None)
    with pytest.raises(UsageError, match="another run"):
        explore(_cfg(out, budget=2, seed=4), ScriptedPool(), log=lambda m: None)
    explore(_cfg(out, budget=2, seed=4, overwrite=True), ScriptedPool(), log=lambda m: None)
    assert json.loads((out / "_run.json").read_text())["seed"] == 4


@pytest.mark.parametrize("kw, message", [
    ({"budget": 0}, "--budget"),
    ({"sources": ()}, "at least one"),
    ({"sources": (TARGET,)}, "the target"),
    ({"sources": ("a", "a")}, "twice"),
    ({"styles": ("poetry",)}, "unknown question style"),
    ({"rejudge": 1.5}, "--rejudge"),
])
def test_bad_settings_are_clear_errors(tmp_path, kw, message):
    with pytest.raises(UsageError, match=message):
        explore(_cfg(tmp_path / "ex", **kw), ScriptedPool(), log=lambda m: None)
    assert not (tmp_path / "ex").exists()


def test_a_tree_that_cannot_grow_is_a_clear_error(tmp_path):
    out = tmp_path / "ex"
    with pytest.raises(UsageError, match="cannot grow"):
        explore(_cfg(out, bandit=BanditConfig(max_sprout_failures=2)), ScriptedPool(names="1990, !!!, a b c d"),
                log=lambda m: None)
    history = _read(out / "history")
    assert [e["success"] for e in history] == [False, False]
    assert json.loads((out / "tree.json").read_text())["root"]["children"][0]["closed"] is True


def test_a_posterior_that_the_recent_rewards_reject_is_reborn(tmp_path):
    out = tmp_path / "ex"
    # the target wins the first 8 judgements, then the sources win everything
    pool = ScriptedPool(strong=lambda n: TARGET if n <= 8 else SOURCES[1])
    explore(_cfg(out, budget=24, seed_domains=("Solo",), depth=1, bandit=BanditConfig(window=6, max_children=1)),
            pool, log=lambda m: None)
    history = sorted(_read(out / "history"), key=lambda e: e["event"])
    reborn_at = [i for i, e in enumerate(history) if e["rebirths"]]
    assert reborn_at and history[reborn_at[0]]["rebirths"] == ["Solo"]
    # at the first rebirth the window holds 6 rewards of 1 after a Beta(1, 9)-ish posterior
    solo = Tree.from_dict(json.loads((out / "tree.json").read_text())).node(["Solo"])
    assert solo.rebirths >= 1
    rewards_after = sum(e["reward"] for e in history[reborn_at[-1] + 1:])
    assert solo.alpha == 1 + 6 + rewards_after and solo.beta == 1


def test_re_judging_averages_out_a_position_bias_and_measures_it(tmp_path):
    out = tmp_path / "ex"
    explore(_cfg(out, budget=6, rejudge=1.0), ScriptedPool(first_label=True), log=lambda m: None)
    for r in _read(out / "sft"):
        first, last = r["models"][0], r["models"][-1]
        assert r["shown_winner"] == first and r["swapped_winner"] == last  # each pass picks label A
        # mean of both orders: A-then-C and C-then-A tie at (0.7 + 0.15) / 2, the middle one keeps 0.15
        assert r["scores"] == pytest.approx([0.425, 0.15, 0.425])
        tied = [m for m in (TARGET, *SOURCES) if m in (first, last)]
        assert r["winner"] == tied[0]  # a tie goes to the target, then the sources in order
    manifest = open_dataset(out / "sft", "sft")
    assert manifest.stats["judge_consistency"] == 0.0 and manifest.stats["rejudged"] == 6
