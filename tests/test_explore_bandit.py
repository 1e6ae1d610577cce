"""The Bohdi bandit and domain tree against closed forms: Beta posterior updates, Thompson
selection probabilities, the likelihood-ratio rebirth test and sprout bookkeeping."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from fusedata.explore.bandit import (
    BanditConfig,
    Descent,
    chi2_1_critical,
    descend,
    lrt_statistic,
    maybe_rebirth,
    posterior_reference,
    record_sprout,
    thompson_pick,
    update_path,
)
from fusedata.explore.tree import UNK, Node, Tree

NO_REBIRTH = BanditConfig(window=3, significance=1e-12)  # critical value ~50: isolates the updates


def chain_tree(*paths: str) -> Tree:
    """A depth-3 tree holding the given "a/b/c" leaf paths."""
    tree = Tree.new()
    for p in paths:
        parts = p.split("/")
        for i, name in enumerate(parts):
            if tree.node(parts[:i]).child(name) is None:
                tree.add_child(parts[:i], name)
    return tree


def hand_lrt(k: int, n: int, p0: float) -> float:
    """2[ℓ(k/n) − ℓ(p0)] for a Bernoulli window with k ones out of n, 0·log 0 = 0."""
    def ll(p: float) -> float:
        return (k * math.log(p) if k else 0.0) + ((n - k) * math.log(1 - p) if n - k else 0.0)
    return 2 * (ll(k / n) - ll(p0))


# --- tree -------------------------------------------------------------------------------


def test_add_child_keeps_unk_last_and_only_on_non_leaves():
    tree = Tree.new(seed_domains=["math", "code"])
    assert [c.name for c in tree.root.children] == ["math", "code", UNK]
    tree.add_child([], "law")
    assert [c.name for c in tree.root.children] == ["math", "code", "law", UNK]
    sub = tree.add_child(["math"], "algebra")
    assert [c.name for c in sub.children] == [UNK]  # level 2 is not a leaf
    leaf = tree.add_child(["math", "algebra"], "groups")
    assert leaf.children == [] and leaf.unk() is None  # level 3 = depth: a leaf
    tree.add_child(["math", "algebra"], "rings")
    assert [c.name for c in tree.node(["math", "algebra"]).children] == ["groups", "rings", UNK]
    assert (leaf.alpha, leaf.beta, leaf.visits) == (1.0, 1.0, 0)


def test_add_child_refusals():
    tree = chain_tree("math/algebra/groups")
    with pytest.raises(ValueError, match="exists already"):
        tree.add_child([], "MATH")  # case-insensitive
    with pytest.raises(ValueError, match="exists already"):
        tree.add_child(["math"], "Unk")
    with pytest.raises(ValueError, match="leaf"):
        tree.add_child(["math", "algebra", "groups"], "x")
    with pytest.raises(KeyError, match="nope"):
        tree.add_child(["nope"], "x")
    assert [c.name for c in tree.root.children] == ["math", UNK]
    assert Tree.new(seed_domains=["a", "A"]).root.real_children[0].name == "a"  # duplicate seed skipped


def test_tree_json_round_trip_and_leaves():
    tree = chain_tree("math/algebra/groups", "math/algebra/rings", "math/calculus/limits", "code/python/async")
    tree.node(["math"]).unk().closed = True
    tree.node(["math"]).unk().sprout_failures = 3
    update_path(tree, ["math", "algebra", "rings"], 1, NO_REBIRTH)
    update_path(tree, ["code", "python", "async"], 0, NO_REBIRTH)
    tree.node(["code"]).rebirths = 2
    d = tree.to_dict()
    assert set(d) == {"depth", "root"}
    back = Tree.from_dict(d)
    assert back == tree
    assert back.to_dict() == d
    assert list(back.leaves()) == [["math", "algebra", "groups"], ["math", "algebra", "rings"],
                                   ["math", "calculus", "limits"], ["code", "python", "async"]]
    assert list(Tree.new(seed_domains=["x"]).leaves()) == []  # no path reaches the leaf level


def test_can_grow():
    tree = chain_tree("a/b/c")
    a = tree.node(["a"])
    assert tree.can_grow(a, 1)
    for unk in (a.unk(), tree.node(["a", "b"]).unk()):
        unk.closed = True
    assert tree.can_grow(a, 1)  # the leaf a/b/c can still be harvested
    tree2 = Tree.new(seed_domains=["x"])
    x = tree2.node(["x"])
    x.unk().closed = True
    assert not tree2.can_grow(x, 1)  # no leaf below and no sprout left
    assert tree2.can_grow(tree2.root.unk(), 1)
    tree2.root.unk().closed = True
    assert not tree2.can_grow(tree2.root, 0)


# --- posterior updates ------------------------------------------------------------------


def test_update_path_adds_reward_to_every_node_on_the_path():
    tree = chain_tree("a/b/c", "a/b/d", "e/f/g")
    rewards = [1, 0, 1, 1, 0]
    for r in rewards:
        assert update_path(tree, ["a", "b", "c"], r, NO_REBIRTH) == []
    k, n = sum(rewards), len(rewards)
    for node in tree.nodes_on(["a", "b", "c"]):
        assert (node.alpha, node.beta) == (1 + k, 1 + n - k)
        assert (node.visits, node.reward_sum) == (n, k)
        assert node.window == rewards[-NO_REBIRTH.window:] == [1, 1, 0]
    for untouched in (tree.root, tree.node(["a", "b", "d"]), tree.node(["e"]), tree.node(["a"]).unk()):
        assert (untouched.alpha, untouched.beta, untouched.visits, untouched.window) == (1.0, 1.0, 0, [])
    update_path(tree, ["a"], 1, NO_REBIRTH)  # a shorter path touches only its own nodes
    assert tree.node(["a"]).alpha == 2 + k and tree.node(["a", "b"]).alpha == 1 + k


@pytest.mark.parametrize("bad", [2, -1, 0.5, None])
def test_update_path_rejects_non_binary_rewards(bad):
    tree = chain_tree("a/b/c")
    before = tree.to_dict()
    with pytest.raises(ValueError, match="reward must be 0 or 1"):
        update_path(tree, ["a", "b", "c"], bad, BanditConfig())
    assert tree.to_dict() == before


def test_update_path_rebirths_when_the_window_fills():
    """Prior Beta(2, 50) on each node, then 20 ones: at the 20th update the posterior is
    Beta(22, 50), mode 21/70 = 0.3; against a window of 20 ones the statistic is
    −40·ln 0.3 ≈ 48.2 > 3.84, so every node is reborn as Beta(21, 1)."""
    cfg = BanditConfig()
    tree = chain_tree("a/b/c")
    for node in tree.nodes_on(["a", "b", "c"]):
        node.alpha, node.beta = 2.0, 50.0
    for _ in range(cfg.window - 1):
        assert update_path(tree, ["a", "b", "c"], 1, cfg) == []
    assert lrt_statistic([1] * 20, 22, 50) == pytest.approx(-40 * math.log(0.3))
    assert update_path(tree, ["a", "b", "c"], 1, cfg) == ["a", "a/b", "a/b/c"]
    for node in tree.nodes_on(["a", "b", "c"]):
        assert (node.alpha, node.beta, node.rebirths, node.visits) == (21.0, 1.0, 1, 20)
    # the reborn posterior is the window's own rate: the next update does not reject it again
    assert update_path(tree, ["a", "b", "c"], 1, cfg) == []


# --- Thompson sampling ------------------------------------------------------------------


def test_thompson_pick_is_the_argmax_of_the_same_beta_draws():
    nodes = [Node("a", 2.0, 5.0), Node("b", 1.0, 1.0), Node("c", 7.0, 3.0), Node(UNK, 0.5, 4.0)]
    rng, twin = np.random.default_rng(123), np.random.default_rng(123)
    picks = []
    for _ in range(500):
        picks.append(thompson_pick(nodes, rng))
        expected = int(np.argmax(twin.beta([n.alpha for n in nodes], [n.beta for n in nodes])))
        assert picks[-1] == expected
    assert set(picks) == {0, 1, 2, 3}
    assert rng.random() == twin.random()  # the streams stayed in step


def _win_share(a: Node, b: Node, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return sum(thompson_pick([a, b], rng) == 0 for _ in range(n)) / n


def test_selection_frequency_matches_beta_a_1_vs_uniform():
    """X ~ Beta(a, 1), Y ~ U(0, 1): P(X > Y) = E[X] = a / (a + 1)."""
    n = 20_000
    for a in (3.0, 1.0, 0.5):
        p = a / (a + 1)
        se = math.sqrt(p * (1 - p) / n)  # ≈ 0.0031 for a = 3
        share = _win_share(Node("x", a, 1.0), Node("y", 1.0, 1.0), n, seed=int(a * 10))
        assert abs(share - p) < 4 * se, (a, share, p)


def test_selection_frequency_matches_beta_2_1_vs_beta_1_2():
    """X ~ Beta(2, 1) (density 2x), Y ~ Beta(1, 2) (cdf 2y − y²):
    P(X > Y) = ∫₀¹ 2x (2x − x²) dx = 4/3 − 1/2 = 5/6."""
    m = 200_000
    x = (np.arange(m) + 0.5) / m  # midpoint rule; error O(1/m²)
    integral = float(np.sum(2 * x * (2 * x - x**2)) / m)
    assert integral == pytest.approx(5 / 6, abs=1e-9)
    n, p = 20_000, 5 / 6
    share = _win_share(Node("x", 2.0, 1.0), Node("y", 1.0, 2.0), n, seed=7)
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_descend_sprouts_at_the_root_of_a_new_tree():
    rng = np.random.default_rng(0)
    assert descend(Tree.new(), rng) == Descent([], sprout=True)


def test_descend_returns_none_when_nothing_can_grow():
    rng = np.random.default_rng(0)
    tree = Tree.new()
    tree.root.unk().closed = True
    assert descend(tree, rng) is None
    tree = Tree.new(seed_domains=["a", "b"])
    tree.add_child(["a"], "x")
    for unk in (tree.root.unk(), tree.node(["a"]).unk(), tree.node(["b"]).unk(), tree.node(["a", "x"]).unk()):
        unk.closed = True
    assert list(tree.leaves()) == []
    assert descend(tree, rng) is None


def test_descend_reaches_a_leaf_when_unk_arms_are_hopeless():
    tree = chain_tree("a/b/c", "a/b/d", "e/f/g")
    for path in ([], ["a"], ["a", "b"], ["e"], ["e", "f"]):
        unk = tree.node(path).unk()
        unk.alpha, unk.beta = 1.0, 1e6
    rng = np.random.default_rng(5)
    ends = [descend(tree, rng) for _ in range(300)]
    assert all(d is not None and not d.sprout and len(d.path) == tree.depth for d in ends)
    assert {tuple(d.path) for d in ends} == {("a", "b", "c"), ("a", "b", "d"), ("e", "f", "g")}


def test_descend_skips_closed_subtrees_and_sprouts_where_open():
    tree = Tree.new(seed_domains=["dead", "live"])
    tree.node(["dead"]).unk().closed = True  # nothing below "dead" can grow
    tree.root.unk().closed = True
    rng = np.random.default_rng(1)
    assert {tuple(descend(tree, rng).path) for _ in range(50)} == {("live",)}
    assert descend(tree, rng).sprout


# --- likelihood-ratio rebirth -----------------------------------------------------------


def test_posterior_reference_mode_or_mean():
    assert posterior_reference(3, 9) == pytest.approx(0.2)  # mode (3−1)/(3+9−2)
    assert posterior_reference(22, 50) == pytest.approx(0.3)
    assert posterior_reference(1, 1) == 0.5  # boundary: mean
    assert posterior_reference(1, 5) == pytest.approx(1 / 6)
    assert posterior_reference(5, 1) == pytest.approx(5 / 6)
    assert posterior_reference(0.5, 2) == pytest.approx(0.2)


def test_lrt_statistic_against_hand_computation():
    window = [1] * 15 + [0] * 5
    assert lrt_statistic(window, 3, 9) == pytest.approx(hand_lrt(15, 20, 0.2))
    assert lrt_statistic(window, 3, 9) == pytest.approx(2 * (15 * math.log(0.75 / 0.2) + 5 * math.log(0.25 / 0.8)))
    assert lrt_statistic(window, 3, 9) == pytest.approx(28.0211671, abs=1e-6)
    assert lrt_statistic([0] * 10, 1, 1) == pytest.approx(20 * math.log(2))  # p0 = mean 0.5
    assert lrt_statistic([1] * 8, 1, 4) == pytest.approx(-16 * math.log(0.2))  # p0 = mean 0.2
    assert lrt_statistic([1, 0, 0, 1, 0], 3, 4) == pytest.approx(0.0, abs=1e-12)  # p̂ = mode = 0.4


def test_chi2_1_critical():
    assert chi2_1_critical(0.05) == pytest.approx(3.8414588, abs=1e-6)
    assert chi2_1_critical(0.01) == pytest.approx(6.6348966, abs=1e-6)


def test_maybe_rebirth_exactly_when_the_statistic_exceeds_the_critical_value():
    cfg = BanditConfig()
    crit = chi2_1_critical(cfg.significance)
    outcomes = {}
    for k in range(cfg.window + 1):
        window = [1] * k + [0] * (cfg.window - k)
        node = Node("n", 3.0, 9.0, window=list(window))
        stat = hand_lrt(k, cfg.window, 0.2)
        outcomes[k] = maybe_rebirth(node, cfg)
        assert outcomes[k] == (stat > crit), (k, stat)
        if outcomes[k]:
            assert (node.alpha, node.beta, node.rebirths) == (1.0 + k, 1.0 + cfg.window - k, 1)
        else:
            assert (node.alpha, node.beta, node.rebirths) == (3.0, 9.0, 0)
        assert node.window == window
    # k = 1 gives 3.76 (kept), k = 0 gives 8.93 and k = 8 gives 4.19 (reborn)
    assert [k for k, r in outcomes.items() if not r] == [1, 2, 3, 4, 5, 6, 7]


def test_maybe_rebirth_waits_for_a_full_window():
    cfg = BanditConfig()
    node = Node("n", 3.0, 9.0, window=[1] * (cfg.window - 1))
    assert lrt_statistic(node.window, 3, 9) > 50
    assert not maybe_rebirth(node, cfg)
    assert (node.alpha, node.beta) == (3.0, 9.0)
    node.window.append(1)
    assert maybe_rebirth(node, cfg)
    assert (node.alpha, node.beta) == (21.0, 1.0)


# --- sprouts ------------------------------------------------------------------------------


def test_record_sprout_counts_and_closes_after_failures():
    cfg = BanditConfig(max_sprout_failures=3)
    tree = Tree.new()
    unk = tree.root.unk()
    record_sprout(tree, [], False, cfg)
    record_sprout(tree, [], False, cfg)
    assert (unk.alpha, unk.beta, unk.sprout_failures, unk.closed) == (1.0, 3.0, 2, False)
    tree.add_child([], "a")
    record_sprout(tree, [], True, cfg)  # a success resets the run of failures
    assert (unk.alpha, unk.beta, unk.sprout_failures, unk.closed) == (2.0, 3.0, 0, False)
    assert (unk.visits, unk.reward_sum) == (3, 1)
    record_sprout(tree, [], False, cfg)
    record_sprout(tree, [], False, cfg)
    assert not unk.closed
    record_sprout(tree, [], False, cfg)
    assert (unk.beta, unk.sprout_failures, unk.closed) == (6.0, 3, True)


def test_record_sprout_closes_a_full_parent():
    cfg = BanditConfig(max_children=2)
    tree = Tree.new(seed_domains=["a"])
    tree.add_child(["a"], "x")
    record_sprout(tree, ["a"], True, cfg)
    assert not tree.node(["a"]).unk().closed
    tree.add_child(["a"], "y")
    record_sprout(tree, ["a"], True, cfg)
    unk = tree.node(["a"]).unk()
    assert (unk.alpha, unk.closed) == (3.0, True)
    assert not tree.root.unk().closed


def test_record_sprout_needs_an_unk():
    tree = chain_tree("a/b/c")
    with pytest.raises(ValueError, match="no unk child"):
        record_sprout(tree, ["a", "b", "c"], True, BanditConfig())


def test_unk_state_survives_the_round_trip():
    tree = Tree.new(seed_domains=["a"])
    cfg = BanditConfig(max_sprout_failures=2)
    record_sprout(tree, ["a"], False, cfg)
    record_sprout(tree, ["a"], False, cfg)
    back = Tree.from_dict(copy.deepcopy(tree.to_dict()))
    unk = back.node(["a"]).unk()
    assert (unk.beta, unk.sprout_failures, unk.closed) == (3.0, 2, True)
    assert descend(back, np.random.default_rng(0)) == Descent([], sprout=True)
