"""`fusedata explore` with the real bundled models, end to end: a tree grows, the judge
scores real answers, the SFT pairs train the target and the documents feed extract.

Slow (two real models; Gemma's conversion is cached after the first run): `pytest -m real`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import main
from fusedata.dataset import open_dataset
from fusedata.explore.tree import Tree
from fusedata.models.cache import BUNDLED, cache_root

pytestmark = pytest.mark.real

TARGET, SOURCE = "smollm2-135m", "gemma3-270m"


@pytest.fixture(autouse=True)
def bundled_models(monkeypatch):
    if Path("/tmp/fdcache").is_dir():
        monkeypatch.setenv("FUSEDATA_CACHE", "/tmp/fdcache")
    for name in (TARGET, SOURCE):
        if importlib.util.find_spec(BUNDLED[name].package) is None and not (
                cache_root() / name / "fusedata_check.json").is_file():
            pytest.skip(f"the package shipping {name} is not installed")


def _explore(out: Path, *extra: str) -> None:
    args = ["explore", "--target", TARGET, "--sources", SOURCE, "--output", str(out), "--depth", "2",
            "--batch", "3", "--answer-tokens", "24", "--question-tokens", "32", "--rejudge", "1", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_real_explore_then_train_and_extract(tmp_path):
    out = tmp_path / "explore"
    _explore(out, "--budget", "3", "--executor", "local")
    tree = Tree.from_dict(json.loads((out / "tree.json").read_text()))
    leaves = list(tree.leaves())
    assert leaves and all(len(p) == 2 for p in leaves)
    history = pq.read_table(out / "history").to_pylist()
    assert any(e["kind"] == "sprout" and e["success"] for e in history)
    harvests = [e for e in history if e["kind"] == "harvest" and e["success"]]
    rows = pq.read_table(out / "sft").to_pylist()
    assert len(rows) == len(harvests) == 3 == open_dataset(out / "sft", "sft").rows
    for r in rows:
        assert r["prompt"] and r["response"] and sorted(r["models"]) == sorted([TARGET, SOURCE])
        assert sum(r["scores"]) == pytest.approx(1.0, abs=1e-5)
        best = max(range(2), key=lambda i: r["scores"][i])
        assert r["winner"] == r["models"][best] and r["response"] == r["answers"][best]
        assert r["reward"] == int(r["scores"][r["models"].index(SOURCE)] > r["scores"][r["models"].index(TARGET)])
        assert r["swapped_winner"] in (TARGET, SOURCE)  # --rejudge 1: every pair judged twice
    # the posteriors of the leaves add up to the rewards harvested there
    for leaf in leaves:
        got = [e["reward"] for e in harvests if e["path"] == leaf]
        node = tree.node(leaf)
        assert (node.alpha, node.beta) == (1 + sum(got), 1 + len(got) - sum(got))

    shown = CliRunner().invoke(main, ["inspect", str(out), "--plot", str(tmp_path / "plots")])
    assert shown.exit_code == 0 and "tree:" in shown.output
    assert (tmp_path / "plots" / "tree.png").stat().st_size > 0

    trained = CliRunner().invoke(main, ["train", "--data", str(out / "sft"), "--model", TARGET,
                                        "--output", str(tmp_path / "ckpt"), "--max-steps", "2", "--lr", "1e-5"])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "ckpt" / "trainer_state.json").is_file()

    extracted = CliRunner().invoke(main, ["extract", "--model", TARGET, "--input", str(out / "docs"),
                                          "--output", str(tmp_path / "topk"), "--top-k", "4", "--executor", "local",
                                          "--quiet"])
    assert extracted.exit_code == 0, extracted.output
    assert open_dataset(tmp_path / "topk", "topk").rows == 3


@pytest.fixture
def ray_shutdown():
    """The CLI runs in this process here: stop the Ray it starts, so later tests can start theirs."""
    yield
    import ray

    ray.shutdown()


@pytest.mark.ray
def test_real_explore_on_ray(tmp_path, ray_shutdown):
    out = tmp_path / "explore"
    _explore(out, "--budget", "1", "--executor", "ray")
    assert open_dataset(out / "sft", "sft").rows == 1
