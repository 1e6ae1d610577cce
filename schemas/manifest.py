"""The `_manifest.json` every dataset folder holds, written last.

Its presence means the dataset is complete. It records what produced the data (inputs,
model and tokenizer identity, k, codec), what is in it (rows, tokens, shards with sha256)
and summary statistics, so later stages can refuse mismatched inputs with a clear reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

MANIFEST_VERSION = 1
MANIFEST_NAME = "_manifest.json"  # leading underscore: pyarrow and duckdb folder readers skip it


@dataclass
class ShardEntry:
    name: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    input_sha256: str = ""  # extract: sha256 of the input its worker read (schemas/topk.py INPUT_KEY); else ""


@dataclass
class Manifest:
    kind: str  # "topk", "aligned", "fused", ...
    fusedata_version: str
    run: dict[str, Any]  # the run's identity: everything that changes the output
    shards: list[ShardEntry]
    stats: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    manifest_version: int = MANIFEST_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        d = asdict(self)
        for entry in d["shards"]:  # only extract shards record their input
            if not entry["input_sha256"]:
                del entry["input_sha256"]
        d["rows"], d["tokens"] = self.rows, self.tokens
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
            if d.get("manifest_version", 0) > MANIFEST_VERSION:
                raise ValueError(f"manifest version {d['manifest_version']} is newer than this fusedata reads")
            return cls(
                kind=d["kind"],
                fusedata_version=d["fusedata_version"],
                run=d["run"],
                shards=[ShardEntry(**s) for s in d["shards"]],
                stats=d.get("stats", {}),
                created=d.get("created", ""),
                manifest_version=d.get("manifest_version", MANIFEST_VERSION),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: not a valid fusedata manifest ({exc})") from None

    @classmethod
    def read(cls, folder: str | PurePath | Any) -> Manifest:
        """The manifest in `folder`: a path, or a fusedata.storage.Location (any filesystem)."""
        base = Path(folder) if isinstance(folder, str | PurePath) else folder
        path = base / MANIFEST_NAME
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))
