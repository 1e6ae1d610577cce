"""Read a corpus (JSONL, Parquet, plain text; files, globs, folders) into a docs table.

The docs table has two columns, `doc_id` and `text`, in a deterministic order. Document ids
are stable across runs: the record's id field when present, else `<file>:<line>` (JSONL),
`<file>:<row>` (Parquet) or `<file>` (a text file is one document).
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fusedata.errors import UsageError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}
DOCS_SCHEMA = pa.schema([pa.field("doc_id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False)])


@dataclass
class CorpusStats:
    files: int = 0
    docs: int = 0
    empty_skipped: int = 0
    bad_skipped: int = 0
    bad_examples: list[str] = field(default_factory=list)


def expand_inputs(inputs: list[str]) -> list[tuple[Path, str]]:
    """Files named by paths, globs and folders, each with its display name for doc ids."""
    found: list[tuple[Path, str]] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            # like pyarrow's dataset reader, skip "_" and "." names: a fusedata folder's
            # _manifest.json / _run.json and half-written temporaries are not documents
            members = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                             and not any(part.startswith(("_", ".")) for part in f.relative_to(p).parts))
            if not members:
                raise UsageError(f"{spec}: folder holds no .jsonl, .parquet or .txt files")
            found += [(f, f.relative_to(p).as_posix()) for f in members]
        elif p.is_file():
            found.append((p, p.name))
        elif any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise UsageError(f"{spec}: the pattern matches no files")
            found += [(m, m.name) for m in matches]
        else:
            raise UsageError(f"{spec}: no such file or folder")
    return found


def _read_jsonl(path: Path, name: str, text_field: str, id_field: str, skip_bad: bool, stats: CorpusStats):
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("a line must hold a JSON object")
            if text_field not in record:
                raise ValueError(f"no '{text_field}' field (use --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"field '{text_field}' is not a string")
        except (UnicodeDecodeError, ValueError) as exc:
            reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            where = f"{path}:{lineno}: {reason}"
            if not skip_bad:
                raise UsageError(f"{where} (pass --skip-bad-lines to skip and count such lines)") from None
            stats.bad_skipped += 1
            if len(stats.bad_examples) < 5:
                stats.bad_examples.append(where)
            continue
        if id_field in record and record[id_field] is None:
            raise UsageError(f"{path}:{lineno}: the document id field '{id_field}' is null; give every record an id "
                             "(or leave the field out: ids are then file:line)")
        doc_id = str(record[id_field]) if id_field in record else f"{name}:{lineno}"
        yield doc_id, text


def _read_parquet(path: Path, name: str, text_field: str, id_field: str):
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None
    if text_field not in pf.schema_arrow.names:
        raise UsageError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})")
    has_id = id_field in pf.schema_arrow.names
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise UsageError(f"{path}: column '{text_field}' holds {kind}, not text (use --text-field)")
    try:
        table = pf.read(columns=[text_field] + ([id_field] if has_id else []))
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None
    texts = table.column(text_field).to_pylist()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        for row, value in enumerate(texts):
            try:
                texts[row] = None if value is None else value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path}: row {row}: column '{text_field}' is not valid UTF-8 at byte {exc.start}") from None
    ids = [f"{name}:{i}" for i in range(len(texts))]
    if has_id:
        raw = table.column(id_field).to_pylist()
        if None in raw:
            raise UsageError(f"{path}: row {raw.index(None)}: the document id column '{id_field}' is null; "
                             "give every row an id")
        ids = [str(v) for v in raw]
    yield from zip(ids, texts, strict=True)


def _read_text(path: Path, name: str):
    try:
        yield name, path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None


def read_corpus(
    inputs: list[str], text_field: str = "text", id_field: str = "id", skip_bad_lines: bool = False
) -> tuple[pa.Table, CorpusStats]:
    """All documents of the inputs, empty ones skipped and counted."""
    stats = CorpusStats()
    ids: list[str] = []
    texts: list[str] = []
    for path, name in expand_inputs(inputs):
        stats.files += 1
        kind = SUFFIXES.get(path.suffix, "text")
        if kind == "jsonl":
            records = _read_jsonl(path, name, text_field, id_field, skip_bad_lines, stats)
        elif kind == "parquet":
            records = _read_parquet(path, name, text_field, id_field)
        else:
            records = _read_text(path, name)
        for doc_id, text in records:
            if text is None or not text.strip():
                stats.empty_skipped += 1
                continue
            ids.append(doc_id)
            texts.append(text)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise UsageError(f"duplicate document id {dup!r}: give each record a unique id field or rename the files")
    if not ids:
        raise UsageError("the corpus holds no non-empty documents")
    stats.docs = len(ids)
    return pa.table({"doc_id": ids, "text": texts}, schema=DOCS_SCHEMA), stats


def shard_docs(docs: pa.Table, docs_per_shard: int) -> list[pa.Table]:
    """Split the docs table into consecutive shards (deterministic: same corpus, same shards)."""
    if docs_per_shard < 1:
        raise UsageError("--docs-per-shard must be at least 1")
    return [docs.slice(i, docs_per_shard) for i in range(0, docs.num_rows, docs_per_shard)]


def corpus_hash(docs: pa.Table) -> str:
    """Identity of the documents (ids and texts) an extract ran over."""
    h = hashlib.sha256()
    for doc_id, text in zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist(), strict=True):
        h.update(doc_id.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    return h.hexdigest()
