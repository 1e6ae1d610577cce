"""Corpus identity by content: align and fuse compare the documents two extracts read (the sum of the
documents' digests, `corpus_content` in the manifest), not the listing of the files they were read
from, so a copy of the corpus at another path, with other times or cut into other shards aligns with
the original; a corpus with one document changed is refused, saying so; a manifest written before
`corpus_content` existed is compared by its `corpus_hash` (the listing), as before."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fusedata.corpus import add_content, content_digest
from fusedata.dataset import read_shard
from fusedata.errors import UsageError
from fusedata.stages.align import AlignConfig, AlignJob, AlignStage, run_align
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from fusedata.stages.fuse import FuseConfig, FuseJob, FuseStage
from schemas.manifest import MANIFEST_NAME, Manifest

QUIET = {"quiet": True, "log": lambda m: None}


def test_content_digest_ignores_order_and_cuts_but_not_the_documents():
    ids, texts = ["a", "b", "c", "d"], ["one", "two", "three", ""]
    whole = f"{content_digest(ids, texts):064x}"
    parts = [f"{content_digest(ids[i:j], texts[i:j]):064x}" for i, j in ((0, 1), (1, 3), (3, 4))]
    assert add_content(add_content(parts[0], parts[1]), parts[2]) == whole  # shards add up to the corpus
    assert content_digest(ids[::-1], texts[::-1]) == int(whole, 16)  # order does not matter
    assert content_digest(ids, ["one", "two", "three", "x"]) != int(whole, 16)  # a text does
    assert content_digest(["a", "b", "c", "e"], texts) != int(whole, 16)  # an id does
    assert content_digest(["ab"], [""]) != content_digest(["a"], ["b"])  # the id/text boundary does


def _extract_gemma(model: Path, corpus: Path, out: Path, docs_per_shard: int) -> Manifest:
    config = ExtractConfig(model=str(model), top_k=5, max_length=24)  # the spine's settings
    return run_extract(ExtractJob([str(corpus)], str(out), config, docs_per_shard=docs_per_shard, **QUIET))


@pytest.fixture(scope="module")
def copies(spine, tiny_gemma, corpus_file, tmp_path_factory) -> dict[str, Path]:
    """topk/gemma again from a copy of the spine's corpus (another folder, another time, 3 documents a
    shard instead of 2), and from a copy with one word of one document changed."""
    root = tmp_path_factory.mktemp("copies")
    same, changed = root / "same" / "corpus.jsonl", root / "changed" / "corpus.jsonl"
    for path, data in ((same, corpus_file.read_bytes()),
                       (changed, corpus_file.read_bytes().replace(b"lighthouse", b"Lighthouse"))):
        path.parent.mkdir()
        path.write_bytes(data)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _extract_gemma(tiny_gemma, same, root / "topk-same", docs_per_shard=3)
    _extract_gemma(tiny_gemma, changed, root / "topk-changed", docs_per_shard=2)
    return {"same": root / "topk-same", "changed": root / "topk-changed", "root": root}


def _align(target: Path, source: Path, output: Path, spine: Path) -> AlignJob:
    return AlignJob(str(target), str(source), str(output), AlignConfig(cache_dir=str(spine / "vocab")), **QUIET)


def test_a_copy_of_the_corpus_aligns_like_the_original(spine, copies, tmp_path):
    original, copy = Manifest.read(spine / "topk/gemma"), Manifest.read(copies["same"])
    assert copy.run["corpus_hash"] != original.run["corpus_hash"]  # another listing (path, time)
    assert [s.input_sha256 for s in copy.shards] != [s.input_sha256 for s in original.shards]  # other cuts
    assert copy.stats["corpus_content"] == original.stats["corpus_content"]  # the same documents
    manifest = run_align(_align(spine / "topk/llama", copies["same"], tmp_path / "aligned", spine))
    want = Manifest.read(spine / "aligned/gemma")
    assert [s.name for s in manifest.shards] == [s.name for s in want.shards]
    for s in want.shards:  # the same aligned distributions as from the original's extract
        assert read_shard(tmp_path / "aligned" / s.name).equals(read_shard(spine / "aligned/gemma" / s.name))
    FuseStage(FuseJob(str(spine / "topk/llama"), [], str(tmp_path / "fused"),
                      FuseConfig(alm_source=str(copies["same"])), **QUIET))  # fuse --alm-source accepts the copy too


def test_another_corpus_is_refused_by_align_and_fuse(spine, copies, tmp_path):
    with pytest.raises(UsageError, match=r"different corpora \(their documents differ: corpus_content"):
        AlignStage(_align(spine / "topk/llama", copies["changed"], tmp_path / "aligned", spine))
    with pytest.raises(UsageError, match=r"different corpora \(their documents differ"):
        FuseStage(FuseJob(str(spine / "topk/llama"), [], str(tmp_path / "fused"),
                          FuseConfig(alm_source=str(copies["changed"])), **QUIET))
    assert not (tmp_path / "aligned").exists() and not (tmp_path / "fused").exists()


def _as_older(dataset: Path, into: Path) -> Path:
    """A copy of a dataset whose manifest lacks corpus_content, as fusedata wrote it before."""
    shutil.copytree(dataset, into)
    d = json.loads((into / MANIFEST_NAME).read_text())
    del d["stats"]["corpus_content"]
    (into / MANIFEST_NAME).write_text(json.dumps(d))
    return into


def test_an_older_manifest_is_compared_by_its_listing(spine, copies, tmp_path):
    older = _as_older(spine / "topk/gemma", tmp_path / "older")
    AlignStage(_align(spine / "topk/llama", older, tmp_path / "a", spine))  # the very same files: accepted
    with pytest.raises(UsageError, match=rf"corpus_hash differs; {older} records no corpus_content"):
        AlignStage(_align(copies["same"], older, tmp_path / "b", spine))  # the copy's listing differs
