"""`fusedata inspect` for an explore folder: where the budget went, what it found, and how
far the judge can be trusted — read only from the files a run leaves behind (tree.json,
state.json, history/ and sft/ shards), so it works on a running, killed or finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fusedata.errors import UsageError
from fusedata.explore.tree import Node, Tree

STATE_KEYS = ("round", "harvested", "events", "budget")
HISTORY_COLUMNS = ["event", "kind", "path", "success", "reward", "rebirths"]
SFT_COLUMNS = ["winner", "source_won", "shown_winner", "swapped_winner"]


def is_explore_dir(path: str | Path) -> bool:
    """An explore output folder: `inspect` tells it from a dataset by its tree and checkpoint."""
    folder = Path(path)
    return (folder / "tree.json").is_file() and (folder / "state.json").is_file()


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file}: not readable JSON ({exc})") from None


def load_tree(path: str | Path) -> Tree:
    """The tree of the last finished round."""
    file = Path(path) / "tree.json"
    data = _read_json(file)
    try:
        return Tree.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{file}: not a domain tree ({exc!r})") from None


def _read_shards(folder: Path, columns: list[str]) -> dict[str, list[Any]]:
    """Columns of every shard-*.parquet in a folder, concatenated in shard order."""
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for file in sorted(folder.glob("shard-*.parquet")):
        try:
            table = pq.read_table(file, columns=columns)
        except Exception as exc:  # pyarrow raises several types for damaged or foreign files
            raise UsageError(f"{file}: {exc}") from None
        for c in columns:
            out[c].extend(table.column(c).to_pylist())
    return out


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Every sprout and harvest event, ordered by its global event index."""
    cols = _read_shards(Path(path) / "history", HISTORY_COLUMNS)
    rows = [dict(zip(HISTORY_COLUMNS, values, strict=True)) for values in zip(*cols.values(), strict=True)]
    return sorted(rows, key=lambda r: r["event"])


def _rate(rewards: int, judged: int) -> float | None:
    return rewards / judged if judged else None


def pair_stats(sft: dict[str, list[Any]]) -> dict[str, Any]:
    """What the kept pairs say about the judging (`sft`: SFT_COLUMNS as lists): how often a source
    won, and how often the winner of the order shown first survived the reversed order."""
    winners = sft["winner"]
    rejudged = [(w, s) for w, s in zip(sft["shown_winner"], sft["swapped_winner"], strict=True) if s is not None]
    return {
        "source_won": _rate(sum(bool(x) for x in sft["source_won"]), len(winners)),
        "rejudged": len(rejudged),
        "judge_consistency": _rate(sum(w == s for w, s in rejudged), len(rejudged)),
        "winners": {w: winners.count(w) for w in sorted(set(winners))},
    }


def _counter() -> dict[str, Any]:
    return {"harvests": 0, "kept": 0, "rewards": 0, "judged": 0}


def summarize_explore(path: str | Path) -> dict[str, Any]:
    """Progress, per-domain and per-leaf harvests and reward rates, sprout and rebirth counts,
    and the judge's agreement with itself when answers were re-judged in swapped order."""
    folder = Path(path)
    state = _read_json(folder / "state.json")
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"{folder / 'state.json'}: missing {', '.join(missing)}")
    tree = load_tree(folder)

    # every domain and leaf of the tree is listed, in tree order, even before its first harvest
    domains = {c.name: _counter() for c in tree.root.real_children}
    leaves = {"/".join(p): _counter() for p in tree.leaves()}
    sprouts = {"success": 0, "failure": 0}
    rebirths: dict[str, int] = {}
    history = read_history(folder)
    for ev in history:
        for name in ev["rebirths"]:
            rebirths[name] = rebirths.get(name, 0) + 1
        if ev["kind"] == "sprout":
            sprouts["success" if ev["success"] else "failure"] += 1
            continue
        if ev["kind"] != "harvest" or not ev["path"]:
            continue
        for counter in (domains.setdefault(ev["path"][0], _counter()),
                        leaves.setdefault("/".join(ev["path"]), _counter())):
            counter["harvests"] += 1
            counter["kept"] += int(bool(ev["success"]))
            if ev["reward"] is not None:
                counter["judged"] += 1
                counter["rewards"] += int(ev["reward"])
    for table in (domains, leaves):
        for name, counter in table.items():
            counter["reward_rate"] = _rate(counter["rewards"], counter["judged"])
            try:
                node = tree.node(name.split("/"))
            except KeyError:  # in the history but not in the tree (should not happen)
                continue
            counter["posterior_mean"] = node.alpha / (node.alpha + node.beta)

    sft = _read_shards(folder / "sft", SFT_COLUMNS)
    judging = pair_stats(sft)
    return {
        "path": str(folder),
        "kind": "explore",
        "round": int(state["round"]),
        "harvested": int(state["harvested"]),
        "events": int(state["events"]),
        "budget": int(state["budget"]),
        "finished": (folder / "sft" / "_manifest.json").is_file(),
        "depth": tree.depth,
        "history_events": len(history),
        "harvest_events": sum(d["harvests"] for d in domains.values()),
        "domains": domains,
        "leaves": leaves,
        "sprouts": sprouts,
        "rebirths": sum(rebirths.values()),
        "rebirths_by_node": rebirths,
        "sft_pairs": len(sft["winner"]),
        "source_won_share": judging["source_won"],
        "rejudged": judging["rejudged"],
        "judge_consistency": judging["judge_consistency"],
    }


def _fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def node_label(node: Node) -> str:
    """One node as `inspect` prints it: name, posterior and how often it was chosen."""
    mean = node.alpha / (node.alpha + node.beta)
    label = f"{node.name}  α={node.alpha:g} β={node.beta:g}  mean {mean:.3f}  visits {node.visits}"
    if node.rebirths:
        label += f"  reborn {node.rebirths}"
    if node.is_unk and node.closed:
        label += "  [closed]"
    return label


def tree_lines(tree: Tree) -> list[str]:
    """The tree drawn like the `tree` command: one node per line, unk last under its parent."""
    lines = ["root"]

    def walk(node: Node, prefix: str) -> None:
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            lines.append(prefix + ("└── " if last else "├── ") + node_label(child))
            walk(child, prefix + ("    " if last else "│   "))

    walk(tree.root, "")
    return lines


def render_explore(summary: dict[str, Any], tree: Tree) -> str:
    """A short human report: progress, per-domain allocation, judge quality, then the tree."""
    s = summary
    lines = [
        f"{s['path']}: explore run, round {s['round']}, harvested {s['harvested']:,} of budget {s['budget']:,}, "
        f"{s['events']:,} events{'  (finished)' if s['finished'] else ''}",
        f"  sprouts {s['sprouts']['success']} ok / {s['sprouts']['failure']} failed   rebirths {s['rebirths']}",
        f"  SFT pairs {s['sft_pairs']:,}: a source won {_fmt_share(s['source_won_share'])}   "
        f"judge consistency {_fmt_share(s['judge_consistency'])} of {s['rejudged']} re-judged",
    ]
    if s["domains"]:
        width = max(len(name) for name in s["domains"])
        lines.append("  domains:")
        for name, d in s["domains"].items():
            lines.append(f"    {name:<{width}}  harvests {d['harvests']:>5}  kept {d['kept']:>5}  "
                         f"reward rate {_fmt_share(d['reward_rate']):>6}")
    lines.append("tree:")
    lines.extend("  " + line for line in tree_lines(tree))
    return "\n".join(lines)


def _layout(tree: Tree) -> list[tuple[Node, int, float, float | None]]:
    """(node, level, row, parent's row) for a left-to-right drawing, in preorder: terminal
    nodes one row apart in tree order, each parent centred on its first and last child."""
    placed: list[Any] = []
    next_row = [0.0]

    def place(node: Node, level: int) -> float:
        index = len(placed)
        placed.append(None)  # the parent's row is known only after its children are placed
        if node.children:
            rows = [place(c, level + 1) for c in node.children]
            row = (rows[0] + rows[-1]) / 2
            for i in range(index + 1, len(placed)):  # the direct children: tell them this row
                if placed[i][1] == level + 1:
                    placed[i] = (*placed[i][:3], row)
        else:
            row = next_row[0]
            next_row[0] += 1
        placed[index] = (node, level, row, None)
        return row

    place(tree.root, 0)
    return placed


def plot_explore(path: str | Path, out_dir: str | Path) -> list[Path]:
    """tree.png (the domain tree, coloured by posterior mean, sized by visits) and
    allocation.png (cumulative harvests per top-level domain over events, and reward rate)."""
    from fusedata.plots import pyplot, save_png

    plt = pyplot()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    folder, out = Path(path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tree = load_tree(folder)
    history = read_history(folder)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        written.append(save_png(fig, out / name))

    placed = _layout(tree)
    rows = max(row for _, _, row, _ in placed) + 1
    height = min(max(3.0, 0.22 * rows + 1.5), 90.0)  # a big tree gets a tall figure, then tighter rows
    font = min(9, max(4, int(72 * (height - 1.5) / rows * 0.75)))
    fig, ax = plt.subplots(figsize=(3.2 * (tree.depth + 1) + 1.5, height))
    cmap, norm = colormaps["RdYlGn_r"], Normalize(0.0, 1.0)  # red: the target is weak there
    most = max((n.visits for n, *_ in placed), default=0) or 1
    for _, level, y, parent_y in placed:
        if parent_y is not None:
            ax.plot([level - 1, level], [parent_y, y], color="#b0b0b0", lw=0.8, zorder=1)
    for node, level, y, _ in placed:
        mean = node.alpha / (node.alpha + node.beta)
        size = 30 + 370 * (node.visits / most) ** 0.5
        if node.is_unk and node.closed:
            ax.scatter([level], [y], s=size, color=cmap(norm(mean)), marker="x", linewidths=1.5, zorder=2)
        elif node.is_unk:
            ax.scatter([level], [y], s=size, facecolors="white", edgecolors=cmap(norm(mean)), linewidths=1.5,
                       zorder=2)
        else:
            ax.scatter([level], [y], s=size, color=cmap(norm(mean)), edgecolors="#404040", linewidths=0.5,
                       zorder=2)
        text = node.name + (" (closed)" if node.is_unk and node.closed else "")
        if node is not tree.root:
            text += f"  {mean:.2f}·{node.visits}"
        ax.annotate(text, (level, y), xytext=(7, 0), textcoords="offset points", va="center", fontsize=font,
                    color="#808080" if node.is_unk else "black")
    ax.set_xlim(-0.3, tree.depth + 0.9)
    ax.set_ylim(rows - 0.5, -0.5)
    levels = ["root", "domain", "subdomain", "leaf"] if tree.depth == 3 else [f"level {i}" for i in range(tree.depth + 1)]
    ax.set_xticks(range(tree.depth + 1), levels)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=min(0.6, 5.0 / height), pad=0.01,
                 label="posterior mean (labels: mean·visits)")
    ax.set_title(f"domain tree: {sum(1 for _ in tree.leaves())} leaves, size = visits, ○ unk, × closed unk")
    save(fig, "tree.png")

    harvests = [ev for ev in history if ev["kind"] == "harvest" and ev["path"]]
    domains = [c.name for c in tree.root.real_children]
    domains += sorted({ev["path"][0] for ev in harvests} - set(domains))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if harvests:
        events = [ev["event"] for ev in harvests]
        counts = {d: [] for d in domains}
        rewards = {d: [0, 0] for d in domains}  # rewards, judged
        rates: dict[str, list[float]] = {d: [] for d in domains}
        for ev in harvests:
            dom = ev["path"][0]
            if ev["reward"] is not None:
                rewards[dom][0] += int(ev["reward"])
                rewards[dom][1] += 1
            for d in domains:
                counts[d].append((counts[d][-1] if counts[d] else 0) + (d == dom))
                r, n = rewards[d]
                rates[d].append(r / n if n else float("nan"))
        # steps-post draws a value from its event to the next: repeat the last one a step further
        xs = events + [events[-1] + 1]
        top.stackplot(xs, *[counts[d] + counts[d][-1:] for d in domains], labels=domains, step="post", alpha=0.85)
        for d in domains:
            bottom.plot(xs, rates[d] + rates[d][-1:], label=d, drawstyle="steps-post")
        top.legend(loc="upper left", fontsize=8, ncol=max(1, len(domains) // 8))
    else:
        top.text(0.5, 0.5, "no harvests yet", ha="center", va="center", transform=top.transAxes)
    top.set_ylabel("cumulative harvests")
    top.set_title("budget allocation per domain")
    bottom.set_ylabel("reward rate so far")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("event index")
    save(fig, "allocation.png")
    return written
