"""Schemas of what `fusedata explore` writes into its output folder.

    explore/
      _run.json            the run's identity (models, depth, seed, ...; not the budget)
      state.json           checkpoint: round, RNG state, tree with posteriors (written last each round)
      tree.json            the same tree, for people and `fusedata inspect`
      sft/shard-*.parquet  one shard per round: the kept question/answer pairs (kind "sft")
      docs/shard-*.parquet the same pairs as documents `fusedata extract` reads (id, text)
      history/shard-*.parquet one shard per round: every sprout and harvest event

Shards are named by round, so a killed round is redone to the same name on resume.
`sft/` and `docs/` get a `_manifest.json` when the budget is reached.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.common import with_kind

SFT_SCHEMA_VERSION = 1
HISTORY_SCHEMA_VERSION = 1
DOCS_SCHEMA_VERSION = 1

SFT_SCHEMA = with_kind(pa.schema([
    pa.field("id", pa.string(), nullable=False),  # "r<round>-<i>", stable across resumes
    pa.field("prompt", pa.string(), nullable=False),  # the leader's question
    pa.field("response", pa.string(), nullable=False),  # the best-scored answer
    pa.field("domain_path", pa.list_(pa.string()), nullable=False),  # [depth] domain → ... → leaf
    pa.field("style", pa.string(), nullable=False),  # question style the leader was asked for
    pa.field("leader", pa.string(), nullable=False),  # model that wrote the question
    pa.field("winner", pa.string(), nullable=False),  # model whose answer is `response`
    pa.field("source_won", pa.bool_(), nullable=False),  # a source beat the target: reward 1
    pa.field("reward", pa.int8(), nullable=False),
    pa.field("models", pa.list_(pa.string()), nullable=False),  # [M] answerers in the order shown to the judge
    pa.field("answers", pa.list_(pa.string()), nullable=False),  # [M] same order
    pa.field("scores", pa.list_(pa.float32()), nullable=False),  # [M] judge's probability per answer (re-judged: mean of both orders)
    pa.field("judge", pa.string(), nullable=False),
    pa.field("shown_winner", pa.string(), nullable=False),  # winner of the judgement in `models` order alone
    pa.field("swapped_winner", pa.string()),  # winner of the reversed-order judgement alone; null if not re-judged
    pa.field("round", pa.int32(), nullable=False),
]), "sft", SFT_SCHEMA_VERSION)

HISTORY_SCHEMA = with_kind(pa.schema([
    pa.field("round", pa.int32(), nullable=False),
    pa.field("event", pa.int64(), nullable=False),  # global event index, in order
    pa.field("kind", pa.string(), nullable=False),  # "harvest" | "sprout"
    pa.field("path", pa.list_(pa.string()), nullable=False),  # harvest: the leaf path; sprout: the parent path
    pa.field("success", pa.bool_(), nullable=False),  # sprout: a name was added; harvest: a pair was kept
    pa.field("reward", pa.int8()),  # harvest: 1 if a source beat the target; null for sprouts
    pa.field("detail", pa.string(), nullable=False),  # sprout: the new name or why it failed; harvest: winner
    pa.field("rebirths", pa.list_(pa.string()), nullable=False),  # nodes ("a/b") whose posterior was reset
]), "explore-history", HISTORY_SCHEMA_VERSION)

DOCS_SCHEMA = with_kind(pa.schema([
    pa.field("id", pa.string(), nullable=False),  # = sft id (the field name extract reads by default)
    pa.field("text", pa.string(), nullable=False),  # question, blank line, answer
]), "docs", DOCS_SCHEMA_VERSION)
