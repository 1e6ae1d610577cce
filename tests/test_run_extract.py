"""An extract run end to end with the local executor: the dataset folder, its manifest, resume
after an interruption, no-op reruns, and refusing another run's folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fusedata.dataset
import fusedata.stages.base
from fusedata.codec import DEFAULT_CODEC, codec_from_schema, get_codec
from fusedata.dataset import RUN_NAME, open_dataset
from fusedata.errors import UsageError
from fusedata.stages.extract import ExtractConfig, ExtractJob, ExtractStage, run_extract
from schemas.manifest import MANIFEST_NAME, Manifest
from schemas.topk import INPUT_KEY, topk_schema

K = 5


def _job(model: Path, corpus: Path, out: Path, logs: list[str] | None = None, **kw) -> ExtractJob:
    cfg = {"top_k": K, "max_length": 24, "batch_tokens": 256}
    cfg.update({k: kw.pop(k) for k in list(kw) if k in ExtractConfig.__dataclass_fields__})
    job_kw = {"docs_per_shard": 2, "quiet": True, "log": (logs if logs is not None else []).append}
    job_kw.update(kw)
    return ExtractJob([str(corpus)], str(out), ExtractConfig(model=str(model), **cfg), **job_kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (inode, mtime_ns, sha256) of every file in the folder."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, _sha(p)) for p in sorted(folder.iterdir())}


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _read(folder: Path) -> pa.Table:
    manifest = Manifest.read(folder)
    return pa.concat_tables([pq.read_table(folder / s.name) for s in manifest.shards])


def _assert_schema(got: pa.Schema, want: pa.Schema) -> None:
    """Equal schemas up to the name of list items (Parquet calls them `element`, Arrow `item`)."""
    assert got.names == want.names
    for g, w in zip(got, want, strict=True):
        assert g.nullable == w.nullable, g.name
        if pa.types.is_list(w.type):
            assert pa.types.is_list(g.type) and g.type.value_type == w.type.value_type, g.name
        else:
            assert g.type == w.type, g.name
    assert got.metadata is not None and want.metadata is not None
    assert {k: v for k, v in got.metadata.items() if k.startswith(b"fusedata.") and k != INPUT_KEY} == want.metadata


@pytest.fixture(scope="module")
def reference_run(tiny_llama, corpus_file, tmp_path_factory) -> Path:
    """An uninterrupted run that the other runs are compared with."""
    out = tmp_path_factory.mktemp("ref") / "topk"
    run_extract(_job(tiny_llama, corpus_file, out))
    return out


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_dataset_folder_and_manifest(which, tiny_llama, tiny_gemma, corpus_file, tmp_path, monkeypatch):
    model = {"llama": tiny_llama, "gemma": tiny_gemma}[which]
    out = tmp_path / "topk"
    replaced: list[str] = []
    real_replace = os.replace

    def spy_replace(src, dst):
        replaced.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    logs: list[str] = []
    manifest = run_extract(_job(model, corpus_file, out, logs))
    monkeypatch.undo()

    names = ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]  # 5 docs, 2 per shard
    assert replaced[-1] == MANIFEST_NAME  # written last, atomically
    assert sorted(n for n in replaced if n.startswith("shard-")) == names  # every shard renamed into place
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, MANIFEST_NAME, RUN_NAME])
    assert manifest.kind == "topk"
    assert [s.name for s in manifest.shards] == names
    assert Manifest.read(out) == manifest
    assert open_dataset(out, "topk") == manifest

    codec = get_codec(DEFAULT_CODEC)
    schema = topk_schema(codec.fields(), codec.metadata(), K)
    total_rows = total_tokens = 0
    docs: list[str] = []
    for entry in manifest.shards:
        path = out / entry.name
        assert entry.sha256 == _sha(path)
        assert entry.bytes == path.stat().st_size
        table = pq.read_table(path)
        _assert_schema(table.schema, schema)
        _assert_schema(pq.read_schema(path), schema)
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        assert entry.rows == table.num_rows > 0
        tokens = sum(len(ids) for ids in table.column("input_ids").to_pylist())
        assert entry.tokens == tokens
        total_rows += entry.rows
        total_tokens += tokens
        docs += table.column("doc_id").to_pylist()
        # polars reads the same values
        df = pl.read_parquet(path)
        assert df.height == table.num_rows and df.columns == schema.names
        for f in codec.fields():
            assert df[f.name].to_list() == table.column(f.name).to_pylist()
        assert df["doc_id"].to_list() == table.column("doc_id").to_pylist()

    assert manifest.rows == total_rows and manifest.tokens == total_tokens
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk["rows"] == total_rows and on_disk["tokens"] == total_tokens
    assert list(dict.fromkeys(docs)) == ["prose-1", "code-1", "utf8-1", "prose-2", "short-1"]

    table = _read(out)
    ce = np.asarray(table.column("ce").to_pylist())
    positions = np.asarray([len(x) - 1 for x in table.column("input_ids").to_pylist()])
    stats = manifest.stats
    assert stats["docs"] == 5 and stats["windows"] == total_rows and stats["tokens"] == total_tokens
    assert stats["positions"] == positions.sum()
    assert stats["mean_ce"] == pytest.approx(float((ce * positions).sum() / positions.sum()), rel=1e-6)
    assert stats["files"] == 1 and stats["empty_docs_skipped"] == 0 and stats["bad_lines_skipped"] == 0
    assert stats["bytes"] == sum(s.bytes for s in manifest.shards)

    run = manifest.run
    assert run["stage"] == "extract" and run["top_k"] == K and run["max_length"] == 24
    assert "docs" not in run and run["docs_per_shard"] == 2  # the corpus is known by its listing, not read
    assert run["model_path"] == str(Path(model).resolve())
    assert json.loads((out / RUN_NAME).read_text()) == run
    assert any(f"{total_rows} windows" in line for line in logs)

    # the stored distributions decode with the codec named in the file
    topk = codec_from_schema(table.schema).decode(table, K)
    assert topk.n_positions == positions.sum()
    assert np.all(topk.tail_mass >= 0) and np.all(topk.tail_mass <= 1)


def test_counts_skipped_lines_and_empty_docs(tiny_llama, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "The dog sleeps in the sun."}\n{oops\n{"text": ""}\n{"text": "A river runs."}\n')
    with pytest.raises(UsageError, match=rf"{corpus}:2: "):
        run_extract(_job(tiny_llama, corpus, tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # nothing written for a refused input
    manifest = run_extract(_job(tiny_llama, corpus, tmp_path / "b", skip_bad_lines=True))
    assert manifest.stats["bad_lines_skipped"] == 1
    assert manifest.stats["empty_docs_skipped"] == 1
    assert manifest.stats["docs"] == 2
    assert _read(tmp_path / "b").column("doc_id").to_pylist() == ["c.jsonl:1", "c.jsonl:4"]


class Interrupt(Exception):
    pass


def _fail_after(monkeypatch, n_ok: int, during_write: bool) -> None:
    """Let `n_ok` shards finish, then fail the next one: in the stage, or half-way through
    writing its Parquet file (the temporary file exists, partly written)."""
    calls = {"n": 0}
    if during_write:
        real_write = fusedata.dataset.pq.write_table

        def write_table(table, where, **kw):
            calls["n"] += 1
            if calls["n"] > n_ok:
                Path(where).write_bytes(b"PAR1 partial")
                raise KeyboardInterrupt
            return real_write(table, where, **kw)

        monkeypatch.setattr(fusedata.dataset.pq, "write_table", write_table)
    else:
        real_process = fusedata.stages.base.process_shard

        def process_shard(*args, **kw):
            calls["n"] += 1
            if calls["n"] > n_ok:
                raise Interrupt("worker lost")
            return real_process(*args, **kw)

        monkeypatch.setattr(fusedata.stages.base, "process_shard", process_shard)


@pytest.mark.parametrize("during_write", [False, True], ids=["in-stage", "during-write"])
def test_resume_after_interruption(during_write, tiny_llama, corpus_file, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "topk"
    _fail_after(monkeypatch, 1, during_write)
    with pytest.raises(KeyboardInterrupt if during_write else Interrupt):
        run_extract(_job(tiny_llama, corpus_file, out))
    monkeypatch.undo()

    assert not (out / MANIFEST_NAME).exists()
    assert _tmp_files(out) == []  # no partial file left behind
    assert sorted(p.name for p in out.iterdir()) == [RUN_NAME, "shard-00000.parquet"]
    with pytest.raises(UsageError, match="has not finished"):
        open_dataset(out)
    first = out / "shard-00000.parquet"
    before = (first.stat().st_ino, first.stat().st_mtime_ns, _sha(first))
    # what a killed (SIGKILL) process leaves: a partial file under a temporary name
    (out / ".shard-00001.parquet.tmp-999999").write_bytes(b"PAR1 partial")

    logs: list[str] = []
    manifest = run_extract(_job(tiny_llama, corpus_file, out, logs))
    assert any("resuming, 1 of 3 shards already written" in line for line in logs)
    assert (first.stat().st_ino, first.stat().st_mtime_ns, _sha(first)) == before  # not recomputed
    assert _tmp_files(out) == []

    # same result as an uninterrupted run: byte-identical shards, equal tables and statistics
    ref = Manifest.read(reference_run)
    assert [(s.name, s.rows, s.tokens, s.sha256) for s in manifest.shards] == [
        (s.name, s.rows, s.tokens, s.sha256) for s in ref.shards
    ]
    assert _read(out).equals(_read(reference_run))
    drop = {"tokens_per_second_this_run"}
    assert {k: v for k, v in manifest.stats.items() if k not in drop} == {
        k: v for k, v in ref.stats.items() if k not in drop
    }
    assert manifest.run == ref.run


def test_rerun_of_complete_run_is_a_noop(tiny_llama, corpus_file, reference_run, monkeypatch):
    before = _snapshot(reference_run)

    def no_work(*args, **kw):
        raise AssertionError("a complete run must not compute anything")

    monkeypatch.setattr(fusedata.stages.base, "process_shard", no_work)
    monkeypatch.setattr(ExtractStage, "setup", no_work)
    logs: list[str] = []
    manifest = run_extract(_job(tiny_llama, corpus_file, reference_run, logs))
    assert _snapshot(reference_run) == before
    assert any("already complete, nothing to do" in line for line in logs)
    assert manifest == Manifest.read(reference_run)


def test_another_runs_folder_is_refused_then_overwritten(tiny_llama, corpus_file, reference_run, tmp_path):
    out = tmp_path / "topk"
    run_extract(_job(tiny_llama, corpus_file, out))
    before = _snapshot(out)
    with pytest.raises(UsageError, match=r"holds another run's output \(differs in top_k: 5 -> 6\).*--overwrite"):
        run_extract(_job(tiny_llama, corpus_file, out, top_k=6))
    assert _snapshot(out) == before  # nothing damaged

    with pytest.raises(UsageError, match=r"differs in docs_per_shard: 2 -> 3"):
        run_extract(_job(tiny_llama, corpus_file, out, docs_per_shard=3))
    other = tmp_path / "other.jsonl"
    other.write_text(corpus_file.read_text(encoding="utf-8").replace("lighthouse", "windmill"), encoding="utf-8")
    with pytest.raises(UsageError, match=r"differs in corpus_hash"):
        run_extract(_job(tiny_llama, other, out))
    assert _snapshot(out) == before

    manifest = run_extract(_job(tiny_llama, corpus_file, out, top_k=6, overwrite=True))
    assert manifest.run["top_k"] == 6
    assert json.loads((out / RUN_NAME).read_text())["top_k"] == 6
    table = _read(out)
    decoded = codec_from_schema(table.schema).decode(table, 6)
    assert decoded.k == 6
    assert decoded.lengths.tolist() == [len(ids) - 1 for ids in table.column("input_ids").to_pylist()]
    # the top-6 lists extend the top-5 ones of the reference run
    ref = codec_from_schema(table.schema).decode(_read(reference_run), K)
    new = codec_from_schema(table.schema).decode(table, 6)
    np.testing.assert_array_equal(new.ids[:, :K], ref.ids)


def test_unfinished_run_of_other_settings_is_refused(tiny_llama, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "topk"
    _fail_after(monkeypatch, 1, during_write=False)
    with pytest.raises(Interrupt):
        run_extract(_job(tiny_llama, corpus_file, out))
    monkeypatch.undo()
    before = _snapshot(out)
    with pytest.raises(UsageError, match=r"differs in max_length: 24 -> 32"):
        run_extract(_job(tiny_llama, corpus_file, out, max_length=32))
    assert _snapshot(out) == before


def test_folder_with_foreign_files_or_a_file_is_refused(tiny_llama, corpus_file, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UsageError, match=r"holds files fusedata did not write; choose another folder$"):
        run_extract(_job(tiny_llama, corpus_file, foreign))
    with pytest.raises(UsageError, match=r"holds files fusedata did not write"):  # --overwrite never deletes them
        run_extract(_job(tiny_llama, corpus_file, foreign, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        run_extract(_job(tiny_llama, corpus_file, a_file))


def test_bad_input_leaves_a_finished_folder_alone(tiny_llama, corpus_file, reference_run, tmp_path):
    before = _snapshot(reference_run)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(UsageError, match=rf"{bad}:2: not valid UTF-8"):
        run_extract(_job(tiny_llama, bad, reference_run))
    with pytest.raises(UsageError, match="must be between 1 and the vocabulary size 400"):
        run_extract(_job(tiny_llama, corpus_file, reference_run, top_k=401))
    with pytest.raises(UsageError, match="unknown model spec 'no-such-model'"):
        run_extract(_job(Path("no-such-model"), corpus_file, reference_run))
    with pytest.raises(UsageError, match="no such file or folder"):
        run_extract(_job(tiny_llama, tmp_path / "missing.jsonl", reference_run))
    assert _snapshot(reference_run) == before


def test_overwrite_deletes_only_what_fusedata_wrote(tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "topk"
    run_extract(_job(tiny_llama, corpus_file, out))
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    (out / "shard-00007.parquet.bak").write_bytes(b"a backup")
    manifest = run_extract(_job(tiny_llama, corpus_file, out, top_k=6, overwrite=True))
    assert manifest.run["top_k"] == 6
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "a.png").read_bytes() == b"png"
    assert (out / "shard-00007.parquet.bak").is_file()
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == sorted(s.name for s in manifest.shards)


def test_output_folder_holding_the_input_is_refused(tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inside = out / "corpus.jsonl"
    inside.write_bytes(corpus_file.read_bytes())
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=rf"output folder {out} contains the input {inside}"):
            run_extract(ExtractJob([str(inside)], str(out), ExtractConfig(model=str(tiny_llama), top_k=K),
                                   overwrite=overwrite, quiet=True, log=lambda m: None))
    assert sorted(p.name for p in out.iterdir()) == ["corpus.jsonl"]


@pytest.mark.parametrize("record", ['{"a": 1}', "[1, 2]", "not json"])
def test_a_run_json_that_fusedata_did_not_write_proves_nothing(tiny_llama, corpus_file, tmp_path, record):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / RUN_NAME).write_text(record, encoding="utf-8")
    (folder / "data.csv").write_text("1,2", encoding="utf-8")
    with pytest.raises(UsageError, match=r"holds files fusedata did not write"):
        run_extract(_job(tiny_llama, corpus_file, folder, overwrite=True))
    assert sorted(p.name for p in folder.iterdir()) == [RUN_NAME, "data.csv"]


def test_interrupted_overwrite_keeps_the_old_dataset(tiny_llama, corpus_file, tmp_path, monkeypatch):
    """--overwrite builds the new run beside the old dataset and swaps it in only when complete:
    stopped half-way, the old dataset is still whole; the same command again resumes and replaces it."""
    out = tmp_path / "topk"
    old = run_extract(_job(tiny_llama, corpus_file, out))
    before = {name: v for name, v in _snapshot(out).items()}
    _fail_after(monkeypatch, 1, during_write=False)
    with pytest.raises(Interrupt):
        run_extract(_job(tiny_llama, corpus_file, out, top_k=6, overwrite=True))
    monkeypatch.undo()
    assert {n: v for n, v in _snapshot_files(out).items()} == before  # every old file as it was
    assert open_dataset(out).run == old.run
    logs: list[str] = []
    manifest = run_extract(_job(tiny_llama, corpus_file, out, logs, top_k=6, overwrite=True))
    assert any("resuming, 1 of 3 shards already written" in line for line in logs)
    assert manifest.run["top_k"] == 6 and Manifest.read(out).run["top_k"] == 6
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, RUN_NAME, *(s.name for s in manifest.shards)])
    for s in manifest.shards:
        assert s.sha256 == _sha(out / s.name)


def _snapshot_files(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, _sha(p)) for p in sorted(folder.iterdir()) if p.is_file()}


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["deleted", "zero-length leftover", "damaged leftover", "damaged listed"])
def test_resume_recomputes_what_does_not_verify(damage, tiny_llama, corpus_file, reference_run, tmp_path):
    """A rerun trusts no shard it has not verified: a shard deleted from a finished dataset, an empty
    or damaged leftover of a killed run (no manifest yet), or a listed shard whose bytes changed is
    recomputed, and the manifest ends up exactly the uninterrupted run's."""
    out = tmp_path / "topk"
    out.mkdir()
    for p in reference_run.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    shard = out / "shard-00001.parquet"
    if damage == "deleted":
        shard.unlink()
    elif damage == "zero-length leftover":
        (out / MANIFEST_NAME).unlink()
        shard.write_bytes(b"")
    elif damage == "damaged leftover":
        (out / MANIFEST_NAME).unlink()
        _flip_middle_byte(shard)
    else:
        _flip_middle_byte(shard)
    logs: list[str] = []
    manifest = run_extract(_job(tiny_llama, corpus_file, out, logs))
    assert not any("already complete" in line for line in logs), logs
    assert _sha(shard) == _sha(reference_run / "shard-00001.parquet")
    assert manifest.shards == Manifest.read(reference_run).shards
    assert fusedata.dataset.verify_dataset(out) == []
