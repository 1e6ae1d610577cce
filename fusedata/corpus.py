"""A corpus (JSONL, Parquet, plain text; files, globs, folders, local or URIs): its listing, a shard
plan made from that listing, and the reader a worker runs on its own share of the plan.

The driver never reads the documents. It lists the files (`list_inputs`: names, sizes, modification
times) and plans shards (`plan_corpus`) from the listing, Parquet footers and the first MiB of each
JSONL file (the probe: line starts for exact cuts there, the mean line length beyond, and an early
check of the format so a wrong --text-field fails before anything is written). A shard is a tuple
of `Piece`s: Parquet row ranges, whole text files, JSONL byte ranges. A JSONL range is read
Hadoop-style: it starts at the first line that begins at or after its start and takes every line
that begins before its end, so consecutive ranges read every line exactly once whatever the cuts.

Document ids are stable across runs: the record's id field when present, else `<file>:<line>`
(JSONL), `<file>:<row>` (Parquet) or `<file>` (a text file is one document).
"""

from __future__ import annotations

import bisect
import codecs
import fnmatch
import functools
import glob
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fusedata.errors import UsageError
from fusedata.storage import Location, is_uri, resolve, shown

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}
DOCS_SCHEMA = pa.schema([pa.field("doc_id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False)])
PROBE_BYTES = 1 << 20  # bytes of each JSONL file the planner reads (line starts, format check)
PROBE_TEXT_FILES = 1000  # text files (one document each) whose head the planner checks is UTF-8
PLAN_IDS = 100_000  # document ids the planner keeps to refuse duplicates before the run (tens of MB at most)
_BLOCK = 8 << 20  # read size when a worker scans for a line start or counts lines


@dataclass
class CorpusStats:
    files: int = 0
    docs: int = 0
    empty_skipped: int = 0
    bad_skipped: int = 0
    bad_examples: list[str] = field(default_factory=list)
    bytes_read: int = 0
    sha256: str = ""  # of the input bytes read (JSONL lines, text files) or values (Parquet ids, texts)
    content: int = 0  # content_digest of the documents read: what they are, not where or how they were stored

    def add(self, other: CorpusStats) -> None:
        self.docs += other.docs
        self.empty_skipped += other.empty_skipped
        self.bad_skipped += other.bad_skipped
        self.bad_examples += other.bad_examples[: max(0, 5 - len(self.bad_examples))]
        self.bytes_read += other.bytes_read
        self.content = (self.content + other.content) % (1 << CONTENT_BITS)


CONTENT_BITS = 256


def content_digest(ids: list[str], texts: list[str]) -> int:
    """The documents' content identity: the sum, modulo 2**256, of a 256-bit hash of each document's
    id and text. A sum does not depend on the order of the documents or on how they were cut into
    shards, so the shards' digests add up to the corpus's whatever `--docs-per-shard`, the file
    format, the path or the storage; two corpora agree only if they hold the same (id, text) pairs,
    which is what aligning two extracts by document id and byte offset needs."""
    total = 0
    for doc_id, text in zip(ids, texts, strict=True):
        key, body = doc_id.encode(), text.encode()
        h = hashlib.blake2b(len(key).to_bytes(8, "little") + key + body, digest_size=CONTENT_BITS // 8)
        total += int.from_bytes(h.digest(), "little")
    return total % (1 << CONTENT_BITS)


def add_content(a: str, b: str) -> str:
    """Two content digests (64 hex digits) combined: the digest of both sets of documents."""
    return f"{(int(a, 16) + int(b, 16)) % (1 << CONTENT_BITS):064x}"


@dataclass(frozen=True)
class InputFile:
    """One listed input file: where it is, its name in document ids, and what the listing says."""

    root: str  # what the user named (a worker resolves it again to get the filesystem)
    path: str  # the file's path on that filesystem
    name: str  # display name for document ids
    kind: str  # jsonl | parquet | text
    size: int
    mtime_ns: int

    @property
    def shown(self) -> str:
        """The file as error messages name it: a local path or a URI."""
        return f"{self.root.split('://', 1)[0]}://{self.path}" if is_uri(self.root) else self.path

    def location(self) -> Location:
        """The file on the filesystem its root names (settings given in the root's URI included)."""
        fs = _filesystem(self.root)
        if isinstance(fs, pafs.LocalFileSystem):
            return Location(fs, self.path, "", self.path)
        return Location(fs, self.path, self.root.split("://", 1)[0], self.shown)


@dataclass(frozen=True)
class Piece:
    """A worker's share of one file: rows [start, end) of a Parquet file, bytes [start, end) of a
    JSONL file (`line0`: lines before `start` where the planner knows it, which also means `start`
    begins a line), or a whole text file."""

    file: InputFile
    start: int
    end: int
    line0: int | None = None


@dataclass
class CorpusPlan:
    files: list[InputFile]
    shards: list[tuple[Piece, ...]]
    options: dict[str, Any]
    shard_docs: list[int] = field(default_factory=list)  # documents planned per shard (estimated beyond a probe)

    def identity(self) -> str:
        """The corpus's identity from the listing alone: file names, kinds, sizes, modification times
        and the reading options. An edited input file changes its size or time, so a resume
        refuses it (a copy made with its times, `cp -p` / `rsync -a`, keeps the identity)."""
        listing = [[f.name, f.kind, f.size, f.mtime_ns] for f in self.files]
        return hashlib.sha256(json.dumps({"files": listing, **self.options}, sort_keys=True).encode()).hexdigest()


# -- listing ------------------------------------------------------------------------------------

def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot list ({exc})") from None


def _entry(root: str, info: pafs.FileInfo, name: str) -> InputFile:
    kind = SUFFIXES.get(Path(info.path).suffix, "text")
    return InputFile(root, info.path, name, kind, int(info.size or 0), int(info.mtime_ns or 0))


def _hidden(rel: str) -> bool:
    # like pyarrow's dataset reader, skip "_" and "." names: a fusedata folder's _manifest.json /
    # _run.json and half-written temporaries are not documents
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_inputs(inputs: list[str]) -> list[InputFile]:
    """The files named by paths, globs, folders or URIs, in a deterministic order, without reading them."""
    found: list[InputFile] = []
    for spec in inputs:
        fs, path = _resolve(spec)
        info = _info(fs, path)
        if info.type == pafs.FileType.Directory:
            listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            members = sorted(
                (i for i in listed if i.type == pafs.FileType.File and Path(i.path).suffix in SUFFIXES
                 and not _hidden(i.path[len(path.rstrip("/")) + 1:])), key=lambda i: i.path.split("/"))
            if not members:
                raise UsageError(f"{spec}: folder holds no .jsonl, .parquet or .txt files")
            found += [_entry(spec, i, i.path[len(path.rstrip("/")) + 1:]) for i in members]
        elif info.type == pafs.FileType.File:
            found.append(_entry(spec, info, Path(info.path).name))
        elif _is_pattern(spec):
            matches = _glob(spec, fs, path)
            if not matches:
                raise UsageError(f"{spec}: the pattern matches no files")
            found += [_entry(spec, i, Path(i.path).name) for i in matches]
        else:
            raise UsageError(f"{spec}: no such file or folder")
    return found


def _is_pattern(spec: str) -> bool:
    """Whether an input names files by a glob (`*`, `[…]`; `?` too, outside a URI's query)."""
    if is_uri(spec):
        return any(ch in spec.partition("?")[0] for ch in "*[")
    return any(ch in spec for ch in "*?[")


def _resolve(spec: str) -> tuple[pafs.FileSystem, str]:
    """`storage.resolve`, for a glob too: pyarrow cannot parse a URI holding `[` or `*`, so the part
    before the first pattern is resolved and the pattern appended. In a URI `?` starts the query
    (its settings), so there it is no wildcard."""
    if not is_uri(spec):
        return resolve(spec)
    head, sep, query = spec.partition("?")
    scheme, _, rest = head.partition("://")
    parts = rest.split("/")
    first = next((i for i, p in enumerate(parts) if i and any(ch in p for ch in "*[")), None)
    if first is None:
        return resolve(spec)
    fs, base = resolve(f"{scheme}://{'/'.join(parts[:first])}{sep}{query}")
    return fs, "/".join([base.rstrip("/"), *parts[first:]])


def _glob(spec: str, fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    if not is_uri(spec):
        names = sorted(str(Path(m).absolute()) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
        return fs.get_file_info(names) if names else []
    parts = path.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*["))
    base = "/".join(parts[:fixed])
    try:
        listed = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise UsageError(f"{base}: cannot list ({exc})") from None
    pattern = parts[fixed:]
    return sorted((i for i in listed if i.type == pafs.FileType.File
                   and _glob_match(pattern, i.path[len(base) + 1:].split("/"))), key=lambda i: i.path)


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """`glob.glob(recursive=True)`'s rules on a listed key: a pattern part matches one name (`*` never
    crosses a `/`, nor matches a name starting with `.` unless the part does), `**` any number of them."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, parts[i:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return bool(parts) and (head.startswith(".") or not parts[0].startswith(".")) \
        and fnmatch.fnmatchcase(parts[0], head) and _glob_match(rest, parts[1:])


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(file as shown, display name) of every input file."""
    return [(f.shown, f.name) for f in list_inputs(inputs)]


@functools.lru_cache(maxsize=64)
def _filesystem(root: str) -> pafs.FileSystem:
    return _resolve(root)[0]  # one filesystem object per root a worker reads (an S3 client is not free)


def _open_file(f: InputFile) -> pa.NativeFile:
    return _filesystem(f.root).open_input_file(f.path)


def _open(f: InputFile) -> pa.NativeFile:
    """A random-access handle on an input file (one place, so every read names its file on failure)."""
    try:
        return _open_file(f)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno:
            import os

            reason = os.strerror(exc.errno)
        raise UsageError(f"{f.shown}: cannot read ({reason})") from None


# -- parsing (shared by the probe and the workers) -----------------------------------------------

@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    id_field: str = "id"
    skip_bad_lines: bool = False


def _parse_line(line: bytes, where: str, opts: ReadOptions, stats: CorpusStats) -> tuple[str | None, str] | None:
    """(id or None, text) of one JSONL line; None for a bad line that is skipped and counted."""
    try:
        record = json.loads(line.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError("a line must hold a JSON object")
        if opts.text_field not in record:
            raise ValueError(f"no '{opts.text_field}' field (use --text-field)")
        text = record[opts.text_field]
        if not isinstance(text, str):
            raise ValueError(f"field '{opts.text_field}' is not a string")
    except (UnicodeDecodeError, ValueError) as exc:
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
        if not opts.skip_bad_lines:
            raise UsageError(f"{where}: {reason} (pass --skip-bad-lines to skip and count such lines)") from None
        stats.bad_skipped += 1
        if len(stats.bad_examples) < 5:
            stats.bad_examples.append(f"{where}: {reason}")
        return None
    if opts.id_field in record and record[opts.id_field] is None:
        raise UsageError(f"{where}: the document id field '{opts.id_field}' is null; give every record an id "
                         "(or leave the field out: ids are then file:line)")
    return (str(record[opts.id_field]) if opts.id_field in record else None), text


# -- planning -------------------------------------------------------------------------------------

@dataclass
class _Units:
    """A file as a sequence of documents the planner can cut between: `count` of them, unit u
    starting at `offset(u)` (a row for Parquet, a byte for JSONL: exact in the probed head,
    estimated from the mean line length beyond it)."""

    count: int
    size: int
    starts: list[int] = field(default_factory=list)  # JSONL: exact starts of the probed non-blank lines
    lines: list[int] = field(default_factory=list)  # their line numbers (1-based)
    exact_end: int = 0  # the probe's complete lines end here (a line starts there)
    exact_lines: int = 0  # lines before exact_end
    mean: float = 1.0

    def offset(self, u: int) -> tuple[int, int | None]:
        """(start of unit u, lines before it where known); u == count is the end of the file."""
        if u >= self.count:
            return self.size, None
        if u < len(self.starts):
            return self.starts[u], self.lines[u] - 1
        if u == len(self.starts):
            return self.exact_end, self.exact_lines
        return min(self.size, self.exact_end + round((u - len(self.starts)) * self.mean)), None


class _SeenIds:
    """The document ids the planner sees without reading beyond what it plans from (the probed JSONL
    heads, text file names), each with where it was: a duplicate among them is refused before
    anything is written. At most `limit` are kept (past that, only the end of the run checks)."""

    def __init__(self, limit: int) -> None:
        self.where: dict[str, str] = {}
        self.limit = limit

    def add(self, doc_id: str, where: str) -> None:
        first = self.where.get(doc_id)
        if first is not None:
            raise UsageError(f"duplicate document id {doc_id!r} ({first} and {where}): give each record a unique "
                             "id field or rename the files")
        if len(self.where) < self.limit:
            self.where[doc_id] = where


def _probe_jsonl(f: InputFile, opts: ReadOptions, probe_bytes: int,
                 seen: _SeenIds | None = None) -> tuple[_Units, int]:
    """The file's head read once: exact line starts, the format checked, its documents' ids added to
    `seen`; (units, non-empty docs seen)."""
    with _open(f) as h:
        head = h.read(min(f.size, probe_bytes))
    whole = len(head) == f.size
    complete = head if whole else head[: head.rfind(b"\n") + 1]
    starts, lines, nonempty = [], [], 0
    pos, stats = 0, CorpusStats()
    for lineno, line in enumerate(complete.split(b"\n"), start=1):
        begin, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        starts.append(begin)
        lines.append(lineno)
        parsed = _parse_line(line, f"{f.shown}:{lineno}", opts, stats)
        if parsed is not None and parsed[1].strip():
            nonempty += 1
            if seen is not None:  # the id the worker will give it (read_pieces skips empty texts)
                seen.add(parsed[0] if parsed[0] is not None else f"{f.name}:{lineno}", f"{f.shown}:{lineno}")
    units = _Units(len(starts), f.size, starts, lines, len(complete), complete.count(b"\n"))
    if not whole:
        units.mean = len(complete) / len(starts) if starts else float(max(len(head), 1))
        units.count += math.ceil((f.size - len(complete)) / units.mean)
    return units, nonempty


def _probe_text(f: InputFile, probe_bytes: int) -> None:
    """A text file's head is UTF-8 (the rest is checked by the worker that reads it)."""
    with _open(f) as h:
        head = h.read(min(f.size, probe_bytes))
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == f.size)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{f.shown}: not valid UTF-8 at byte {exc.start}") from None


def _parquet_units(f: InputFile, opts: ReadOptions) -> _Units:
    """A Parquet file's rows from its footer; its text column checked there."""
    with _open(f) as h:
        try:
            pf = pq.ParquetFile(h)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UsageError(f"{f.shown}: not a readable Parquet file ({exc})") from None
        _check_text_column(f, pf.schema_arrow, opts)
        return _Units(pf.metadata.num_rows, f.size)


def _check_text_column(f: InputFile, schema: pa.Schema, opts: ReadOptions) -> None:
    if opts.text_field not in schema.names:
        raise UsageError(f"{f.shown}: no column '{opts.text_field}' (columns: {', '.join(schema.names)})")
    kind = schema.field(opts.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise UsageError(f"{f.shown}: column '{opts.text_field}' holds {kind}, not text (use --text-field)")


def plan_corpus(inputs: list[str], docs_per_shard: int, opts: ReadOptions = ReadOptions(),
                probe_bytes: int | None = None) -> CorpusPlan:
    """Shards of about `docs_per_shard` documents each (exact for Parquet rows, text files and the
    probed head of a JSONL file; estimated from its mean line length beyond), in corpus order."""
    if docs_per_shard < 1:
        raise UsageError("--docs-per-shard must be at least 1")
    probe_bytes = probe_bytes or PROBE_BYTES
    files = list_inputs(inputs)
    _refuse_listed_twice(files)
    ids = _SeenIds(PLAN_IDS)
    shards: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    room = docs_per_shard
    all_probed, nonempty, text_probed = True, 0, 0
    for f in files:
        if f.kind == "jsonl":
            units, seen = _probe_jsonl(f, opts, probe_bytes, ids)
            nonempty += seen
            all_probed &= f.size <= probe_bytes
        elif f.kind == "parquet":
            units, all_probed = _parquet_units(f, opts), False
        else:
            if text_probed < PROBE_TEXT_FILES:
                _probe_text(f, probe_bytes)
                text_probed += 1
            ids.add(f.name, f.shown)  # a text file is one document, its name the id
            units, all_probed = _Units(1, f.size), False
        u = 0
        while u < units.count:
            take = min(room, units.count - u)
            (start, line0), (end, _) = units.offset(u), units.offset(u + take)
            if f.kind != "jsonl":
                start, end, line0 = (u, u + take, None) if f.kind == "parquet" else (0, f.size, None)
            if end > start or f.kind == "text":
                current.append(Piece(f, start, end, line0))
            u, room = u + take, room - take
            if room == 0:
                shards.append(tuple(current))
                current, room = [], docs_per_shard
    if current:
        shards.append(tuple(current))
    if not shards or (all_probed and nonempty == 0):
        raise UsageError("the corpus holds no non-empty documents")
    planned = [docs_per_shard] * (len(shards) - 1) + [docs_per_shard - room if current else docs_per_shard]
    return CorpusPlan(files, shards, {"text_field": opts.text_field, "id_field": opts.id_field}, planned)


def _refuse_listed_twice(files: list[InputFile]) -> None:
    """One file named by two inputs (a folder and a file in it, overlapping globs) would be read twice,
    under two names when its ids are file:line: refused from the listing."""
    first: dict[tuple[str, str], InputFile] = {}
    for f in files:
        key = (f.root.split("://", 1)[0] if is_uri(f.root) else "", f.path)
        if key in first:
            raise UsageError(f"{f.shown}: named twice by the inputs ({shown(first[key].root)} and {shown(f.root)}); its documents "
                             "would be read twice (duplicate documents): name each file once")
        first[key] = f


# -- reading (a worker's share) -------------------------------------------------------------------

def read_pieces(pieces: tuple[Piece, ...] | list[Piece], opts: ReadOptions = ReadOptions()) -> tuple[pa.Table, CorpusStats]:
    """The documents of `pieces` (empty ones skipped and counted) and what was read: its sha256."""
    stats = CorpusStats()
    digest = hashlib.sha256()
    ids: list[str] = []
    texts: list[str] = []
    for p in pieces:
        if p.file.kind == "jsonl":
            records = _read_jsonl(p, opts, stats, digest)
        elif p.file.kind == "parquet":
            records = _read_parquet(p, opts, digest)
        else:
            records = _read_text(p, digest)
        for doc_id, text in records:
            if text is None or not text.strip():
                stats.empty_skipped += 1
                continue
            ids.append(doc_id)
            texts.append(text)
    stats.docs = len(ids)
    stats.sha256 = digest.hexdigest()
    stats.content = content_digest(ids, texts)
    return pa.table({"doc_id": ids, "text": texts}, schema=DOCS_SCHEMA), stats


def _first_line_start(h: pa.NativeFile, start: int, size: int) -> int:
    """The first offset >= start that begins a line (`size` if none does)."""
    if start == 0:
        return 0
    h.seek(start - 1)
    pos = start - 1
    while pos < size:
        block = h.read(_BLOCK)
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def _count_lines(h: pa.NativeFile, end: int) -> int:
    """Newlines in bytes [0, end): the line number of the line starting at `end`, minus one."""
    h.seek(0)
    n, left = 0, end
    while left > 0:
        block = h.read(min(_BLOCK, left))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    return n


def _read_jsonl(p: Piece, opts: ReadOptions, stats: CorpusStats, digest: Any):
    f = p.file
    with _open(f) as h:
        begin = p.start if p.line0 is not None else _first_line_start(h, p.start, f.size)
        if begin >= p.end:  # no line begins in this range: the one running through it is the previous piece's
            return
        line0 = p.line0 if p.line0 is not None else _count_lines(h, begin)
        h.seek(begin)
        data = h.read(p.end - begin)
        while not data.endswith(b"\n") and begin + len(data) < f.size:  # the last line runs past the end
            block = h.read(_BLOCK)
            if not block:
                break
            i = block.find(b"\n")
            data += block if i < 0 else block[: i + 1]
            if i >= 0:
                break
    digest.update(data)
    stats.bytes_read += len(data)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    for lineno, line in enumerate(lines, start=line0 + 1):
        if not line.strip():
            continue
        parsed = _parse_line(line, f"{f.shown}:{lineno}", opts, stats)
        if parsed is not None:
            yield (parsed[0] if parsed[0] is not None else f"{f.name}:{lineno}"), parsed[1]


def _read_parquet(p: Piece, opts: ReadOptions, digest: Any):
    f = p.file
    with _open(f) as h:
        try:
            pf = pq.ParquetFile(h)
            _check_text_column(f, pf.schema_arrow, opts)
            has_id = opts.id_field in pf.schema_arrow.names
            bounds = [0]
            for i in range(pf.metadata.num_row_groups):
                bounds.append(bounds[-1] + pf.metadata.row_group(i).num_rows)
            first = bisect.bisect_right(bounds, p.start) - 1
            last = bisect.bisect_left(bounds, p.end)
            table = pf.read_row_groups(list(range(first, last)),
                                       columns=[opts.text_field] + ([opts.id_field] if has_id else []))
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{f.shown}: not a readable Parquet file ({exc})") from None
    table = table.slice(p.start - bounds[first], p.end - p.start)
    texts = table.column(opts.text_field).to_pylist()
    for i, value in enumerate(texts):
        if isinstance(value, bytes):
            try:
                texts[i] = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{f.shown}: row {p.start + i}: column '{opts.text_field}' is not valid UTF-8 "
                                 f"at byte {exc.start}") from None
    if has_id:
        raw = table.column(opts.id_field).to_pylist()
        if None in raw:
            raise UsageError(f"{f.shown}: row {p.start + raw.index(None)}: the document id column "
                             f"'{opts.id_field}' is null; give every row an id")
        ids = [str(v) for v in raw]
    else:
        ids = [f"{f.name}:{p.start + i}" for i in range(len(texts))]
    for doc_id, text in zip(ids, texts, strict=True):
        digest.update(doc_id.encode() + b"\0" + (text or "").encode() + b"\1")
        yield doc_id, text


def _read_text(p: Piece, digest: Any):
    with _open(p.file) as h:
        try:
            raw = h.read()
        except OSError as exc:
            raise UsageError(f"{p.file.shown}: cannot read ({exc})") from None
    digest.update(raw)
    try:
        yield p.file.name, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p.file.shown}: not valid UTF-8 at byte {exc.start}") from None


def check_unique(ids: list[str]) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise UsageError(f"duplicate document id {dup!r}: give each record a unique id field or rename the files")


def read_corpus(
    inputs: list[str], text_field: str = "text", id_field: str = "id", skip_bad_lines: bool = False
) -> tuple[pa.Table, CorpusStats]:
    """All documents of the inputs in one table, empty ones skipped and counted: for small corpora
    (evaluation sets, benchmarks). The extract stage reads its shards in the workers instead."""
    opts = ReadOptions(text_field, id_field, skip_bad_lines)
    plan = plan_corpus(inputs, 1 << 62, opts)
    docs, stats = read_pieces([p for shard in plan.shards for p in shard], opts)
    stats.files = len(plan.files)
    check_unique(docs.column("doc_id").to_pylist())
    if not docs.num_rows:
        raise UsageError("the corpus holds no non-empty documents")
    return docs, stats


def shard_docs(docs: pa.Table, docs_per_shard: int) -> list[pa.Table]:
    """Split a docs table into consecutive shards (deterministic: same corpus, same shards)."""
    if docs_per_shard < 1:
        raise UsageError("--docs-per-shard must be at least 1")
    return [docs.slice(i, docs_per_shard) for i in range(0, docs.num_rows, docs_per_shard)]


def pieces_to_json(pieces: tuple[Piece, ...]) -> str:
    """A shard's pieces as a small JSON text (what a Ray task carries)."""
    return json.dumps([asdict(p) for p in pieces])


def pieces_from_json(text: str) -> tuple[Piece, ...]:
    return tuple(Piece(InputFile(**d.pop("file")), **d) for d in json.loads(text))
