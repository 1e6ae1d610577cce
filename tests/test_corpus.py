"""Corpus reading: formats, globs, folders, stable document ids, and bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import unreadable

from fusedata.corpus import DOCS_SCHEMA, expand_inputs, read_corpus, shard_docs
from fusedata.errors import UsageError


def _jsonl(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def _rows(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True))


def test_jsonl_ids_from_line_numbers_and_id_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps({"text": "first"}) + "\n"
        + "\n"  # blank lines are not records, but keep the line numbering
        + json.dumps({"text": "third", "id": "doc-x"}) + "\n"
        + json.dumps({"text": "fourth", "id": 7}) + "\n",
        encoding="utf-8",
    )
    docs, stats = read_corpus([str(path)])
    assert docs.schema.equals(DOCS_SCHEMA)
    assert _rows(docs) == [("a.jsonl:1", "first"), ("doc-x", "third"), ("7", "fourth")]
    assert (stats.files, stats.docs, stats.empty_skipped, stats.bad_skipped) == (1, 3, 0, 0)


def test_ids_are_stable_across_runs(tmp_path, corpus_file):
    a, _ = read_corpus([str(corpus_file)])
    b, _ = read_corpus([str(corpus_file)])
    assert a.equals(b)
    assert a.column("doc_id").to_pylist()[:2] == ["prose-1", "code-1"]


def test_text_and_id_fields(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"content": "x y", "key": "k1"}, {"content": "z", "key": "k2"}])
    docs, _ = read_corpus([str(path)], text_field="content", id_field="key")
    assert _rows(docs) == [("k1", "x y"), ("k2", "z")]
    with pytest.raises(UsageError, match=r"c\.jsonl:1: no 'text' field \(use --text-field\)"):
        read_corpus([str(path)])


def test_parquet(tmp_path):
    pq.write_table(pa.table({"text": ["alpha", "", "gamma"]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": ["a", "b"], "id": [10, 11]}), tmp_path / "q.parquet")
    docs, stats = read_corpus([str(tmp_path / "p.parquet"), str(tmp_path / "q.parquet")])
    assert _rows(docs) == [("p.parquet:0", "alpha"), ("p.parquet:2", "gamma"), ("10", "a"), ("11", "b")]
    assert stats.empty_skipped == 1 and stats.files == 2


def test_parquet_missing_column_and_bad_file(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(UsageError, match=r"p\.parquet: no column 'text' \(columns: body\)"):
        read_corpus([str(tmp_path / "p.parquet")])
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(UsageError, match=r"bad\.parquet: not a readable Parquet file"):
        read_corpus([str(tmp_path / "bad.parquet")])


def test_text_files_glob_and_folder(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee text\nsecond line", encoding="utf-8")
    (d / "a.md").write_text("# title\nbody", encoding="utf-8")
    (d / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    (d / "_manifest.json").write_text("{}", encoding="utf-8")  # a fusedata folder's bookkeeping
    (d / ".b.txt.tmp-1").write_text("half written", encoding="utf-8")
    (d / "_old").mkdir()
    (d / "_old" / "x.txt").write_text("skipped too", encoding="utf-8")
    docs, stats = read_corpus([str(d)])
    # a folder: every supported file under it, sorted, ids relative to the folder
    assert _rows(docs) == [("a.md", "# title\nbody"), ("b.txt", "bee text\nsecond line"), ("sub/c.txt", "sea")]
    assert stats.files == 3
    globbed, _ = read_corpus([str(d / "*.txt")])
    assert _rows(globbed) == [("b.txt", "bee text\nsecond line")]
    recursive, _ = read_corpus([str(d / "**" / "*.txt")])
    assert [i for i, _ in _rows(recursive)] == ["x.txt", "b.txt", "c.txt"]  # a glob takes what it names
    mixed, _ = read_corpus([str(d / "a.md"), str(d / "sub" / "c.txt")])
    assert [i for i, _ in _rows(mixed)] == ["a.md", "c.txt"]


def test_empty_folder_and_unmatched_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="folder holds no .jsonl, .parquet or .txt files"):
        read_corpus([str(tmp_path / "empty")])
    with pytest.raises(UsageError, match=r"the pattern matches no files"):
        read_corpus([str(tmp_path / "*.jsonl")])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UsageError, match=rf"{missing}: no such file or folder"):
        read_corpus([str(missing)])
    with pytest.raises(UsageError, match="no such file"):
        expand_inputs([str(missing)])


@pytest.mark.parametrize("name", ["locked.jsonl", "locked.txt"])
def test_unreadable_file(tmp_path, name, monkeypatch):
    path = tmp_path / name
    path.write_text(json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    with unreadable(path, monkeypatch), pytest.raises(UsageError, match=rf"{name}: cannot read \(Permission denied\)"):
        read_corpus([str(path)])


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json", r"Expecting property name"),
        (b'["a", "list"]', r"a line must hold a JSON object"),
        (b'{"text": 5}', r"field 'text' is not a string"),
        (b'{"body": "x"}', r"no 'text' field"),
        (b'{"text": "caf\xe9"}', r"not valid UTF-8"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, reason):
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "good one"}, {"text": "good two"}], [line])
    with pytest.raises(UsageError, match=rf"{path}:3: {reason}.*--skip-bad-lines") as exc:
        read_corpus([str(path)])
    assert "\n" not in str(exc.value)


def test_skip_bad_lines_counts(tmp_path):
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [{"text": "one"}],
        [b"{broken", b'{"text": "caf\xe9"}', b'{"text": "two"}', b"[1]", b'{"text": null}'],
    )
    docs, stats = read_corpus([str(path)], skip_bad_lines=True)
    assert _rows(docs) == [("bad.jsonl:1", "one"), ("bad.jsonl:4", "two")]
    assert stats.bad_skipped == 4
    assert stats.bad_examples[0].startswith(f"{path}:2: ")
    assert [e.split(": ")[0] for e in stats.bad_examples] == [f"{path}:{n}" for n in (2, 3, 5, 6)]


def test_empty_documents_skipped_and_counted(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   \n\t"}, {"text": "real"}, {"text": ""}])
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    docs, stats = read_corpus([str(path), str(tmp_path / "blank.txt")])
    assert _rows(docs) == [("e.jsonl:3", "real")]
    assert stats.empty_skipped == 4 and stats.docs == 1


def test_only_empty_documents_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(UsageError, match="the corpus holds no non-empty documents"):
        read_corpus([str(path)])


def test_non_utf8_text_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok café".encode("latin-1"))
    with pytest.raises(UsageError, match=rf"{path}: not valid UTF-8 at byte 6"):
        read_corpus([str(path)])


def test_non_ascii_text_survives(tmp_path):
    path = _jsonl(tmp_path / "u.jsonl", [{"text": "café 😀 €"}])
    (tmp_path / "u.txt").write_text("naïve 😀", encoding="utf-8")
    docs, _ = read_corpus([str(path), str(tmp_path / "u.txt")])
    assert docs.column("text").to_pylist() == ["café 😀 €", "naïve 😀"]


def test_duplicate_ids(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "id": "same"}, {"text": "b", "id": "same"}])
    with pytest.raises(UsageError, match=r"duplicate document id 'same'"):
        read_corpus([str(path)])
    # the same file named twice would be read twice: refused from the listing
    plain = _jsonl(tmp_path / "p.jsonl", [{"text": "a"}])
    with pytest.raises(UsageError, match=r"p.jsonl: named twice by the inputs"):
        read_corpus([str(plain), str(plain)])
    # two files of one name give the same file:line ids: refused from their probed heads
    (tmp_path / "q").mkdir()
    other = _jsonl(tmp_path / "q" / "p.jsonl", [{"text": "b"}])
    with pytest.raises(UsageError, match=r"duplicate document id 'p.jsonl:1'"):
        read_corpus([str(plain), str(other)])


def test_shard_docs(tmp_path):
    docs = pa.table({"doc_id": [str(i) for i in range(10)], "text": ["t"] * 10}, schema=DOCS_SCHEMA)
    shards = shard_docs(docs, 4)
    assert [s.num_rows for s in shards] == [4, 4, 2]
    assert pa.concat_tables(shards).equals(docs)
    assert [s.num_rows for s in shard_docs(docs, 100)] == [10]
    with pytest.raises(UsageError, match="--docs-per-shard must be at least 1"):
        shard_docs(docs, 0)


@pytest.mark.parametrize(("column", "pattern"), [
    (pa.array([1, 2], pa.int64()), r"column 'text' holds int64, not text"),
    (pa.array([["a"], ["b"]]), r"column 'text' holds list<\w+: string>, not text"),
    (pa.array([b"fine", b"\xff\xfe"], pa.binary()), r"row 1: column 'text' is not valid UTF-8 at byte 0"),
])
def test_parquet_text_column_that_is_not_text(tmp_path, column, pattern):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": column}), path)
    with pytest.raises(UsageError, match=rf"{path}: {pattern}"):
        read_corpus([str(path)])


def test_binary_utf8_text_column_is_read(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": pa.array(["héllo".encode()], pa.binary())}), path)
    assert _rows(read_corpus([str(path)])[0]) == [("c.parquet:0", "héllo")]


def test_null_document_ids_are_named_as_missing(tmp_path):
    jsonl = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": None, "text": "y"}])
    with pytest.raises(UsageError, match=rf"{jsonl}:2: the document id field 'id' is null"):
        read_corpus([str(jsonl)])
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a", None], "text": ["x", "y"]}), path)
    with pytest.raises(UsageError, match=rf"{path}: row 1: the document id column 'id' is null"):
        read_corpus([str(path)])
