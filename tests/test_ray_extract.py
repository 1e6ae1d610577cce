"""The Ray executor on an embedded local Ray: same output as the local executor."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fusedata.stages.base
from fusedata.codec import codec_from_schema
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from schemas.manifest import Manifest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

K = 5


def _job(model: Path, corpus: Path, out: Path, logs: list[str]) -> ExtractJob:
    # one torch thread in the driver and in every actor: the same float sums, so byte-identical shards
    config = ExtractConfig(model=str(model), top_k=K, max_length=24, batch_tokens=256, threads=1)
    return ExtractJob([str(corpus)], str(out), config, docs_per_shard=2, quiet=True, log=logs.append)


def _read(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(folder / s.name) for s in Manifest.read(folder).shards])


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _read(a), _read(b)
    for col in ["doc_id", "window", "byte_start", "byte_end", "input_ids", "token_start", "token_end"]:
        assert ta.column(col).equals(tb.column(col)), col
    da, db = codec_from_schema(ta.schema).decode(ta, K), codec_from_schema(tb.schema).decode(tb, K)
    np.testing.assert_array_equal(da.ids, db.ids)
    np.testing.assert_array_equal(da.lengths, db.lengths)
    # another process may use another number of torch threads: allow float32 rounding
    np.testing.assert_allclose(da.logprobs, db.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(da.gold_logprob, db.gold_logprob, atol=1e-5, rtol=0)
    np.testing.assert_allclose(da.tail_mass, db.tail_mass, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ta.column("ce").to_numpy(), tb.column("ce").to_numpy(), atol=1e-5, rtol=0)
    ma, mb = Manifest.read(a), Manifest.read(b)
    assert ma.run == mb.run
    assert [(s.name, s.rows, s.tokens) for s in ma.shards] == [(s.name, s.rows, s.tokens) for s in mb.shards]


@pytest.fixture(scope="module")
def local_ray():
    from jobs.embedded_ray import start_local_ray

    start_local_ray(num_cpus=2)  # as `--executor ray` starts it: on loopback only
    yield
    ray.shutdown()


def test_ray_equals_local(local_ray, tiny_llama, tiny_gemma, corpus_file, tmp_path, monkeypatch):
    from jobs.ray_executor import RayExecutor

    for name, model in [("llama", tiny_llama), ("gemma", tiny_gemma)]:
        local, remote = tmp_path / f"local-{name}", tmp_path / f"ray-{name}"
        local_manifest = run_extract(_job(model, corpus_file, local, []))
        logs: list[str] = []
        manifest = run_extract(_job(model, corpus_file, remote, logs), RayExecutor(workers=2))
        assert len(manifest.shards) == 3
        # the workers read their own corpus ranges: the same bytes as the local executor writes
        assert [(s.name, s.sha256) for s in manifest.shards] == [(s.name, s.sha256) for s in local_manifest.shards]
        for s in manifest.shards:  # the manifest checksums the files the actors wrote
            assert s.sha256 == hashlib.sha256((remote / s.name).read_bytes()).hexdigest()
        assert not [p for p in remote.iterdir() if ".tmp-" in p.name]
        _assert_same(local, remote)


def test_ray_resumes_a_local_run(local_ray, tiny_llama, corpus_file, tmp_path, monkeypatch):
    """Interrupted locally after one shard, finished on Ray: only the missing shards run."""
    from jobs.ray_executor import RayExecutor

    ref = tmp_path / "ref"
    run_extract(_job(tiny_llama, corpus_file, ref, []))
    out = tmp_path / "out"
    real = fusedata.stages.base.process_shard
    calls = {"n": 0}

    def process_shard(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("worker lost")
        return real(*args, **kw)

    monkeypatch.setattr(fusedata.stages.base, "process_shard", process_shard)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_extract(_job(tiny_llama, corpus_file, out, []))
    monkeypatch.undo()
    first = out / "shard-00000.parquet"
    before = (first.stat().st_ino, first.stat().st_mtime_ns)
    logs: list[str] = []
    run_extract(_job(tiny_llama, corpus_file, out, logs), RayExecutor(workers=1))
    assert any("resuming, 1 of 3 shards already written" in line for line in logs)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == before
    _assert_same(ref, out)
