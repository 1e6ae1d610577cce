"""Writes zq-v2.parquet and zq-v2-expected.npz: a zq v2 file (top-k tables, model magic FDM2) and
what zq v2 decoded it to when it was written (commit cb647e3's code, before the sampled-targets
model), so tests/test_codec.py can check that old v2 files keep decoding exactly. Run once from the
repository root; the outputs are committed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_codec import synthetic_topk  # noqa: E402

from fusedata.codec import get_codec  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    t = synthetic_topk(n_windows=4, k=6, vocab=262_144, seed=22, max_len=40)
    t.ids[0, 4:] = -1  # a padded position
    t.logprobs[0, 4:] = -np.inf
    t.gold_logprob[2] = t.logprobs[2, -1] - 7  # gold far outside the top-k
    t.tail_mass[3] = 0.0
    codec = get_codec("zq@2")
    table = pa.table(codec.encode(t)).replace_schema_metadata({**codec.metadata(), b"fusedata.k": b"6"})
    pq.write_table(table, HERE / "zq-v2.parquet", compression="zstd")
    r = codec.decode(pq.read_table(HERE / "zq-v2.parquet"), 6)
    np.savez_compressed(HERE / "zq-v2-expected.npz", ids=r.ids, logprobs=r.logprobs, gold_logprob=r.gold_logprob,
                        tail_mass=r.tail_mass, lengths=r.lengths, original_ids=t.ids)


if __name__ == "__main__":
    main()
