"""A corpus on object storage: extract reads JSONL, Parquet and text files from a real S3 server
(tests/s3.py) and writes the same shards as from the same files on local disk, whether they are named
as a folder (a key prefix), by a glob, or by a URI that carries the endpoint in its query.
The planner's probe is made small so that JSONL shards are cut at estimated byte offsets, which the
workers resolve with ranged reads (the first line start after a cut, the line count before it).
Globs on a bucket follow `glob.glob`'s rules, as they do on local disk."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from s3 import s3_prefix
from tiny_models import CORPUS_DOCS

import fusedata.corpus
from fusedata.corpus import list_inputs
from fusedata.dataset import open_dataset
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from schemas.manifest import Manifest

PROBE = 100  # bytes: the JSONL file (~1.6 KB) is cut beyond its probed head


def _write_corpus(root: Path) -> Path:
    """c/a.jsonl (no ids: `a.jsonl:LINE`, a blank line), c/b.parquet (one row per row group: `b.parquet:ROW`),
    c/c.txt, and decoys no input below names: a hidden file, a file two levels down elsewhere."""
    folder = root / "c"
    folder.mkdir(parents=True)
    texts = [d["text"] for d in CORPUS_DOCS]
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n" + ("\n" if i == 1 else ""))
    pq.write_table(pa.table({"text": texts[:3][::-1]}), folder / "b.parquet", row_group_size=1)
    (folder / "c.txt").write_text(texts[0] + " Told again, as a text file.", encoding="utf-8")
    (folder / ".hidden.jsonl").write_text('{"text": "not a document"}\n', encoding="utf-8")
    (root / "other" / "deep").mkdir(parents=True)
    (root / "other" / "deep" / "d.jsonl").write_text('{"text": "too deep for */*"}\n', encoding="utf-8")
    return root


def _job(model: Path, inputs: list[str], output: str) -> ExtractJob:
    config = ExtractConfig(model=str(model), top_k=4, max_length=24)
    return ExtractJob(inputs, output, config, docs_per_shard=3, quiet=True, log=lambda m: None)


def _shards(manifest: Manifest) -> list[tuple]:
    return [(s.name, s.rows, s.tokens, s.sha256, s.input_sha256) for s in manifest.shards]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus-s3"))


@pytest.fixture(scope="module")
def local_run(tiny_llama, corpus_root, tmp_path_factory) -> Manifest:
    """The extract of the corpus folder on local disk, with the small probe."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusedata.corpus, "PROBE_BYTES", PROBE)
        out = tmp_path_factory.mktemp("local") / "topk"
        return run_extract(_job(tiny_llama, [str(corpus_root / "c")], str(out)))


def _upload(s3, request, corpus_root: Path) -> str:
    root = s3_prefix(request)
    pafs.copy_files(str(corpus_root), root.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())
    return root


@pytest.mark.parametrize("named", ["folder", "glob", "query"])
def test_extract_from_s3_equals_local_disk(named, s3, request, tiny_llama, corpus_root, local_run, tmp_path,
                                           monkeypatch):
    root = _upload(s3, request, corpus_root)
    # a glob with `[`: pyarrow cannot parse it as a URI, so planner and workers resolve the part before it
    inputs = {"folder": [f"{root}/c"], "glob": [f"{root}/c/[abc].*"], "query": [f"{root}/c"]}[named]
    output = str(tmp_path / "topk")
    if named == "folder":
        output = f"{root}/out/topk"  # the output on S3 too
    if named == "query":  # no endpoint in the environment: the URI's query names it
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        inputs = [f"{inputs[0]}?endpoint_override={s3.endpoint.split('://')[1]}&scheme=http"]
    assert [f.name for f in list_inputs(inputs)] == ["a.jsonl", "b.parquet", "c.txt"]
    monkeypatch.setattr(fusedata.corpus, "PROBE_BYTES", PROBE)
    manifest = run_extract(_job(tiny_llama, inputs, output))
    assert _shards(manifest) == _shards(local_run)  # byte-identical shards, each read the same input bytes
    assert len(manifest.shards) >= 4 and manifest.stats["docs"] == local_run.stats["docs"] == len(CORPUS_DOCS) + 4
    assert manifest.stats["corpus_content"] == local_run.stats["corpus_content"]  # the same documents
    assert manifest.stats["input_sha256"] == local_run.stats["input_sha256"]
    same = {k: v for k, v in manifest.run.items() if k != "corpus_hash"}
    assert same == {k: v for k, v in local_run.run.items() if k != "corpus_hash"}  # the listing differs (times)
    assert open_dataset(output).shards == manifest.shards  # verified: every shard's sha256


def test_globs_on_a_bucket_follow_globs_on_disk(s3, request, corpus_root):
    root = _upload(s3, request, corpus_root)
    for pattern in ("*/*", "*/*.jsonl", "c/[ab].*", "**/*.jsonl", "other/**", "c/.*"):
        remote = [f.name for f in list_inputs([f"{root}/{pattern}"])]
        assert remote == [f.name for f in list_inputs([str(corpus_root / pattern)])], pattern
    assert [f.name for f in list_inputs([f"{root}/**/*.jsonl"])] == ["a.jsonl", "d.jsonl"]  # not the hidden one
    assert [f.name for f in list_inputs([f"{root}/c/.*"])] == [".hidden.jsonl"]
