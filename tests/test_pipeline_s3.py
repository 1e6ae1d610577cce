"""`fusedata run` with `[pipeline] output` on a real S3 server (tests/s3.py): every step writes under the
URI (datasets, the checkpoint, eval.json; the plots step is left out to keep the test short), the
datasets equal the session's local spine, no temporary object or upload marker is left, a rerun skips
every step and rewrites nothing, and `fusedata plan` reads the finished run there."""

from __future__ import annotations

import json

from click.testing import CliRunner
from s3 import BUCKET, s3_prefix

from cli.main import main
from fusedata.pipeline import run_pipeline
from fusedata.storage import locate
from schemas.manifest import MANIFEST_NAME, Manifest


def _toml(out: str, llama, gemma, corpus, vocab) -> str:
    """The spine's settings (tests/conftest.py), so the datasets must come out the same."""
    return f"""
[pipeline]
output = "{out}"
top_k = 5
executor = "local"
quiet = true

[corpus]
inputs = ["{corpus}"]
docs_per_shard = 2

[models]
target = {{ name = "llama", model = "{llama}" }}
sources = [{{ name = "gemma", model = "{gemma}" }}]

[extract]
max_length = 24

[align]
cache_dir = "{vocab}"

[fuse]
method = "mince"

[train]
max_steps = 2
batch_tokens = 64
warmup_steps = 1
lr = 1e-3

[eval]
data = ["{corpus}"]
tasks = []
max_length = 24
"""


def _objects(s3, prefix: str) -> dict[str, tuple[int, int]]:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True)
    return {i.path: (i.size, i.mtime_ns) for i in s3.filesystem().get_file_info(sel) if i.type == pafs.FileType.File}


def test_pipeline_output_on_s3(s3, request, spine, tiny_llama, tiny_gemma, corpus_file, tmp_path):
    out = f"{s3_prefix(request)}/out"
    prefix = out.split(f"{BUCKET}/", 1)[1]
    path = tmp_path / "pipeline.toml"
    path.write_text(_toml(out, tiny_llama, tiny_gemma, corpus_file, spine / "vocab"), encoding="utf-8")
    results = run_pipeline(path, log=lambda m: None)
    assert [(r.step, r.status) for r in results] == [
        (s, "ran") for s in ["extract llama", "extract gemma", "align gemma", "fuse", "train", "eval"]]
    for d in ("topk/llama", "topk/gemma", "aligned/gemma", "fused"):
        got, want = Manifest.read(locate(f"{out}/{d}")), Manifest.read(spine / d)
        assert [s.sha256 for s in got.shards] == [s.sha256 for s in want.shards] and got.run == want.run
    keys = s3.keys(prefix)
    assert {"ckpt/trainer_state.json", "ckpt/model.safetensors", "eval.json",
            f"fused/{MANIFEST_NAME}"} <= set(keys)
    assert not [k for k in keys if ".tmp" in k or "uploading" in k]
    assert json.loads(locate(f"{out}/ckpt/trainer_state.json").read_text())["step"] == 2
    evaluation = json.loads(locate(f"{out}/eval.json").read_text())
    assert evaluation["result"]["model"] == f"{out}/ckpt" and evaluation["result"]["heldout"]["bits_per_byte"] > 0

    before = _objects(s3, prefix)
    assert [r.status for r in run_pipeline(path, log=lambda m: None)] == ["skipped"] * 6
    assert _objects(s3, prefix) == before  # nothing rewritten
    result = CliRunner().invoke(main, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert all(s["done"] for s in plan["stages"]) and plan["disk"]["free_bytes"] is None
