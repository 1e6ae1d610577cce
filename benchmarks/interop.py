"""Bytes per predicted position of the plain layout beside the compact `zq` codec, on real datasets.

Each dataset is exported plain (`fusedata export --layout plain`) into a temporary folder and imported
back; sizes are read from the Parquet footers, split into the top-k columns (the codec's struct
column, or the four plain lists) and everything else (ids, offsets, CE, fused winners...), so the table
shows what the layout itself costs. Also times export and import (shared machine: note the load).

    .venv/bin/python benchmarks/interop.py [DATASET ...]   (default: out/bench-fusion's topk/aligned/fused)

Writes benchmarks/results/interop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from fusedata.interop.export import ExportJob, ImportJob, run_export, run_import
from schemas.manifest import Manifest
from schemas.plain import TOPK_NAMES

DEFAULTS = ["/work/main/out/bench-fusion/topk/smollm2", "/work/main/out/bench-fusion/topk/gemma3",
            "/work/main/out/bench-fusion/aligned/gemma3", "/work/main/out/bench-fusion/fused-mince"]


def column_bytes(folder: Path) -> dict[str, int]:
    """Compressed bytes per top-level column over every shard of a dataset folder."""
    sizes: dict[str, int] = {}
    for shard in sorted(folder.glob("shard-*.parquet")):
        meta = pq.read_metadata(shard)
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                top = col.path_in_schema.split(".")[0]
                sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return sizes


def split(sizes: dict[str, int], topk_cols: set[str]) -> tuple[int, int]:
    top = sum(v for k, v in sizes.items() if k in topk_cols)
    return top, sum(sizes.values()) - top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="*", default=[d for d in DEFAULTS if Path(d).is_dir()])
    args = ap.parse_args()
    rows = []
    quiet = {"quiet": True, "log": lambda m: None}
    with tempfile.TemporaryDirectory() as tmp:
        for i, src in enumerate(args.datasets):
            src = Path(src)
            m = Manifest.read(src)
            positions = int(m.stats.get("positions") or m.tokens - m.rows)
            k = int(m.run.get("top_k") or 0)
            plain, back = Path(tmp) / f"plain{i}", Path(tmp) / f"zq{i}"
            t0 = time.perf_counter()
            run_export(ExportJob(str(src), str(plain), **quiet))
            t1 = time.perf_counter()
            run_import(ImportJob(str(plain), str(back), **quiet))
            t2 = time.perf_counter()
            zq_top, zq_rest = split(column_bytes(src), {"topk_zq"})
            pl_top, pl_rest = split(column_bytes(plain), set(TOPK_NAMES))
            zq_file = sum(s.bytes for s in m.shards)
            pl_file = sum(s.bytes for s in Manifest.read(plain).shards)
            rows.append({"dataset": str(src), "kind": m.kind, "k": k, "positions": positions,
                         "zq_topk_bpp": zq_top / positions, "plain_topk_bpp": pl_top / positions,
                         "other_bpp": zq_rest / positions, "zq_file_bpp": zq_file / positions,
                         "plain_file_bpp": pl_file / positions, "plain_over_zq_topk": pl_top / max(zq_top, 1),
                         "export_s": round(t1 - t0, 2), "import_s": round(t2 - t1, 2)})
    print("| dataset | kind | k | positions | top-k zq B/pos | top-k plain B/pos | plain/zq | other columns B/pos "
          "| file zq B/pos | file plain B/pos | export s | import s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['dataset']).parent.name}/{Path(r['dataset']).name} | {r['kind']} | {r['k']} | "
              f"{r['positions']:,} | {r['zq_topk_bpp']:.1f} | {r['plain_topk_bpp']:.1f} | "
              f"{r['plain_over_zq_topk']:.2f}× | {r['other_bpp']:.1f} | {r['zq_file_bpp']:.1f} | "
              f"{r['plain_file_bpp']:.1f} | {r['export_s']} | {r['import_s']} |")
    load = os.getloadavg()[0]
    print(f"(load average {load:.2f} while measuring)")
    out = Path(__file__).parent / "results" / "interop.json"
    out.write_text(json.dumps({"load_avg_1m": load, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
