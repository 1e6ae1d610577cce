"""Alignment of one model's top-k distributions onto another model's tokens and vocabulary.

Pure functions over numpy arrays (no Ray, no model weights; tokenizers only for the maps):

- `tokens`:   the surface (bytes) of every token id, any HF fast tokenizer family
- `sequence`: token alignment (`dtw_align` = FuseLLM's DTW exactly, `byte_align`) and the
              position rule (`match_positions` / `match_predictions` / `match_from_alignment`)
- `vocab`:    source id -> target id maps, `exact` (EM) and `mined` (MinED), cached on disk
- `project`:  source top-k on target positions in target ids (merge by adding, label fallback)
"""

from fusedata.align.project import Projection, WindowStats, project
from fusedata.align.sequence import (
    FALLBACK,
    KIND_NAMES,
    MANY_TO_ONE,
    ONE_TO_MANY,
    ONE_TO_ONE,
    Alignment,
    PositionMatch,
    byte_align,
    dtw_align,
    dtw_align_tokens,
    dtw_reference,
    match_from_alignment,
    match_positions,
    match_predictions,
)
from fusedata.align.tokens import TokenTable, token_table, tokenizer_family, tokenizer_hash
from fusedata.align.vocab import exact_map, mined_map, vocab_map

__all__ = [
    "FALLBACK", "KIND_NAMES", "MANY_TO_ONE", "ONE_TO_MANY", "ONE_TO_ONE", "Alignment", "PositionMatch",
    "Projection", "TokenTable", "WindowStats", "byte_align", "dtw_align", "dtw_align_tokens", "dtw_reference",
    "exact_map", "match_from_alignment", "match_positions", "match_predictions", "mined_map", "project",
    "token_table", "tokenizer_family", "tokenizer_hash", "vocab_map",
]
