"""`fusedata inspect` on an explore folder: summary numbers from a hand-built run, the text
tree, the two charts, and the fall-through to the dataset error for an incomplete folder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import main
from fusedata.errors import UsageError
from fusedata.explore.bandit import BanditConfig, record_sprout, update_path
from fusedata.explore.report import (
    is_explore_dir,
    plot_explore,
    render_explore,
    summarize_explore,
    tree_lines,
)
from fusedata.explore.tree import Tree
from schemas.explore import HISTORY_SCHEMA, SFT_SCHEMA

NO_REBIRTH = BanditConfig(significance=1e-12, max_sprout_failures=1)

GROUPS, RINGS, ASYNC = ["math", "algebra", "groups"], ["math", "algebra", "rings"], ["code", "python", "async"]

# (event, kind, path, success, reward, rebirths); round 0 = events 0-4, round 1 = events 5-9
EVENTS = [
    (0, "sprout", [], True, None, []),
    (1, "sprout", [], True, None, []),
    (2, "sprout", ["math"], False, None, []),
    (3, "harvest", GROUPS, True, 1, []),
    (4, "harvest", ASYNC, True, 0, []),
    (5, "harvest", GROUPS, True, 1, ["math"]),
    (6, "harvest", RINGS, False, None, []),  # no pair kept, not judged
    (7, "harvest", RINGS, True, 0, ["math", "math/algebra"]),
    (8, "sprout", ["code"], False, None, []),
    (9, "harvest", ASYNC, True, 1, []),
]

# the kept pairs (events 3, 4, 5, 7, 9): (path, winner, source_won, swapped_winner)
PAIRS = [
    (GROUPS, "src-a", True, "src-a"),
    (ASYNC, "target", False, None),
    (GROUPS, "src-a", True, "target"),
    (RINGS, "target", False, None),
    (ASYNC, "src-b", True, "src-b"),
]


def build_tree() -> Tree:
    tree = Tree.new(seed_domains=["math", "code"])
    for path in (GROUPS, RINGS, ASYNC):
        for i, name in enumerate(path):
            if tree.node(path[:i]).child(name) is None:
                tree.add_child(path[:i], name)
    for _, kind, path, success, reward, _ in EVENTS:
        if kind == "sprout":
            record_sprout(tree, path, success, NO_REBIRTH)
        elif reward is not None:
            update_path(tree, path, reward, NO_REBIRTH)
    return tree


def write_history(folder: Path, round_: int, events: list[tuple]) -> None:
    rows = [{"round": round_, "event": e, "kind": k, "path": p, "success": s, "reward": r,
             "detail": "x", "rebirths": rb} for e, k, p, s, r, rb in events]
    pq.write_table(pa.Table.from_pylist(rows).cast(HISTORY_SCHEMA), folder / f"shard-{round_:05d}.parquet")


def write_sft(folder: Path) -> None:
    rows = [{"id": f"r{i // 3}-{i}", "prompt": "q?", "response": "a.", "domain_path": path, "style": "open",
             "leader": "src-a", "winner": winner, "source_won": won, "reward": int(won),
             "models": ["target", "src-a", "src-b"], "answers": ["a", "b", "c"], "scores": [0.2, 0.5, 0.3],
             "judge": "judge-m", "shown_winner": winner, "swapped_winner": swapped, "round": i // 3}
            for i, (path, winner, won, swapped) in enumerate(PAIRS)]
    pq.write_table(pa.Table.from_pylist(rows).cast(SFT_SCHEMA), folder / "shard-00000.parquet")


@pytest.fixture
def explore_dir(tmp_path) -> Path:
    folder = tmp_path / "explore"
    (folder / "history").mkdir(parents=True)
    (folder / "sft").mkdir()
    tree = build_tree()
    (folder / "tree.json").write_text(json.dumps(tree.to_dict()))
    (folder / "state.json").write_text(json.dumps({"round": 2, "harvested": 5, "events": 10, "budget": 40,
                                                   "rng": {"state": 1}, "tree": tree.to_dict()}))
    write_history(folder / "history", 1, EVENTS[5:])  # shard order must not matter
    write_history(folder / "history", 0, EVENTS[:5])
    write_sft(folder / "sft")
    return folder


EXPECTED_TREE = [
    "root",
    "├── math  α=3 β=2  mean 0.600  visits 3",
    "│   ├── algebra  α=3 β=2  mean 0.600  visits 3",
    "│   │   ├── groups  α=3 β=1  mean 0.750  visits 2",
    "│   │   ├── rings  α=1 β=2  mean 0.333  visits 1",
    "│   │   └── unk  α=1 β=1  mean 0.500  visits 0",
    "│   └── unk  α=1 β=2  mean 0.333  visits 1  [closed]",
    "├── code  α=2 β=2  mean 0.500  visits 2",
    "│   ├── python  α=2 β=2  mean 0.500  visits 2",
    "│   │   ├── async  α=2 β=2  mean 0.500  visits 2",
    "│   │   └── unk  α=1 β=1  mean 0.500  visits 0",
    "│   └── unk  α=1 β=2  mean 0.333  visits 1  [closed]",
    "└── unk  α=3 β=1  mean 0.750  visits 2",
]


def test_is_explore_dir(explore_dir, tmp_path):
    assert is_explore_dir(explore_dir)
    assert not is_explore_dir(tmp_path)
    (explore_dir / "state.json").unlink()
    assert not is_explore_dir(explore_dir)


def test_summarize_explore_numbers(explore_dir):
    s = summarize_explore(explore_dir)
    assert (s["kind"], s["round"], s["harvested"], s["events"], s["budget"]) == ("explore", 2, 5, 10, 40)
    assert (s["depth"], s["history_events"], s["harvest_events"], s["finished"]) == (3, 10, 6, False)
    assert list(s["domains"]) == ["math", "code"]
    assert s["domains"]["math"] == {"harvests": 4, "kept": 3, "rewards": 2, "judged": 3,
                                    "reward_rate": pytest.approx(2 / 3), "posterior_mean": pytest.approx(0.6)}
    assert s["domains"]["code"] == {"harvests": 2, "kept": 2, "rewards": 1, "judged": 2, "reward_rate": 0.5,
                                    "posterior_mean": 0.5}
    assert list(s["leaves"]) == ["math/algebra/groups", "math/algebra/rings", "code/python/async"]
    leaves = {k: (v["harvests"], v["kept"], v["rewards"], v["judged"], v["reward_rate"]) for k, v in s["leaves"].items()}
    assert leaves == {"math/algebra/groups": (2, 2, 2, 2, 1.0), "math/algebra/rings": (2, 1, 0, 1, 0.0),
                      "code/python/async": (2, 2, 1, 2, 0.5)}
    assert s["leaves"]["math/algebra/groups"]["posterior_mean"] == 0.75
    assert s["sprouts"] == {"success": 2, "failure": 2}
    assert s["rebirths"] == 3 and s["rebirths_by_node"] == {"math": 2, "math/algebra": 1}
    assert s["sft_pairs"] == 5
    assert s["source_won_share"] == pytest.approx(3 / 5)
    assert s["rejudged"] == 3 and s["judge_consistency"] == pytest.approx(2 / 3)
    json.dumps(s)  # machine-readable as it is


def test_summarize_a_run_that_just_started(tmp_path):
    folder = tmp_path / "fresh"
    folder.mkdir()
    (folder / "tree.json").write_text(json.dumps(Tree.new(seed_domains=["law"]).to_dict()))
    (folder / "state.json").write_text(json.dumps({"round": 0, "harvested": 0, "events": 0, "budget": 8}))
    s = summarize_explore(folder)
    assert s["domains"] == {"law": {"harvests": 0, "kept": 0, "rewards": 0, "judged": 0, "reward_rate": None,
                                    "posterior_mean": 0.5}}
    assert (s["leaves"], s["sft_pairs"], s["source_won_share"], s["rejudged"], s["judge_consistency"]) == (
        {}, 0, None, 0, None)
    text = render_explore(s, Tree.new(seed_domains=["law"]))
    assert "judge consistency - of 0 re-judged" in text and "├── law  α=1 β=1" in text
    written = plot_explore(folder, tmp_path / "plots")
    assert [p.name for p in written] == ["tree.png", "allocation.png"]


def test_summarize_refuses_a_broken_state(explore_dir):
    (explore_dir / "state.json").write_text(json.dumps({"round": 1}))
    with pytest.raises(UsageError, match="missing harvested, events, budget"):
        summarize_explore(explore_dir)
    (explore_dir / "state.json").write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        summarize_explore(explore_dir)


def test_render_draws_the_tree(explore_dir):
    tree = Tree.from_dict(json.loads((explore_dir / "tree.json").read_text()))
    assert tree_lines(tree) == EXPECTED_TREE
    text = render_explore(summarize_explore(explore_dir), tree)
    for line in EXPECTED_TREE:
        assert "  " + line in text.splitlines()
    assert "round 2, harvested 5 of budget 40, 10 events" in text
    assert "sprouts 2 ok / 2 failed   rebirths 3" in text
    assert "a source won 60.0%" in text and "judge consistency 66.7% of 3 re-judged" in text
    assert "math  harvests     4  kept     3  reward rate  66.7%" in text


def test_plot_explore_writes_two_pngs(explore_dir, tmp_path):
    written = plot_explore(explore_dir, tmp_path / "plots")
    assert [p.name for p in written] == ["tree.png", "allocation.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_inspect_cli_on_an_explore_folder(explore_dir, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(explore_dir)])
    assert result.exit_code == 0, result.output
    for line in EXPECTED_TREE:
        assert line in result.output
    result = CliRunner().invoke(main, ["inspect", str(explore_dir), "--json", "--plot", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads(json.dumps(summarize_explore(explore_dir)))
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["allocation.png", "tree.png"]


def test_inspect_cli_without_state_is_not_an_explore_folder(explore_dir):
    (explore_dir / "state.json").unlink()
    result = CliRunner().invoke(main, ["inspect", str(explore_dir)])
    assert result.exit_code == 2 and "no _manifest.json" in result.output
