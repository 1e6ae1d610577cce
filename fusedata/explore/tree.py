"""The Bohdi domain tree: root → domain → subdomain → leaf, each node a Beta(α, β) arm.

Every non-leaf node has an `unk` child: drawing it means "this node needs a new child"
(sprouting). A node's posterior counts how often harvesting below it showed a weakness of
the target (reward 1) — Thompson sampling then spends the budget where the target is weak.
The tree serialises to plain JSON so a run can be resumed and inspected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

UNK = "unk"


@dataclass
class Node:
    name: str
    alpha: float = 1.0
    beta: float = 1.0
    children: list[Node] = field(default_factory=list)
    window: list[int] = field(default_factory=list)  # most recent rewards, oldest first
    visits: int = 0
    reward_sum: int = 0
    rebirths: int = 0
    sprout_failures: int = 0  # unk only: failures since the last success
    closed: bool = False  # unk only: the parent has stopped sprouting

    @property
    def is_unk(self) -> bool:
        return self.name == UNK

    @property
    def real_children(self) -> list[Node]:
        return [c for c in self.children if not c.is_unk]

    def child(self, name: str) -> Node | None:
        key = name.casefold()
        return next((c for c in self.children if c.name.casefold() == key), None)

    def unk(self) -> Node | None:
        return next((c for c in self.children if c.is_unk), None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "alpha": self.alpha, "beta": self.beta, "visits": self.visits,
                             "reward_sum": self.reward_sum, "rebirths": self.rebirths, "window": list(self.window)}
        if self.is_unk:
            d.update(sprout_failures=self.sprout_failures, closed=self.closed)
        if self.children:
            d["children"] = [c.to_dict() for c in self.children]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        return cls(name=d["name"], alpha=float(d["alpha"]), beta=float(d["beta"]),
                   children=[cls.from_dict(c) for c in d.get("children", [])], window=list(d.get("window", [])),
                   visits=int(d.get("visits", 0)), reward_sum=int(d.get("reward_sum", 0)),
                   rebirths=int(d.get("rebirths", 0)), sprout_failures=int(d.get("sprout_failures", 0)),
                   closed=bool(d.get("closed", False)))


@dataclass
class Tree:
    root: Node
    depth: int = 3  # levels below the root; nodes at this level are leaves

    @classmethod
    def new(cls, depth: int = 3, seed_domains: list[str] | None = None) -> Tree:
        tree = cls(Node("root", children=[Node(UNK)]), depth)
        for name in seed_domains or []:
            if tree.root.child(name) is None:
                tree.add_child([], name)
        return tree

    def node(self, path: list[str]) -> Node:
        """The node at a path of names below the root (a KeyError names the missing part)."""
        node = self.root
        for i, name in enumerate(path):
            nxt = node.child(name)
            if nxt is None:
                raise KeyError(f"no node {'/'.join(path[: i + 1])!r}")
            node = nxt
        return node

    def nodes_on(self, path: list[str]) -> list[Node]:
        """The nodes along a path, root excluded."""
        out, node = [], self.root
        for name in path:
            node = node.child(name)  # type: ignore[assignment]
            if node is None:
                raise KeyError(f"no node {'/'.join(path)!r}")
            out.append(node)
        return out

    def add_child(self, parent_path: list[str], name: str) -> Node:
        """A new node under the parent; it gets its own `unk` unless it is a leaf."""
        if len(parent_path) >= self.depth:
            raise ValueError(f"{'/'.join(parent_path)!r} is a leaf; leaves have no children")
        parent = self.node(parent_path)
        if parent.child(name) is not None or name.casefold() == UNK:
            raise ValueError(f"{'/'.join(parent_path + [name])!r} exists already")
        node = Node(name)
        if len(parent_path) + 1 < self.depth:
            node.children.append(Node(UNK))
        unk_index = next((i for i, c in enumerate(parent.children) if c.is_unk), len(parent.children))
        parent.children.insert(unk_index, node)  # unk stays last
        return node

    def can_grow(self, node: Node, level: int) -> bool:
        """Whether a descent into `node` (at `level`, root = 0) can still reach a harvest or a sprout."""
        if node.is_unk:
            return not node.closed
        if level >= self.depth:
            return True
        return any(self.can_grow(c, level + 1) for c in node.children)

    def leaves(self) -> Iterator[list[str]]:
        """Paths of every leaf."""
        def walk(node: Node, path: list[str]) -> Iterator[list[str]]:
            for c in node.real_children:
                p = path + [c.name]
                if len(p) == self.depth:
                    yield p
                else:
                    yield from walk(c, p)
        yield from walk(self.root, [])

    def to_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "root": self.root.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tree:
        return cls(Node.from_dict(d["root"]), int(d["depth"]))
