"""`fusedata inspect`: what is in any fusedata dataset folder, for people and for machines.

A dataset in the codec (topk, aligned, fused) is summarised from its codec columns; an export
(`fusedata export --layout plain|axolotl|trl`) holds no codec, so it is summarised from its manifest
and run record: the layout, the source it was made from (kind and run digest) and the sizes of both."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fusedata.codec import codec_from_schema, decode_topk
from fusedata.dataset import open_dataset, read_shard, shard_metadata
from fusedata.errors import UsageError
from fusedata.interop.plain import topk_from_columns
from fusedata.storage import Location, locate
from schemas.common import k_of


def column_bytes(folder: Location, shard_names: list[str]) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over shards (from Parquet metadata)."""
    sizes: dict[str, int] = defaultdict(int)
    for name in shard_names:
        meta = shard_metadata(folder / name)
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                sizes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    return dict(sizes)


def _layout_of(kind: str) -> str | None:
    """The `--layout` name of an export's manifest kind (None for a dataset in the codec)."""
    from fusedata.interop.layouts import LAYOUTS

    return next((name for name, lay in LAYOUTS.items() if lay.kind == kind), None)


def _sizes(folder: Location, manifest: Any, names: list[str], k: int | None, positions: int,
           topk_columns: set[str]) -> dict[str, Any]:
    """The fields every summary has: what the folder holds and its bytes per position, in all and in
    the columns that carry the distributions (`topk_columns`)."""
    sizes = column_bytes(folder, names)
    topk_bytes = sum(v for c, v in sizes.items() if c in topk_columns)
    total = sum(s.bytes for s in manifest.shards)
    return {"path": str(folder), "kind": manifest.kind, "rows": manifest.rows, "tokens": manifest.tokens,
            "positions": positions, "k": k, "shards": len(names), "total_bytes": total,
            "bytes_per_token": total / max(positions, 1), "topk_bytes": topk_bytes,
            "topk_bytes_per_token": topk_bytes / max(positions, 1), "column_bytes": sizes}


def summarize(path: str | Path, verify: bool = True) -> dict[str, Any]:
    folder = locate(path)
    manifest = open_dataset(folder, verify=verify)
    names = [s.name for s in manifest.shards]
    schema = shard_metadata(folder / names[0]).schema.to_arrow_schema() if names else None
    try:
        k = k_of(schema) if schema is not None else None
    except ValueError as exc:
        raise UsageError(f"{folder / names[0]}: {exc}") from None
    layout = _layout_of(manifest.kind)
    if layout is not None:
        return _summarize_export(folder, manifest, names, k, layout)
    codec = codec_from_schema(schema, str(folder)) if schema is not None else None
    positions = int(manifest.stats.get("positions") or manifest.tokens - manifest.rows)
    return {
        **_sizes(folder, manifest, names, k, positions, {f.name for f in codec.fields()} if codec else set()),
        "codec": codec.spec() if codec else None,
        "model": manifest.run.get("model") or manifest.run.get("source", {}).get("model"),
        "method": (manifest.run.get("fuse") or {}).get("method"),
        "stats": manifest.stats,
        "fusedata_version": manifest.fusedata_version,
    }


def _summarize_export(folder: Location, manifest: Any, names: list[str], k: int | None,
                      layout: str) -> dict[str, Any]:
    """An export's summary: what `summarize` gives a codec dataset, with the layout and its source
    (kind, run digest, model and size) in place of the codec."""
    from fusedata.interop.layouts import LAYOUTS

    stats, run = manifest.stats, manifest.run
    positions = int(stats.get("positions") or max(manifest.tokens - manifest.rows, 0))
    source_run = run.get("source_run") or {}
    return {
        **_sizes(folder, manifest, names, k, positions, set(LAYOUTS[layout].topk_columns)),
        "layout": layout,
        "codec": None,
        "source": {"kind": run.get("of") or stats.get("of"), "digest": run.get("source_digest"),
                   "shards": len(run.get("source_shards") or []), "bytes": stats.get("source_bytes"),
                   "bytes_per_token": stats.get("source_bytes_per_token")},
        "model": source_run.get("model") or (source_run.get("source") or {}).get("model"),
        "method": (source_run.get("fuse") or {}).get("method"),
        "stats": stats.get("source_stats", {}),
        "fusedata_version": manifest.fusedata_version,
    }


def _render_export(summary: dict[str, Any]) -> str:
    src = summary["source"]
    digest = (src["digest"] or "?")[:16]
    lines = [
        f"{summary['path']}: {summary['layout']} export of a {src['kind']} dataset ({summary['model']})",
        f"  rows {summary['rows']:,}   positions {summary['positions']:,}   shards {summary['shards']}   "
        f"k {summary['k']}",
        f"  source run {digest}…, {src['shards']} shard(s), {src['bytes_per_token']:.2f} bytes/token"
        if src["bytes_per_token"] is not None else f"  source run {digest}…",
        f"  size {summary['total_bytes'] / 1e6:.2f} MB   {summary['bytes_per_token']:.2f} bytes/token "
        f"(top-k columns {summary['topk_bytes_per_token']:.2f})",
    ]
    biggest = sorted(summary["column_bytes"].items(), key=lambda kv: -kv[1])[:6]
    per_tok = ", ".join(f"{c} {v / max(summary['positions'], 1):.2f}" for c, v in biggest)
    lines.append(f"  bytes/token by column: {per_tok}")
    return "\n".join(lines)


def render(summary: dict[str, Any]) -> str:
    """A short human report."""
    if summary.get("layout"):
        return _render_export(summary)
    # an aligned dataset stores no token ids of its own: its size is the target positions it covers
    tokens = f"tokens {summary['tokens']:,}   " if summary["kind"] != "aligned" else ""
    lines = [
        f"{summary['path']}: {summary['kind']} dataset ({summary['model']})",
        f"  rows {summary['rows']:,}   {tokens}positions {summary['positions']:,}   shards {summary['shards']}",
        f"  k {summary['k']}   codec {summary['codec']['name']} v{summary['codec']['version']}",
        f"  size {summary['total_bytes'] / 1e6:.2f} MB   {summary['bytes_per_token']:.2f} bytes/token "
        f"(top-k columns {summary['topk_bytes_per_token']:.2f})",
    ]
    stats = summary["stats"]
    if summary["kind"] == "topk" and "mean_ce" in stats:
        lines.append(f"  mean CE {stats['mean_ce']:.3f} nats/token   docs {stats.get('docs')}")
    if summary["kind"] == "aligned" and "kinds" in stats:
        share = ", ".join(f"{k} {v:.1%}" for k, v in stats["kinds"].items())
        lines.append(f"  alignment: {share}   mass kept {stats.get('mass_kept', float('nan')):.3f}")
    if summary["kind"] == "fused" and "candidates" in stats:
        for c, w, s, ce in zip(stats["candidates"], stats["winning_share"], stats["mean_weights"],
                               stats["mean_candidate_ce"], strict=True):
            # AvgCE mixes every candidate by weight and has no winner: its weights are the figure
            wins = f"wins {w:.1%} of positions, " if summary.get("method") != "avgce" else ""
            lines.append(f"  candidate {c}: {wins}mean weight {s:.3f}, mean CE {ce:.3f}")
    biggest = sorted(summary["column_bytes"].items(), key=lambda kv: -kv[1])[:6]
    per_tok = ", ".join(f"{k} {v / max(summary['positions'], 1):.2f}" for k, v in biggest)
    lines.append(f"  bytes/token by column: {per_tok}")
    return "\n".join(lines)


def plot(path: str | Path, out_dir: str | Path, verify: bool = True) -> list[Path]:
    """PNG charts of a dataset; returns the files written."""
    from fusedata.plots import pyplot, save_png

    plt = pyplot()

    summary = summarize(path, verify=verify)
    folder, out = locate(path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = open_dataset(folder, verify=False)  # summarize verified it
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        written.append(save_png(fig, out / name))

    sizes = summary["column_bytes"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    cols = sorted(sizes, key=lambda c: -sizes[c])
    ax.barh(cols, [sizes[c] / max(summary["positions"], 1) for c in cols], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("bytes per token")
    ax.set_title(f"{summary['kind']}: {summary['bytes_per_token']:.1f} bytes/token in all")
    save(fig, "bytes_per_token.png")

    entropies, ces = [], []
    layout = summary.get("layout")
    for shard in manifest.shards if layout in (None, "plain") else []:  # trainer layouts: sizes only
        table = read_shard(folder / shard.name)
        topk = decode_topk(table, shard.name) if layout is None else topk_from_columns(table, summary["k"], shard.name)
        p = np.exp(topk.logprobs.astype(np.float64))  # [N, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
        entropies.append(ent)
        ces.append(-topk.gold_logprob.astype(np.float64))
    if entropies:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        axes[0].hist(np.concatenate(entropies), bins=50, color="#55a868")
        axes[0].set_title("entropy of the top-k (nats)")
        axes[1].hist(np.concatenate(ces), bins=50, color="#c44e52")
        axes[1].set_title("cross-entropy of the gold token (nats)")
        save(fig, "entropy_ce.png")

    stats = summary["stats"]
    if summary["kind"] == "fused" and "candidates" in stats:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(stats["candidates"], stats["winning_share" if any(stats["winning_share"]) else "mean_weights"],
               color="#8172b2")
        ax.set_ylabel("share of positions won" if any(stats["winning_share"]) else "mean weight")
        ax.set_title("fusion: which candidate the target learns from")
        save(fig, "winning_share.png")
    if summary["kind"] == "aligned" and "kinds" in stats:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(stats["kinds"]), list(stats["kinds"].values()), color="#dd8452")
        ax.set_ylabel("share of target positions")
        ax.set_title(f"alignment coverage (mass kept {stats.get('mass_kept', float('nan')):.2f})")
        save(fig, "alignment_coverage.png")
    return written
