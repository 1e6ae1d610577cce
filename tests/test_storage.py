"""Datasets on object storage, against a real S3 server (moto's server mode on loopback, tests/s3.py).

Checked: extract → align → fuse with every output on s3:// gives the same datasets as the session's
local run (`spine`): the same shard bytes, hence equal decoded top-k and fused columns, and no
temporary object left; `inspect` reads the S3 dataset; a run killed mid-way resumes on S3 as on disk
(finished shards kept, partial and damaged ones redone, the manifest only once all are there);
`--overwrite` swaps a new run in and deletes only fusedata's objects; a bad bucket, endpoint or
credentials is one `error:` line and exit status 2, with no secret from the URI in it.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from s3 import BUCKET, s3_prefix, start_server, stop_server

import fusedata.dataset
import fusedata.stages.base
from cli.main import main
from fusedata.codec import decode_topk
from fusedata.dataset import open_dataset, read_shard
from fusedata.errors import UsageError
from fusedata.stages.align import AlignConfig, AlignJob, run_align
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from fusedata.stages.fuse import FuseConfig, FuseJob, run_fuse
from fusedata.storage import StorageError, locate
from schemas.manifest import MANIFEST_NAME, Manifest

RUN, SHARDS = "_run.json", ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
DATASETS = ("topk/llama", "topk/gemma", "aligned/gemma", "fused")


def _extract_job(model, corpus, output: str, logs: list[str] | None = None, **cfg) -> ExtractJob:
    """The session spine's extract settings (tests/conftest.py)."""
    config = ExtractConfig(model=str(model), **{"top_k": 5, "max_length": 24, **cfg})
    return ExtractJob([str(corpus)], output, config, docs_per_shard=2, quiet=True,
                      log=(logs if logs is not None else []).append)


def _spine_on(root: str, tiny_llama, tiny_gemma, corpus_file, vocab_cache) -> None:
    """The spine's four datasets with `root` (a URI) as their parent."""
    quiet = {"quiet": True, "log": lambda m: None}
    for name, folder in (("llama", tiny_llama), ("gemma", tiny_gemma)):
        run_extract(_extract_job(folder, corpus_file, f"{root}/topk/{name}"))
    run_align(AlignJob(f"{root}/topk/llama", f"{root}/topk/gemma", f"{root}/aligned/gemma",
                       AlignConfig(cache_dir=str(vocab_cache)), **quiet))
    run_fuse(FuseJob(f"{root}/topk/llama", [f"{root}/aligned/gemma"], f"{root}/fused", FuseConfig(method="mince"),
                     **quiet))


def _shards(manifest: Manifest) -> list[tuple[str, int, int, str]]:
    return [(s.name, s.rows, s.tokens, s.sha256) for s in manifest.shards]


def test_pipeline_on_s3_equals_local_disk(s3, request, spine, tiny_llama, tiny_gemma, corpus_file, tmp_path):
    root = s3_prefix(request)
    _spine_on(root, tiny_llama, tiny_gemma, corpus_file, tmp_path / "vocab")
    prefix = root.split(f"{BUCKET}/", 1)[1]
    keys = s3.keys(prefix)
    assert keys == sorted(f"{d}/{n}" for d in DATASETS for n in [*SHARDS, RUN, MANIFEST_NAME])  # no temporaries
    for d in DATASETS:
        remote, local = open_dataset(f"{root}/{d}"), open_dataset(spine / d)  # both verified (sha256)
        assert _shards(remote) == _shards(local)  # byte-identical shards
        assert remote.run == local.run and remote.kind == local.kind
        for s in remote.shards:
            got, want = read_shard(f"{root}/{d}/{s.name}"), read_shard(spine / d / s.name)
            assert got.equals(want)
            if d.startswith("topk"):
                a, b = decode_topk(got, s.name), decode_topk(want, s.name)
                assert (a.ids == b.ids).all() and (a.logprobs == b.logprobs).all()
    # inspect reads a dataset URI as it reads a folder
    result = CliRunner().invoke(main, ["inspect", f"{root}/fused", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["path"] == f"{root}/fused" and summary["rows"] == open_dataset(spine / "fused").rows
    # a rerun finds every dataset finished and verified: nothing is written
    logs: list[str] = []
    run_extract(_extract_job(tiny_llama, corpus_file, f"{root}/topk/llama", logs))
    assert logs == [f"{root}/topk/llama: already complete, nothing to do"]


def _crash_after(monkeypatch, n_ok: int, during_write: bool) -> dict[str, int]:
    """Let `n_ok` shards finish, then fail the next: in the stage, or half-way through uploading
    its Parquet file (the temporary object exists, partly written)."""
    calls = {"n": 0}
    if during_write:
        real_write = fusedata.dataset.pq.write_table

        def write_table(table, where, filesystem=None, **kw):
            calls["n"] += 1
            if calls["n"] > n_ok:
                with filesystem.open_output_stream(where) as f:
                    f.write(b"PAR1 partial")
                raise KeyboardInterrupt
            return real_write(table, where, filesystem=filesystem, **kw)

        monkeypatch.setattr(fusedata.dataset.pq, "write_table", write_table)
    else:
        real_process = fusedata.stages.base.process_shard

        def process_shard(*args, **kw):
            calls["n"] += 1
            if calls["n"] > n_ok:
                raise KeyboardInterrupt
            return real_process(*args, **kw)

        monkeypatch.setattr(fusedata.stages.base, "process_shard", process_shard)
    return calls


@pytest.mark.parametrize("during_write", [False, True], ids=["in-stage", "during-upload"])
def test_resume_on_s3_after_a_crash(during_write, s3, request, spine, tiny_llama, corpus_file, monkeypatch):
    out = f"{s3_prefix(request)}/topk"
    prefix = out.split(f"{BUCKET}/", 1)[1]
    _crash_after(monkeypatch, 1, during_write)
    with pytest.raises(KeyboardInterrupt):
        run_extract(_extract_job(tiny_llama, corpus_file, out))
    monkeypatch.undo()
    assert s3.keys(prefix) == [RUN, SHARDS[0]]  # no manifest, no partial or temporary object
    with pytest.raises(UsageError, match="has not finished"):
        open_dataset(out)
    # what a killed process leaves on S3: a partial object under a temporary name
    locate(f"{out}/.{SHARDS[1]}.tmp-999999").write_bytes_atomic(b"PAR1 partial")

    written: list[str] = []
    real = fusedata.dataset.write_parquet_atomic
    monkeypatch.setattr(fusedata.dataset, "write_parquet_atomic", lambda t, p, s: (written.append(p.name), real(t, p, s)))
    logs: list[str] = []
    manifest = run_extract(_extract_job(tiny_llama, corpus_file, out, logs))
    assert any("resuming, 1 of 3 shards already written" in line for line in logs)
    assert written == SHARDS[1:]  # the finished shard was kept
    assert s3.keys(prefix) == sorted([*SHARDS, RUN, MANIFEST_NAME])
    assert _shards(manifest) == _shards(Manifest.read(spine / "topk/llama"))  # as if never interrupted

    # a finished dataset whose shard was damaged afterwards: only that shard is recomputed
    locate(f"{out}/{SHARDS[2]}").write_bytes_atomic(b"not parquet")
    written.clear()
    logs.clear()
    manifest = run_extract(_extract_job(tiny_llama, corpus_file, out, logs))
    assert written == [SHARDS[2]] and any("missing or damaged" in line for line in logs)
    assert _shards(manifest) == _shards(Manifest.read(spine / "topk/llama"))


def test_overwrite_on_s3_deletes_only_fusedatas_objects(s3, request, spine, tiny_llama, corpus_file):
    out = f"{s3_prefix(request)}/topk"
    prefix = out.split(f"{BUCKET}/", 1)[1]
    run_extract(_extract_job(tiny_llama, corpus_file, out, top_k=4))  # another run's dataset
    locate(f"{out}/notes.txt").write_bytes_atomic(b"the user's")
    with pytest.raises(UsageError, match="another run's output"):
        run_extract(_extract_job(tiny_llama, corpus_file, out))
    job = _extract_job(tiny_llama, corpus_file, out)
    manifest = run_extract(ExtractJob(job.inputs, job.output, job.config, docs_per_shard=2, overwrite=True,
                                      quiet=True, log=lambda m: None))
    assert s3.keys(prefix) == sorted([*SHARDS, RUN, MANIFEST_NAME, "notes.txt"])  # staging gone, notes kept
    assert _shards(manifest) == _shards(Manifest.read(spine / "topk/llama"))
    assert locate(f"{out}/notes.txt").read_bytes() == b"the user's"


def _one_error_line(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _extract_cli(model, corpus, output: str) -> object:
    return CliRunner().invoke(main, ["extract", "--model", str(model), "--input", str(corpus), "--output", output,
                                     "--executor", "local", "--quiet", "--top-k", "4", "--max-length", "24"])


def test_bad_bucket_endpoint_or_credentials_is_one_error_line(s3, tiny_llama, corpus_file):
    from s3 import free_port

    line = _one_error_line(_extract_cli(tiny_llama, corpus_file, "s3://no-such-bucket/topk"))
    assert "s3://no-such-bucket/topk" in line and "no-such-bucket' not found" in line
    line = _one_error_line(CliRunner().invoke(main, ["inspect", f"s3://{BUCKET}/nothing-here"]))
    assert "no such dataset folder" in line
    # nothing listens there; the secret given in the URI's query is never shown
    uri = f"s3://KEY:TOPSECRET@{BUCKET}/topk?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    line = _one_error_line(_extract_cli(tiny_llama, corpus_file, uri))
    assert line.startswith(f"error: s3://{BUCKET}/topk") and "connect" in line.lower()
    assert "TOPSECRET" not in line and "KEY" not in line
    # a server that checks credentials refuses the test's
    strict = start_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}, bucket=None)
    try:
        with pytest.raises(StorageError, match="AccessKeyId|credentials|ACCESS_DENIED|Forbidden"):
            locate(f"s3://{BUCKET}/x?endpoint_override={strict.endpoint[7:]}&scheme=http").exists()
        s3_env = pytest.MonkeyPatch()
        s3_env.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        try:
            line = _one_error_line(_extract_cli(tiny_llama, corpus_file, f"s3://{BUCKET}/topk"))
        finally:
            s3_env.undo()
        assert line.startswith(f"error: s3://{BUCKET}/topk")
    finally:
        stop_server(strict)


def test_locations_join_show_and_nest():
    local = locate("out/topk")
    assert str(local / "shard-00000.parquet") == "out/topk/shard-00000.parquet"
    remote = locate("s3://K:S@b/run/topk?region=us-east-1")
    assert str(remote) == "s3://b/run/topk" and str(remote / "x") == "s3://b/run/topk/x"
    assert remote.path == "b/run/topk" and remote.parent.path == "b/run" and remote.name == "topk"
    q = "?region=us-east-1"  # given, so pyarrow sends no request to find the bucket's region
    assert remote.contains(locate(f"s3://b/run/topk/x{q}")) and not remote.contains(locate(f"s3://b/run/topk2{q}"))
    assert not remote.contains(locate("b/run/topk/x"))  # a local folder of that name is another place


def test_train_reads_a_fused_dataset_on_s3(s3, request, spine, tiny_llama, tmp_path):
    """`train --data s3://…` trains on the same windows as from the local folder: equal losses."""
    import pyarrow.fs as pafs

    from fusedata.train import TrainConfig, train

    uri = f"{s3_prefix(request)}/fused"
    pafs.copy_files(str(spine / "fused"), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=locate(uri).fs)
    cfg = dict(model=str(tiny_llama), lr=3e-3, warmup_steps=1, max_steps=2, batch_tokens=64, seed=3, log_every=0)
    remote = train(TrainConfig(data=uri, output=str(tmp_path / "a"), **cfg), log=lambda m: None)
    local = train(TrainConfig(data=str(spine / "fused"), output=str(tmp_path / "b"), **cfg), log=lambda m: None)
    assert [h["loss"] for h in remote["history"]] == pytest.approx([h["loss"] for h in local["history"]], rel=1e-6)
    assert remote["tokens"] == local["tokens"] > 0


def _train_cfg(spine, tiny_llama, output: str, **kw):
    from fusedata.train import TrainConfig

    return TrainConfig(data=str(spine / "fused"), model=str(tiny_llama), output=output, lr=3e-3, warmup_steps=1,
                       max_steps=2, batch_tokens=64, seed=3, log_every=0, save_every=1, **kw)


def test_train_output_on_s3_appears_whole_and_resumes(s3, request, spine, tiny_llama, tmp_path, monkeypatch):
    """`train --output s3://…` trains in a local working copy and uploads each checkpoint with its
    state file last: a run stopped between steps resumes from the URI, one stopped mid-upload (no
    state file there, the upload marker left) starts again; both end where an uninterrupted local run does."""
    import fusedata.train
    from fusedata.train import STATE_NAME, UPLOADING_NAME, checkpoint_done, train

    uri = f"{s3_prefix(request)}/ckpt"
    prefix = uri.split(f"{BUCKET}/", 1)[1]
    want = train(_train_cfg(spine, tiny_llama, str(tmp_path / "local")), log=lambda m: None)

    def stop_at(step, tokens, model):  # after the optimizer step, before its checkpoint is saved
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(_train_cfg(spine, tiny_llama, uri), log=lambda m: None, on_step=stop_at)
    assert json.loads(locate(f"{uri}/{STATE_NAME}").read_text())["step"] == 1  # step 1's checkpoint is there
    assert UPLOADING_NAME not in s3.keys(prefix) and not any(".tmp" in k for k in s3.keys(prefix))
    got = train(_train_cfg(spine, tiny_llama, uri), log=lambda m: None)  # resumed from the URI
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in want["history"]], rel=1e-5)
    assert checkpoint_done(_train_cfg(spine, tiny_llama, uri))
    local_files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert s3.keys(prefix) == local_files  # the same files, no marker, no temporary ones

    # stopped half-way through uploading a checkpoint: the URI holds no state file, only the marker
    uri2 = f"{s3_prefix(request)}/ckpt2"
    real, calls = fusedata.train.upload_checkpoint, {"n": 0}

    def cut_upload(local, remote):
        calls["n"] += 1
        if calls["n"] == 2:
            (remote / UPLOADING_NAME).write_bytes_atomic(b"")
            (remote / STATE_NAME).unlink(missing_ok=True)
            raise KeyboardInterrupt
        real(local, remote)
    monkeypatch.setattr(fusedata.train, "upload_checkpoint", cut_upload)
    with pytest.raises(KeyboardInterrupt):
        train(_train_cfg(spine, tiny_llama, uri2), log=lambda m: None)
    monkeypatch.undo()
    keys = s3.keys(uri2.split(f"{BUCKET}/", 1)[1])
    assert UPLOADING_NAME in keys and STATE_NAME not in keys and not checkpoint_done(_train_cfg(spine, tiny_llama, uri2))
    logs: list[str] = []
    got = train(_train_cfg(spine, tiny_llama, uri2), log=logs.append)
    assert any("cut short" in line for line in logs)
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in want["history"]], rel=1e-5)
    assert s3.keys(uri2.split(f"{BUCKET}/", 1)[1]) == local_files
    # a prefix holding other files is refused, as a local folder is
    locate(f"{s3_prefix(request)}/notes/a.txt").write_bytes_atomic(b"x")
    with pytest.raises(UsageError, match="is not a fusedata checkpoint"):
        train(_train_cfg(spine, tiny_llama, f"{s3_prefix(request)}/notes"), log=lambda m: None)


def test_publish_a_dataset_on_s3(s3, request, spine, monkeypatch, tmp_path):
    """`publish s3://…` uploads the same repo as from the local folder (shards downloaded one commit at
    a time), and a rerun finds every shard already there by streaming its git hash from S3."""
    import huggingface_hub.constants as constants
    import pyarrow.fs as pafs
    from fake_hub import FakeHub

    from fusedata.publish import publish

    uri = f"{s3_prefix(request)}/fused"
    pafs.copy_files(str(spine / "fused"), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=locate(uri).fs)
    token = "hf_FakeTokenForTests0123456789abcdef"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setenv("HF_TOKEN", token)
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    with FakeHub(token) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        publish(str(spine / "fused"), "org/from-disk", files_per_commit=2, log=lambda m: None)
        logs: list[str] = []
        publish(uri, "org/from-s3", files_per_commit=2, log=logs.append)
        remote, local = hub.files("org/from-s3"), hub.files("org/from-disk")
        remote["README.md"] = remote["README.md"].replace(b"org/from-s3", b"org/from-disk").replace(b"from-s3", b"from-disk")
        assert remote == local  # the shards, the manifest and the card (but for the repo's name)
        assert [c.added for c in hub.commits[3:]] == [c.added for c in hub.commits[:3]]
        logs.clear()
        publish(uri, "org/from-s3", files_per_commit=2, log=logs.append)
        assert any("3 of 3 shards already on the Hub" in line for line in logs)
