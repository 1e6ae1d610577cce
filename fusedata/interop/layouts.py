"""The layouts `fusedata export` writes: each is a schema and a function from a decoded shard to it.

A layout gets the source shard's table (its base columns) and its decoded `TopK`, and returns the rows
to write; `run_stage` writes them against the layout's schema. The manifest kind is the layout's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from fusedata.interop.plain import topk_columns
from fusedata.topk import PAD_ID, TopK
from schemas import plain
from schemas.common import column, with_kind


@dataclass(frozen=True)
class Layout:
    kind: str  # manifest kind of the exported dataset
    schema: Callable[[str, int, dict[bytes, bytes]], pa.Schema]  # (source kind, k, kept metadata) -> schema
    convert: Callable[[pa.Table, TopK, str, int], pa.Table]  # (source table, its top-k, source kind, k) -> rows
    summary: str  # what it keeps and loses, for --help and the README
    topk_columns: tuple[str, ...] = ()  # its columns holding the distributions (inspect's "top-k" bytes)


def to_plain(table: pa.Table, topk: TopK, kind: str, k: int) -> pa.Table:
    """The source's base columns as they are, then the four top-k list columns."""
    base = {f.name: table.column(f.name) for f in plain.base_fields(kind)}
    return pa.table(base | topk_columns(topk))


# -- axolotl's knowledge-distillation plugin (axolotl.integrations.kd) -----------------------------
# Its tokenized rows: input_ids, attention_mask, labels [n] and, per position i, target_token_ids /
# target_logprobs / target_mask [n][≤k]. Its KD trainer (AxolotlKDTrainer.compute_loss -> the fused
# linear top-k KL of kernels/liger.py) pairs the student's hidden state i with target row i unshifted
# and shifts only the labels, for its CE term. So row i must be the teacher's distribution made at
# position i, i.e. of token i + 1 (fusedata's position i); the last row, which predicts no token, is
# masked. The log-probs are renormalised over the listed ids (its trainer expects them normalised).
# Its DataCollatorForKD pads the k axis (with AXOLOTL_PAD_LOGPROB) and the sequence axis.
AXOLOTL_PAD_LOGPROB = -1e9  # what axolotl's collator pads target_logprobs with (no -inf)


def axolotl_schema(kind: str, k: int, meta: dict[bytes, bytes]) -> pa.Schema:
    if kind == "aligned":
        raise ValueError("an aligned dataset has no input_ids; export the fused or topk dataset")
    ints, nested = pa.list_(pa.int32()), pa.list_(pa.list_(pa.int32()))
    return with_kind(pa.schema([
        column("input_ids", ints, "target tokens", "[n]"),
        column("attention_mask", ints, "1 for every token", "[n]"),
        column("labels", ints, "the tokens themselves (the trainer shifts them for its CE term)", "[n]"),
        column("target_token_ids", nested,
               "per position i: the teacher's top ids for token i + 1 (the last row: none)", "[n][≤k]"),
        column("target_logprobs", pa.list_(pa.list_(pa.float32())),
               "their log-probs renormalised over the listed ids (the last row: padding)", "[n][≤k]"),
        column("target_mask", nested, "1 for a real entry, 0 in the last row", "[n][≤k]"),
    ]), "axolotl-kd", 1, meta, k)


def to_axolotl(table: pa.Table, topk: TopK, kind: str, k: int) -> pa.Table:
    import numpy as np

    ids = table.column("input_ids").combine_chunks()
    n = ids.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)  # [W]
    if not np.array_equal(topk.lengths + 1, n):
        raise ValueError("axolotl layout: a window's positions must be len(input_ids) − 1")
    valid = topk.ids != PAD_ID  # [N, k]
    lp = np.where(valid, topk.logprobs.astype(np.float64), -np.inf)
    renorm = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)  # log q_i / Σ q
    # one masked row after every window's positions: row i is the distribution made at position i
    W = len(n)
    ends = np.cumsum(topk.lengths)  # [W] where each window's positions end
    last = np.zeros((W, k), dtype=bool)
    last[:, 0] = True  # the dummy row lists one entry (id 0, mask 0)
    rows_valid = np.insert(valid, ends, last, axis=0)  # [N+W, k]
    rows_ids = np.insert(np.where(valid, topk.ids, 0), ends, 0, axis=0)
    rows_lp = np.insert(np.where(valid, renorm, 0.0), ends, AXOLOTL_PAD_LOGPROB, axis=0)
    rows_mask = np.insert(valid.astype(np.int32), ends, 0, axis=0)
    per_row = rows_valid.sum(axis=1)
    windows = pa.array(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))
    positions = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))

    def nested(values, type_):
        return pa.ListArray.from_arrays(windows, pa.ListArray.from_arrays(positions, pa.array(values[rows_valid], type_)))

    ones = pa.ListArray.from_arrays(ids.offsets, pa.array(np.ones(int(n.sum()), np.int32)))
    return pa.table({"input_ids": ids, "attention_mask": ones, "labels": ids,
                     "target_token_ids": nested(rows_ids.astype(np.int32), pa.int32()),
                     "target_logprobs": nested(rows_lp.astype(np.float32), pa.float32()),
                     "target_mask": nested(rows_mask, pa.int32())})


# -- TRL (SFTTrainer, pre-tokenized) ------------------------------------------------------------
# TRL 1.16 has no offline-distillation input: its distillation trainers query a teacher model
# online. What its SFTTrainer reads from a file is a pre-tokenized `input_ids` column (its
# DataCollatorForLanguageModeling pads it and makes the labels): the λ = 1 (CLM) arm on the same windows.

def trl_schema(kind: str, k: int, meta: dict[bytes, bytes]) -> pa.Schema:
    if kind == "aligned":
        raise ValueError("an aligned dataset has no input_ids; export the fused or topk dataset")
    return with_kind(pa.schema([column("input_ids", pa.list_(pa.int32()), "target tokens", "[n]")]),
                     "trl-sft", 1, meta, k)


def to_trl(table: pa.Table, topk: TopK, kind: str, k: int) -> pa.Table:
    return pa.table({"input_ids": table.column("input_ids")})


LAYOUTS: dict[str, Layout] = {
    "plain": Layout("plain", plain.plain_schema, to_plain,
                    "every column of the source; the top-k as list<list<int32>> ids and list<list<float32>> "
                    "log-probs, gold log-prob and tail mass per position: loses nothing but the codec's compactness",
                    plain.TOPK_NAMES),
    "axolotl": Layout("axolotl-kd", axolotl_schema, to_axolotl,
                      "axolotl's KD plugin columns (input_ids, attention_mask, labels, target_token_ids, "
                      "target_logprobs renormalised over the listed ids, target_mask): loses the tail mass, "
                      "gold log-prob, fused winners/weights, document ids and offsets",
                      ("target_token_ids", "target_logprobs", "target_mask")),
    "trl": Layout("trl-sft", trl_schema, to_trl,
                  "TRL SFTTrainer's pre-tokenized input_ids (TRL reads no offline top-k): CLM on the same "
                  "windows only, loses every top-k column"),
}
