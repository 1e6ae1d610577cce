"""Workers read, the driver plans: shard plans made from the corpus listing, every line and row read
exactly once whatever the cuts, input hashes in each shard, a changed input refused on resume, and a
shard failing on bad input reported by name while the others are written."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fusedata.corpus
from fusedata.corpus import pieces_from_json, pieces_to_json, plan_corpus, read_pieces
from fusedata.errors import UsageError
from fusedata.stages.base import ShardsFailed
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from schemas.manifest import MANIFEST_NAME, Manifest


def _reference_jsonl(path: Path) -> list[tuple[str, str]]:
    """What a whole-file reader gives: (id, text) of every non-empty record, ids file:line."""
    out = []
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if line.strip():
            record = json.loads(line)
            if record["text"].strip():
                out.append((str(record.get("id", f"{path.name}:{lineno}")), record["text"]))
    return out


def _docs(pieces) -> list[tuple[str, str]]:
    table, _ = read_pieces(pieces)
    return list(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True))


def _random_jsonl(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(n):
            text = " ".join(rng.choice(["a", "bb", "café", "😀", "word"]) for _ in range(rng.randrange(0, 40)))
            record = {"text": text} if i % 7 else {"text": text, "id": f"doc-{i}"}
            f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            if rng.random() < 0.1:
                f.write(b"\n")  # blank lines keep the line numbering
    return path


class _Counting:
    """An input file handle that counts the bytes read through it."""

    read_bytes = 0

    def __init__(self, inner):
        self.inner = inner

    def read(self, n=None):
        data = self.inner.read() if n is None else self.inner.read(n)
        _Counting.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


@pytest.mark.parametrize("probe", [64, 300, 1 << 20])
@pytest.mark.parametrize("per_shard", [1, 3, 17])
def test_jsonl_ranges_read_every_line_once(tmp_path, monkeypatch, probe, per_shard):
    """Cut at probed line starts or at estimated byte offsets, the ranges read exactly the records
    and line-number ids a whole-file reader gives, in order; the planner reads only the probe."""
    corpus = _random_jsonl(tmp_path / "c.jsonl", 120, seed=probe + per_shard)
    real_open = fusedata.corpus._open_file
    monkeypatch.setattr(fusedata.corpus, "_open_file", lambda f: _Counting(real_open(f)))
    _Counting.read_bytes = 0
    plan = plan_corpus([str(corpus)], per_shard, probe_bytes=probe)
    assert _Counting.read_bytes <= probe  # the listing and the head, never the documents beyond it
    if probe >= corpus.stat().st_size:  # probed whole: exact cuts of `per_shard` non-blank lines
        assert all(n == per_shard for n in plan.shard_docs[:-1])
    got = [doc for shard in plan.shards for doc in _docs(pieces_from_json(pieces_to_json(shard)))]
    assert got == _reference_jsonl(corpus)
    # consecutive ranges of a file tile it: [0, end) without gaps or overlaps
    spans = [(p.start, p.end) for shard in plan.shards for p in shard]
    assert spans[0][0] == 0 and spans[-1][1] == corpus.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_parquet_row_ranges_across_row_groups(tmp_path):
    texts = [f"document {i}" if i % 5 else "" for i in range(23)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"text": ["x", "y"], "id": ["i1", "i2"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("a whole file", encoding="utf-8")
    plan = plan_corpus([str(tmp_path)], 6)
    assert plan.shard_docs == [6, 6, 6, 6, 2]  # 23 rows + 2 rows + 1 file, cut across files
    got = [doc for shard in plan.shards for doc in _docs(shard)]
    want = [(f"a.parquet:{i}", t) for i, t in enumerate(texts) if t] + [("i1", "x"), ("i2", "y"), ("c.txt", "a whole file")]
    assert got == want
    _, stats = read_pieces(plan.shards[0])
    assert (stats.docs, stats.empty_skipped) == (4, 2)


def _job(model: Path, corpus: Path, out: Path, logs: list[str] | None = None, **kw) -> ExtractJob:
    config = ExtractConfig(model=str(model), top_k=4, max_length=24, batch_tokens=256)
    return ExtractJob([str(corpus)], str(out), config, docs_per_shard=2, quiet=True,
                      log=(logs if logs is not None else []).append, **kw)


def test_shards_record_their_input_and_a_changed_file_is_refused_on_resume(tiny_llama, corpus_file, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(corpus_file.read_bytes())
    out = tmp_path / "topk"
    manifest = run_extract(_job(tiny_llama, corpus, out))
    # each shard's entry holds the sha256 of the very bytes its worker read: the lines of its range
    plan = plan_corpus([str(corpus)], 2)
    data = corpus.read_bytes()
    for entry, shard in zip(manifest.shards, plan.shards, strict=True):
        (piece,) = shard
        assert entry.input_sha256 == hashlib.sha256(data[piece.start:piece.end]).hexdigest()
    assert manifest.stats["input_bytes"] == len(data)

    # an interrupted run, then the input edited (same size): its time changed, so the resume refuses it
    (out / MANIFEST_NAME).unlink()
    (out / "shard-00002.parquet").unlink()
    corpus.write_bytes(data.replace(b"lighthouse", b"Lighthouse"))
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    with pytest.raises(UsageError, match=r"holds another run's output \(differs in corpus_hash"):
        run_extract(_job(tiny_llama, corpus, out))
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_a_bad_shard_is_reported_the_rest_written_and_a_rerun_retries_only_it(tiny_llama, corpus_file, tmp_path,
                                                                             monkeypatch):
    """A bad line past the planner's probe fails its shard in the worker: named with the error,
    the other shards written, no manifest; the rerun with --skip-bad-lines computes that shard alone
    (skipping bad lines is not part of the run's identity) and matches a fresh run."""
    monkeypatch.setattr(fusedata.corpus, "PROBE_BYTES", 64)
    lines = corpus_file.read_bytes().splitlines(keepends=True)
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"".join(lines[:3]) + b'{"text": "caf\xe9"}\n' + b"".join(lines[3:]))
    out = tmp_path / "topk"
    with pytest.raises(ShardsFailed) as exc:
        run_extract(_job(tiny_llama, corpus, out))
    assert len(exc.value.failed) == 1
    failed = exc.value.failed[0].name
    assert re.search(rf"1 of \d shard\(s\) failed.*{failed}: {corpus}:4: not valid UTF-8", str(exc.value))
    written = sorted(p.name for p in out.glob("shard-*"))
    assert failed not in written and len(written) >= 2 and not (out / MANIFEST_NAME).exists()
    stamps = {n: (out / n).stat().st_mtime_ns for n in written}

    logs: list[str] = []
    manifest = run_extract(_job(tiny_llama, corpus, out, logs, skip_bad_lines=True))
    assert any(f"resuming, {len(written)} of {len(written) + 1} shards already written" in m for m in logs)
    assert {n: (out / n).stat().st_mtime_ns for n in written} == stamps  # not recomputed
    assert manifest.stats["bad_lines_skipped"] == 1 and manifest.stats["docs"] == 5
    fresh = run_extract(_job(tiny_llama, corpus, tmp_path / "fresh", skip_bad_lines=True))
    assert [(s.name, s.sha256) for s in manifest.shards] == [(s.name, s.sha256) for s in fresh.shards]
    assert Manifest.read(out).shards == manifest.shards



def _same_length_jsonl(path: Path, ids: list[str]) -> Path:
    """Records of one byte length each, so cuts estimated beyond a probe land exactly on line starts."""
    lines = [json.dumps({"id": i, "text": f"document number {n:03d} about lighthouses"}) for n, i in enumerate(ids)]
    assert len({len(line) for line in lines}) == 1
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_duplicate_ids_the_planner_sees_are_refused_before_anything_is_written(tiny_llama, tmp_path):
    """Ids in the probed heads, text file names and a file named twice: refused by the plan alone."""
    corpus = _same_length_jsonl(tmp_path / "c.jsonl", ["a", "b", "a"])
    with pytest.raises(UsageError, match=rf"duplicate document id 'a' \({corpus}:1 and {corpus}:3\)"):
        plan_corpus([str(corpus)], 2)
    with pytest.raises(UsageError, match="duplicate document id 'a'"):
        run_extract(_job(tiny_llama, corpus, tmp_path / "topk"))
    assert not (tmp_path / "topk").exists()
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text(f"text of {d}", encoding="utf-8")
    d1, d2 = tmp_path / "d1" / "x.txt", tmp_path / "d2" / "x.txt"
    with pytest.raises(UsageError, match=rf"duplicate document id 'x.txt' \({d1} and {d2}\)"):
        plan_corpus([str(tmp_path / "d1"), str(tmp_path / "d2")], 2)
    # one file reached through a folder and by name: ids x.txt and sub/x.txt differ, the text is the same
    (tmp_path / "d1" / "sub").mkdir()
    inner = _same_length_jsonl(tmp_path / "d1" / "sub" / "y.jsonl", ["p", "q"])
    with pytest.raises(UsageError, match=rf"{inner}: named twice by the inputs \({tmp_path / 'd1'} and {inner}\)"):
        plan_corpus([str(tmp_path / "d1"), str(inner)], 2)


def test_a_duplicate_id_past_the_probe_stops_the_run_at_its_second_shard(tiny_llama, tmp_path, monkeypatch):
    """Past the probed head the planner cannot see ids (they are inside the lines): the driver
    checks each shard's ids as it is written and stops the run at the second shard holding one, not
    at the end; a duplicate within one shard fails that shard in its worker, before the model runs."""
    monkeypatch.setattr(fusedata.corpus, "PROBE_BYTES", 64)  # the head holds the first line only
    corpus = _same_length_jsonl(tmp_path / "c.jsonl", ["d0", "d1", "d2", "d3", "d1", "d5"])
    plan = plan_corpus([str(corpus)], 1)
    assert [[doc for doc, _ in _docs(shard)] for shard in plan.shards] == [[f"d{i}"] for i in (0, 1, 2, 3, 1, 5)]
    out = tmp_path / "topk"
    with pytest.raises(UsageError, match=r"duplicate document id 'd1' \(in shard-00001.parquet and shard-00004.parquet\)"):
        run_extract(ExtractJob([str(corpus)], str(out), _job(tiny_llama, corpus, out).config, docs_per_shard=1,
                               quiet=True, log=lambda m: None))
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{i}.parquet" for i in range(5)]
    assert not (out / MANIFEST_NAME).exists()

    # two documents of one id in the same shard: that shard fails by name, the others are written
    corpus = _same_length_jsonl(tmp_path / "c2.jsonl", ["d0", "d1", "d2", "d3", "d4", "d4"])
    out = tmp_path / "topk-2"
    with pytest.raises(ShardsFailed, match=r"1 of 3 shard\(s\) failed.*shard-00002.parquet: duplicate document id 'd4'"):
        run_extract(ExtractJob([str(corpus)], str(out), _job(tiny_llama, corpus, out).config, docs_per_shard=2,
                               quiet=True, log=lambda m: None))
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_digest_index_finds_what_a_dict_finds():
    """The driver's id index (sorted runs merged as they grow) against a plain dict, over batches
    of random digests of which some repeat an earlier batch's."""
    import numpy as np

    from fusedata.stages.extract import DigestIndex

    rng = np.random.default_rng(0)
    index, reference = DigestIndex(), {}
    for shard in range(300):
        fresh = rng.integers(0, 2**63, size=int(rng.integers(0, 40)), dtype=np.uint64)
        if reference and rng.random() < 0.3:  # an id of an earlier shard
            fresh = np.append(fresh, np.uint64(rng.choice(list(reference))))
        want = next((reference[int(d)] for d in fresh if int(d) in reference), None)
        got = index.find(fresh)
        assert (got is None) == (want is None)
        if got is not None:  # the shard of one of the repeated digests
            assert got in {reference[int(d)] for d in fresh if int(d) in reference}
            continue
        index.add(fresh, shard)
        reference.update((int(d), shard) for d in fresh)
    assert len(index.runs) <= 12 and sum(len(k) for k, _ in index.runs) == len(reference)
