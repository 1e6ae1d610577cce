"""The bandit over the domain tree: hierarchical Thompson sampling (DynaBranches), posterior
updates along a path, sprout bookkeeping, and Introspection-Rebirth.

All randomness comes from one `numpy.random.Generator` owned by the caller, so a run with
the same seed (and the same model outputs) makes the same choices, and a resumed run
continues the same stream from the state saved in its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fusedata.explore.tree import Node, Tree


@dataclass(frozen=True)
class Descent:
    """Where one Thompson descent ended: a leaf to harvest, or a parent that needs a new child."""

    path: list[str]  # the leaf's path, or the parent's path when `sprout`
    sprout: bool


def thompson_pick(candidates: list[Node], rng: np.random.Generator) -> int:
    """Index of the candidate whose Beta(α, β) sample is largest (first one on ties).
    One vectorised draw per level: the draws are consumed in candidate order."""
    samples = rng.beta([c.alpha for c in candidates], [c.beta for c in candidates])  # [C]
    return int(np.argmax(samples))


def choose_child(tree: Tree, path: list[str], rng: np.random.Generator) -> Node | None:
    """One DynaBranches step: sample the posterior of every child of the node at `path` that
    can still grow and return the best (possibly its `unk`); None when none can."""
    node = tree.node(path)
    live = [c for c in node.children if tree.can_grow(c, len(path) + 1)]
    if not live:
        return None
    return live[thompson_pick(live, rng)]


def descend(tree: Tree, rng: np.random.Generator) -> Descent | None:
    """DynaBranches from the root until a leaf (harvest) or an `unk` (sprout); None when
    nothing below the root can grow."""
    path: list[str] = []
    while len(path) < tree.depth:
        chosen = choose_child(tree, path, rng)
        if chosen is None:
            return None
        if chosen.is_unk:
            return Descent(path, sprout=True)
        path = path + [chosen.name]
    return Descent(path, sprout=False)


def posterior_reference(alpha: float, beta: float) -> float:
    """The posterior's mode (α−1)/(α+β−2) when it is interior (α, β > 1); otherwise the mean
    α/(α+β): a Beta(1, n) has its mode at 0, which no window of rewards could be tested against."""
    if alpha > 1 and beta > 1:
        return (alpha - 1) / (alpha + beta - 2)
    return alpha / (alpha + beta)


def _bernoulli_loglik(k: int, n: int, p: float) -> float:
    out = 0.0
    if k:
        out += k * math.log(p)
    if n - k:
        out += (n - k) * math.log1p(-p)
    return out


def lrt_statistic(window: list[int], alpha: float, beta: float) -> float:
    """2·[ℓ(p̂) − ℓ(p₀)]: the likelihood ratio of the window's own Bernoulli rate p̂ = k/n
    against the posterior's reference rate p₀; asymptotically χ²(1) when the posterior holds."""
    n, k = len(window), int(sum(window))
    p0 = min(max(posterior_reference(alpha, beta), 1e-9), 1 - 1e-9)
    return 2.0 * (_bernoulli_loglik(k, n, k / n) - _bernoulli_loglik(k, n, p0))


def chi2_1_critical(significance: float) -> float:
    """The (1 − significance) quantile of χ²(1): the square of a two-sided normal quantile."""
    return NormalDist().inv_cdf(1 - significance / 2) ** 2


@dataclass(frozen=True)
class BanditConfig:
    window: int = 20  # rewards kept per node for the rebirth test
    significance: float = 0.05  # of the likelihood-ratio test
    max_sprout_failures: int = 3  # consecutive failed sprouts before a parent stops sprouting
    max_children: int = 5  # real children per node; then the parent stops sprouting


def maybe_rebirth(node: Node, cfg: BanditConfig) -> bool:
    """Introspection-Rebirth: once the window is full, a posterior the recent rewards reject
    is reborn as Beta(1 + k, 1 + n − k) from the window alone (stale evidence dropped)."""
    if len(node.window) < cfg.window:
        return False
    if lrt_statistic(node.window, node.alpha, node.beta) <= chi2_1_critical(cfg.significance):
        return False
    k = int(sum(node.window))
    node.alpha, node.beta = 1.0 + k, 1.0 + len(node.window) - k
    node.rebirths += 1
    return True


def update_path(tree: Tree, path: list[str], reward: int, cfg: BanditConfig) -> list[str]:
    """α += r, β += 1 − r on every node of the path; returns the paths ("a/b") reborn."""
    if reward not in (0, 1):
        raise ValueError(f"reward must be 0 or 1, got {reward!r}")
    reborn = []
    for depth, node in enumerate(tree.nodes_on(path), start=1):
        node.alpha += reward
        node.beta += 1 - reward
        node.visits += 1
        node.reward_sum += reward
        node.window = (node.window + [reward])[-cfg.window:]
        if maybe_rebirth(node, cfg):
            reborn.append("/".join(path[:depth]))
    return reborn


def record_sprout(tree: Tree, parent_path: list[str], success: bool, cfg: BanditConfig) -> None:
    """Update the parent's `unk` arm: α += 1 on success, β += 1 on failure; close it after
    repeated failures or when the parent is full."""
    parent = tree.node(parent_path)
    unk = parent.unk()
    if unk is None:
        raise ValueError(f"{'/'.join(parent_path) or 'root'!r} has no unk child")
    unk.visits += 1
    if success:
        unk.alpha += 1
        unk.reward_sum += 1
        unk.sprout_failures = 0
    else:
        unk.beta += 1
        unk.sprout_failures += 1
    if unk.sprout_failures >= cfg.max_sprout_failures or len(parent.real_children) >= cfg.max_children:
        unk.closed = True
