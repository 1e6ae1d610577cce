"""`fusedata publish` with the real huggingface_hub client against a local fake Hub (tests/fake_hub.py):
repo creation, multi-commit upload, the dataset card, resume after a failed commit, the errors, and the
published layout read back with `datasets` and `decode_topk`. No external host is ever contacted."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from fake_hub import FakeHub

from cli.main import main
from fusedata.codec import decode_topk
from schemas.manifest import MANIFEST_NAME, Manifest

TOKEN = "hf_FakeTokenForTests0123456789abcdef"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1; HF_ENDPOINT and HF_TOKEN point the real client at it."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for model loading
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))  # no stored login
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(TOKEN) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


@pytest.fixture
def all_logs(caplog, monkeypatch):
    """Every log record at DEBUG, huggingface_hub's curl-style request logs (HF_DEBUG) included."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)
    for name in (None, "huggingface_hub", "httpx2", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    return caplog


def publish(*args: str):
    return CliRunner().invoke(main, ["publish", *args])


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_publish_fused_dataset(spine, hub, tmp_path, all_logs, capfd):
    fused = spine / "fused"
    manifest = Manifest.read(fused)
    result = publish(str(fused), "--repo-id", "org/fused-demo", "--files-per-commit", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("/datasets/org/fused-demo")

    # the repo was created as a dataset repo, every request carried the token
    assert ("POST", "/api/repos/create", True) in hub.requests
    assert ("dataset", "org/fused-demo") in hub.repos
    assert all(ok for _, _, ok in hub.requests)

    # shards in batches of 2, then the card and the manifest in the last commit
    assert [c.added for c in hub.commits] == [
        ["data/shard-00000.parquet", "data/shard-00001.parquet"], ["data/shard-00002.parquet"],
        ["fusedata_manifest.json", "README.md"]]
    files = hub.files("org/fused-demo")
    for s in manifest.shards:
        assert files[f"data/{s.name}"] == (fused / s.name).read_bytes()
    sent = Manifest.from_json(files["fusedata_manifest.json"].decode())
    assert [s.sha256 for s in sent.shards] == [s.sha256 for s in manifest.shards]
    assert sent.run == manifest.run

    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data/shard-*.parquet"}]}]
    assert "fusedata" in meta["tags"] and meta["license"] == "unknown"  # tiny test models record no licence
    for col in pq.read_schema(fused / manifest.shards[0].name).names:
        assert f"| `{col}` |" in card
    assert "labels" in card and "next-token labels" in card  # meanings from the README's wording
    assert manifest.run["target"]["tokenizer_hash"][:16] in card
    assert "MinCE" in card and "fusedata fuse --target" in card and "decode_topk(" in card
    assert "fusedata.codec" in card and "fusedata.k" in card
    assert f"{manifest.tokens:,}" in card and manifest.run["corpus_hash"] in card

    out, err = capfd.readouterr()
    assert "authorization: <TOKEN>" in all_logs.text  # the request logs were captured, the header redacted
    assert_no_token(result.output, all_logs.text, out, err)

    # the published layout, materialised locally, loads with datasets and decodes
    import datasets

    local = tmp_path / "from-hub"
    for path, data in files.items():
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(data)
    ds = datasets.load_dataset(str(local), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == manifest.rows
    got = decode_topk(ds.data.table, like=local / "data" / manifest.shards[0].name)
    want = decode_topk(pq.read_table(fused))
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)


@pytest.mark.parametrize("kind", ["topk/llama", "aligned/gemma"])
def test_publish_any_stage(spine, hub, kind):
    repo = f"org/{kind.replace('/', '-')}"
    result = publish(str(spine / kind), "--repo-id", repo)
    assert result.exit_code == 0, result.output
    files = hub.files(repo)
    assert sorted(files) == ["README.md", "data/shard-00000.parquet", "data/shard-00001.parquet",
                             "data/shard-00002.parquet", "fusedata_manifest.json"]
    card = files["README.md"].decode()
    assert front_matter(card)["configs"][0]["data_files"][0]["path"] == "data/shard-*.parquet"
    assert f"**{kind.split('/')[0]}** dataset" in card
    assert ("| `align_kind` |" in card) == kind.startswith("aligned")
    assert len(hub.commits) == 2  # one batch of shards, then the card


def test_card_lists_model_licences(spine, tmp_path):
    """Licences from the manifest, else from the bundled models' table (Gemma terms, Apache-2.0)."""
    topk = copy_dataset(spine / "topk/gemma", tmp_path / "topk")
    edit_manifest(topk, lambda d: d["run"].update(licence="Gemma Terms of Use"))
    result = publish(str(topk), "--repo-id", "org/t", "--dry-run")
    assert result.exit_code == 0, result.output
    card = result.output.split("--- README.md ---\n", 1)[1]
    assert front_matter(card)["license"] == "gemma"
    assert "Gemma Terms of Use" in card and "https://ai.google.dev/gemma/terms" in card

    fused = copy_dataset(spine / "fused", tmp_path / "fused")

    def bundled(d):
        d["run"]["target"]["model"] = "smollm2-135m"
        d["run"]["candidates"] = ["smollm2-135m", "gemma3-270m"]

    edit_manifest(fused, bundled)
    result = publish(str(fused), "--repo-id", "org/f", "--dry-run")
    assert result.exit_code == 0, result.output
    card = result.output.split("--- README.md ---\n", 1)[1]
    assert front_matter(card)["license"] == ["apache-2.0", "gemma"]
    assert "| `smollm2-135m` | Apache-2.0 |" in card and "| `gemma3-270m` | Gemma Terms of Use |" in card
    assert "fusedata extract --model gemma3-270m" in card


def test_dry_run_uploads_nothing_and_needs_no_token(spine, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = publish(str(spine / "fused"), "--repo-id", "org/dry", "--dry-run")
    assert result.exit_code == 0, result.output
    for name in ("data/shard-00000.parquet", "data/shard-00002.parquet", "fusedata_manifest.json", "README.md"):
        assert name in result.output
    size = (spine / "fused" / "shard-00001.parquet").stat().st_size
    assert f"{size:,} bytes" in result.output
    assert "configs:" in result.output and "## Columns" in result.output
    assert hub.requests == []


def test_no_token(spine, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = publish(str(spine / "fused"), "--repo-id", "org/x")
    assert result.exit_code == 2
    assert "error: no Hugging Face token: set HF_TOKEN" in result.output
    assert hub.requests == []


def test_wrong_token_is_refused_and_not_printed(spine, hub, monkeypatch, all_logs, capfd):
    wrong = "hf_WrongTokenThatMustNotLeak987654321"
    monkeypatch.setenv("HF_TOKEN", wrong)
    result = publish(str(spine / "fused"), "--repo-id", "org/x")
    assert result.exit_code == 2
    assert "refused the token (401)" in result.output
    out, err = capfd.readouterr()
    for text in (result.output, all_logs.text, out, err):
        assert wrong not in text
    assert hub.repos == {}


@pytest.mark.parametrize("other", ["model", "space"])
def test_repo_id_taken_by_another_repo_type(spine, hub, other):
    hub.add_repo("org/taken", other)
    result = publish(str(spine / "fused"), "--repo-id", "org/taken")
    assert result.exit_code == 2
    assert f"org/taken exists on the Hub as a {other} repo, not a dataset repo" in result.output
    assert ("dataset", "org/taken") not in hub.repos and hub.commits == []


def _no_manifest(folder: Path) -> None:
    (folder / MANIFEST_NAME).unlink()


def _missing_shard(folder: Path) -> None:
    (folder / "shard-00001.parquet").unlink()


def _changed_shard(folder: Path) -> None:
    path = folder / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_no_manifest, "no _manifest.json; the run that writes it has not finished"),
    (_missing_shard, "shards listed in the manifest are missing: shard-00001.parquet"),
    (_changed_shard, "differs from the manifest's"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_refuses_unfinished_or_damaged_folder(spine, hub, tmp_path, damage, message, dry_run):
    folder = copy_dataset(spine / "topk/llama", tmp_path / "topk")
    damage(folder)
    result = publish(str(folder), "--repo-id", "org/x", *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert hub.requests == []


def test_bad_repo_id(spine, hub):
    result = publish(str(spine / "fused"), "--repo-id", "no-namespace")
    assert result.exit_code == 2 and "expected 'org/name'" in result.output


def test_interrupted_upload_resumes(spine, hub, all_logs):
    folder = spine / "topk/llama"
    hub.fail_commits = {2}  # the second commit request answers 500
    first = publish(str(folder), "--repo-id", "org/resume", "--files-per-commit", "1")
    assert first.exit_code == 2
    assert "stopped at commit 2/4" in first.output
    assert "1 of 3 shards are on the Hub" in first.output and "Rerun the same command to continue" in first.output
    assert "published" not in first.output
    assert sorted(hub.files("org/resume")) == ["data/shard-00000.parquet"]  # no card: not claimed complete

    hub.fail_commits = set()
    second = publish(str(folder), "--repo-id", "org/resume", "--files-per-commit", "1")
    assert second.exit_code == 0, second.output
    assert "1 of 3 shards already on the Hub" in second.output
    added = [c.added for c in hub.commits]
    assert added == [["data/shard-00000.parquet"], ["data/shard-00001.parquet"], ["data/shard-00002.parquet"],
                     ["fusedata_manifest.json", "README.md"]]  # shard 0 sent once: the rerun skipped it
    assert ("POST", "/api/repos/create", True) in hub.requests
    assert_no_token(first.output, second.output, all_logs.text)

    third = publish(str(folder), "--repo-id", "org/resume")  # everything there: no new shard commits
    assert third.exit_code == 0, third.output
    assert len(hub.commits) == 4


def test_revision_branch_and_stale_shards(spine, hub):
    repo = hub.add_repo("org/branchy")
    repo.branches["main"]["data/shard-00009.parquet"] = b"old shard from an earlier, larger version"
    result = publish(str(spine / "topk/llama"), "--repo-id", "org/branchy", "--revision", "v2")
    assert result.exit_code == 0, result.output
    assert ("POST", "/api/repos/create", True) not in hub.requests
    assert all(c.revision == "v2" for c in hub.commits)
    assert "data/shard-00009.parquet" not in hub.files("org/branchy", "v2")  # would be matched by data/shard-*
    assert hub.commits[-1].deleted == ["data/shard-00009.parquet"]
    assert sorted(hub.files("org/branchy", "main")) == ["data/shard-00009.parquet"]  # main untouched


@pytest.mark.parametrize("kind", ["topk/llama", "aligned/gemma", "fused"])
def test_reproduce_commands_parse_and_carry_the_stored_settings(spine, kind):
    """The card's commands are real `fusedata` command lines whose options are the run's settings."""
    import shlex

    import click

    from cli.main import main
    from fusedata.publish import reproduce_commands

    manifest = Manifest.read(spine / kind)
    commands = reproduce_commands(manifest, "zq")
    for line in commands:
        words = shlex.split(line)
        assert words[0] == "fusedata"
        ctx = main.commands[words[1]].make_context(words[1], words[2:])
        params = ctx.params
        if words[1] == "extract":
            assert params["top_k"] == manifest.run.get("top_k") and params["max_length"] == 24
            assert params["docs_per_shard"] == 2
        elif words[1] == "fuse":
            stored = manifest.run["fuse"]
            keys = ("method", "unit", "metric", "k_out", "codec") + ("temperature",) * (stored["method"] == "avgce")
            assert {k: params[k] for k in keys} == {k: stored[k] for k in keys}
            assert ("temperature" in stored) is (stored["method"] == "avgce")  # MinCE does not use it
            assert params["no_target"] is not stored["include_target"]
        elif words[1] == "align" and manifest.kind == "aligned":
            assert (params["vocab"], params["sequence"]) == (manifest.run["align"]["vocab"],
                                                           manifest.run["align"]["sequence"])
        assert isinstance(ctx, click.Context)
    assert commands[-1].startswith({"topk": "fusedata extract", "aligned": "fusedata align",
                                    "fused": "fusedata fuse"}[manifest.kind])


@pytest.fixture(scope="module")
def fused_plain(spine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("publish-plain") / "fused-plain"
    r = CliRunner().invoke(main, ["export", str(spine / "fused"), "--output", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def materialise(files: dict[str, bytes], root: Path) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def test_publish_plain_export_alone(spine, hub, fused_plain, tmp_path):
    result = publish(str(fused_plain), "--repo-id", "org/plain")
    assert result.exit_code == 0, result.output
    files = hub.files("org/plain")
    card = files["README.md"].decode()
    assert "**fused** dataset" in card and "in the plain layout" in card and "no codec" in card
    assert "| `topk_ids` | list<list<int32>> |" in card and "| `winner` |" in card
    assert "decode_topk(" not in card and "fusedata export fused --output fused-plain --layout plain" in card
    assert "MinCE" in card  # how the rows were made: the source's run
    import datasets

    ds = datasets.load_dataset(str(materialise(files, tmp_path / "hub")), split="train",
                               cache_dir=str(tmp_path / "cache"))
    want = decode_topk(pq.read_table(spine / "fused"))
    assert ds[0]["topk_ids"][0] == want.ids[0][want.ids[0] >= 0].tolist()  # numbers, no fusedata needed


def test_publish_compact_and_plain_as_two_configs(spine, hub, fused_plain, tmp_path):
    result = publish(str(spine / "fused"), "--repo-id", "org/both", "--plain", str(fused_plain))
    assert result.exit_code == 0, result.output
    files = hub.files("org/both")
    names = [s.name for s in Manifest.read(spine / "fused").shards]
    assert sorted(files) == sorted(["README.md", "fusedata_manifest.json", "fusedata_manifest_plain.json"]
                                   + [f"data/{n}" for n in names] + [f"plain/{n}" for n in names])
    card = files["README.md"].decode()
    assert front_matter(card)["configs"] == [
        {"config_name": "plain", "data_files": [{"split": "train", "path": "plain/shard-*.parquet"}], "default": True},
        {"config_name": "compact", "data_files": [{"split": "train", "path": "data/shard-*.parquet"}]}]
    assert "## Configs" in card and "| `plain` (default) | `plain/` |" in card and "| `compact` | `data/` |" in card
    assert "## Columns of the `plain` config" in card and "## Columns of the `compact` config" in card
    import datasets

    local = materialise(files, tmp_path / "hub")
    plain = datasets.load_dataset(str(local), "plain", split="train", cache_dir=str(tmp_path / "c1"))
    compact = datasets.load_dataset(str(local), "compact", split="train", cache_dir=str(tmp_path / "c2"))
    assert plain["input_ids"] == compact["input_ids"] and plain["winner"] == compact["winner"]
    assert "topk_ids" in plain.column_names and "topk_zq" in compact.column_names

    again = publish(str(spine / "fused"), "--repo-id", "org/both", "--plain", str(fused_plain))  # all there
    assert again.exit_code == 0 and f"{2 * len(names)} of {2 * len(names)} shards already on the Hub" in again.output


def test_plain_config_must_be_an_export_of_the_dataset(spine, hub, tmp_path):
    other = tmp_path / "llama-plain"
    assert CliRunner().invoke(main, ["export", str(spine / "topk/llama"), "--output", str(other), "--quiet"]).exit_code == 0
    result = publish(str(spine / "fused"), "--repo-id", "org/x", "--plain", str(other))
    assert result.exit_code == 2 and "is not an export of" in result.output
    assert hub.requests == []
