"""Arrow/Parquet schemas of every dataset fusedata writes, and the manifest schema.

Writers build their tables against these schemas and tests check files against them.
Each dataset kind carries a version in its schema metadata (`fusedata.schema`).
"""

from schemas.manifest import MANIFEST_VERSION, Manifest, ShardEntry
from schemas.topk import TOPK_SCHEMA_VERSION, topk_schema

__all__ = ["MANIFEST_VERSION", "Manifest", "ShardEntry", "TOPK_SCHEMA_VERSION", "topk_schema"]
