"""`fusedata extract` through click: the success path, and every bad input stopping with exit
status 2, one `error: ...` line, no traceback, and nothing already written damaged."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import unreadable

import fusedata.stages.base
from cli.main import main
from schemas.manifest import MANIFEST_NAME, Manifest


def _extract(model, inputs, output, *extra) -> tuple[int, str, object]:
    args = ["extract", "--model", str(model), "--output", str(output), "--executor", "local", "--quiet",
            "--top-k", "4", "--max-length", "32", "--docs-per-shard", "2"]
    for i in inputs if isinstance(inputs, list | tuple) else [inputs]:
        args += ["--input", str(i)]
    result = CliRunner().invoke(main, args + list(extra))
    return result.exit_code, result.stderr, result


def _assert_usage_error(code: int, stderr: str, result, pattern: str) -> str:
    """Exit 2, exactly one line on stderr, `error: <message matching pattern>`, no traceback."""
    assert code == 2, (stderr, result.exception)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def finished(tiny_llama, corpus_file, tmp_path_factory) -> Path:
    """A finished output folder that failing commands must leave alone."""
    out = tmp_path_factory.mktemp("cli") / "topk"
    code, stderr, result = _extract(tiny_llama, corpus_file, out)
    assert code == 0, (stderr, result.exception)
    return out


def test_success(tiny_gemma, corpus_file, tmp_path):
    out = tmp_path / "topk"
    code, stderr, result = _extract(tiny_gemma, corpus_file, out)
    assert code == 0, (stderr, result.exception)
    manifest = Manifest.read(out)
    assert manifest.kind == "topk" and manifest.run["top_k"] == 4 and manifest.run["max_length"] == 32
    assert len(manifest.shards) == 3  # 5 documents, 2 per shard
    assert manifest.stats["docs"] == 5
    assert f"{manifest.rows} windows" in stderr
    assert "Traceback" not in stderr
    first = pq.read_table(out / manifest.shards[0].name)
    assert first.column("doc_id").to_pylist()[0] == "prose-1"
    # the same command again is a no-op
    before = _snapshot(out)
    code, stderr, _ = _extract(tiny_gemma, corpus_file, out)
    assert code == 0 and "already complete, nothing to do" in stderr
    assert _snapshot(out) == before


def test_missing_input(tiny_llama, finished, tmp_path):
    before = _snapshot(finished)
    missing = tmp_path / "nope.jsonl"
    _assert_usage_error(*_extract(tiny_llama, missing, finished), rf"error: {missing}: no such file or folder")
    _assert_usage_error(*_extract(tiny_llama, tmp_path / "*.jsonl", finished), r"the pattern matches no files")
    assert _snapshot(finished) == before


def test_unreadable_input(tiny_llama, tmp_path, monkeypatch):
    corpus = tmp_path / "locked.jsonl"
    corpus.write_text('{"text": "hello there"}\n', encoding="utf-8")
    with unreadable(corpus, monkeypatch):
        _assert_usage_error(*_extract(tiny_llama, corpus, tmp_path / "out"), rf"{corpus}: cannot read \(Permission denied\)")
    assert not (tmp_path / "out").exists()


def test_malformed_line(tiny_llama, finished, tmp_path):
    before = _snapshot(finished)
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "The dog sleeps."}\n{"text": "A river"\n{"text": "Rain fell."}\n', encoding="utf-8")
    _assert_usage_error(*_extract(tiny_llama, corpus, finished), rf"error: {corpus}:2: .*--skip-bad-lines")
    assert _snapshot(finished) == before
    # --skip-bad-lines skips and counts it
    out = tmp_path / "skipped"
    code, stderr, result = _extract(tiny_llama, corpus, out, "--skip-bad-lines")
    assert code == 0, (stderr, result.exception)
    manifest = Manifest.read(out)
    assert manifest.stats["bad_lines_skipped"] == 1 and manifest.stats["docs"] == 2


def test_empty_documents(tiny_llama, tmp_path):
    corpus = tmp_path / "e.jsonl"
    corpus.write_text('{"text": ""}\n{"text": "The dog sleeps."}\n{"text": "  "}\n', encoding="utf-8")
    code, stderr, result = _extract(tiny_llama, corpus, tmp_path / "out")
    assert code == 0, (stderr, result.exception)
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.stats["empty_docs_skipped"] == 2 and manifest.stats["docs"] == 1
    only_empty = tmp_path / "only.jsonl"
    only_empty.write_text('{"text": ""}\n', encoding="utf-8")
    _assert_usage_error(*_extract(tiny_llama, only_empty, tmp_path / "out2"), r"the corpus holds no non-empty documents")
    assert not (tmp_path / "out2").exists()


def test_non_utf8(tiny_llama, finished, tmp_path):
    before = _snapshot(finished)
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n' + '{"text": "café"}\n'.encode("latin-1"))
    _assert_usage_error(*_extract(tiny_llama, jsonl, finished), rf"error: {jsonl}:2: not valid UTF-8")
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("café".encode("latin-1"))
    _assert_usage_error(*_extract(tiny_llama, txt, finished), rf"error: {txt}: not valid UTF-8 at byte 3")
    assert _snapshot(finished) == before


def test_unknown_model(corpus_file, finished, tmp_path):
    before = _snapshot(finished)
    _assert_usage_error(*_extract("no-such-model", corpus_file, finished), r"unknown model spec 'no-such-model'.*smollm2-135m")
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    _assert_usage_error(*_extract(not_a_model, corpus_file, finished), r"folder has no config.json")
    _assert_usage_error(*_extract(tmp_path / "missing.gguf", corpus_file, finished), r"model file not found")
    assert _snapshot(finished) == before


def test_top_k_larger_than_vocab(tiny_llama, corpus_file, finished):
    before = _snapshot(finished)
    code, stderr, result = _extract(tiny_llama, corpus_file, finished, "--top-k", "100000")
    _assert_usage_error(code, stderr, result, r"--top-k 100000 must be between 1 and the vocabulary size 400")
    assert _snapshot(finished) == before


@pytest.mark.parametrize(("option", "value"), [("--batch-tokens", "-1"), ("--vllm-batch-tokens", "-1"),
                                               ("--vllm-kv-cache-gb", "0"),
                                               ("--workers", "0"), ("--workers", "-1")])
def test_out_of_range_option_stops_before_anything_runs(tiny_llama, corpus_file, finished, option, value):
    before = _snapshot(finished)
    _assert_usage_error(*_extract(tiny_llama, corpus_file, finished, option, value),
                        rf"Invalid value for '{option}': .*{value}")
    assert _snapshot(finished) == before


def test_another_runs_folder(tiny_llama, corpus_file, finished, tmp_path):
    before = _snapshot(finished)
    line = _assert_usage_error(*_extract(tiny_llama, corpus_file, finished, "--top-k", "3"), r"holds another run's output")
    assert "top_k: 4 -> 3" in line and "--overwrite" in line
    assert _snapshot(finished) == before
    # --overwrite replaces it (on a copy, to keep the shared folder)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in finished.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    code, stderr, result = _extract(tiny_llama, corpus_file, copy, "--top-k", "3", "--overwrite")
    assert code == 0, (stderr, result.exception)
    assert json.loads((copy / MANIFEST_NAME).read_text())["run"]["top_k"] == 3


def test_interrupt_keeps_finished_shards(tiny_llama, corpus_file, tmp_path, monkeypatch):
    real = fusedata.stages.base.process_shard
    calls = {"n": 0}

    def process_shard(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(fusedata.stages.base, "process_shard", process_shard)
    out = tmp_path / "out"
    code, stderr, _ = _extract(tiny_llama, corpus_file, out)
    assert code == 130
    assert stderr.strip().splitlines()[-1].startswith("interrupted: finished shards are kept")
    assert sorted(p.name for p in out.iterdir()) == ["_run.json", "shard-00000.parquet"]
    monkeypatch.undo()
    code, stderr, _ = _extract(tiny_llama, corpus_file, out)
    assert code == 0 and "resuming, 1 of 3 shards already written" in stderr
    assert len(Manifest.read(out).shards) == 3


def test_unreachable_hub_id(corpus_file, tmp_path, monkeypatch):
    """A hub id with no hub (the tests run offline) fails with one clear line, quickly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stderr, result = _extract("someorg/no-such-model", corpus_file, tmp_path / "out")
    _assert_usage_error(code, stderr, result, r"cannot load the tokenizer of 'someorg/no-such-model'")
    assert not (tmp_path / "out").exists()


def test_progress_display_does_not_break_the_run(tiny_llama, corpus_file, tmp_path):
    args = ["extract", "--model", str(tiny_llama), "--input", str(corpus_file), "--output", str(tmp_path / "out"),
            "--executor", "local", "--top-k", "2", "--docs-per-shard", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "5/5 docs" in result.stderr  # the bar counted every document
    assert len(Manifest.read(tmp_path / "out").shards) == 2


@pytest.mark.parametrize(("option", "value", "pattern"), [
    ("--warmup-ratio", "1.5", r"^error: --warmup-ratio: must be in \[0, 1\)$"),
    ("--lam", "-0.1", r"^error: --lam: must be between 0 and 1$"),
    ("--weight-decay", "-1", r"^error: --weight-decay: must be >= 0$"),
])
def test_train_refuses_bad_options_by_name(tmp_path, option, value, pattern):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "none"), "--model", "m",
                                       "--output", str(tmp_path / "ckpt"), option, value])
    _assert_usage_error(result.exit_code, result.stderr, result, pattern)
    assert not (tmp_path / "ckpt").exists()


def _copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_refused_overwrite_keeps_the_old_dataset(tiny_llama, corpus_file, finished, spine, tmp_path):
    """--overwrite replaces a dataset only once the new run has been validated: a k above the
    codec's limit or an AvgCE temperature of 0 stops before anything is deleted."""
    topk = _copy_dataset(finished, tmp_path / "topk")
    before = _snapshot(topk)
    _assert_usage_error(*_extract(tiny_llama, corpus_file, topk, "--top-k", "300", "--overwrite"),
                        r"zq: k=300 outside 1\.\.254")
    assert _snapshot(topk) == before

    fused = _copy_dataset(spine / "fused", tmp_path / "fused")
    before = _snapshot(fused)
    for temperature in ("0", "-1", "nan"):
        result = CliRunner().invoke(main, ["fuse", "--target", str(spine / "topk/llama"), "--aligned",
                                           str(spine / "aligned/gemma"), "--output", str(fused), "--method", "avgce",
                                           "--temperature", temperature, "--overwrite", "--executor", "local",
                                           "--quiet"])
        _assert_usage_error(result.exit_code, result.stderr, result, r"error: --temperature: must be > 0")
    assert _snapshot(fused) == before


def test_python_m_cli_main_knows_every_command(tmp_path):
    """`python -m cli.main` registers every command before it runs (explore came after the guard)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for command in ("explore", "publish", "run", "extract"):
        done = subprocess.run([sys.executable, "-m", "cli.main", command, "--help"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"Usage: python -m cli.main {command}" in done.stdout


@pytest.mark.parametrize("command, config, skip, renamed", [
    ("extract", "fusedata.stages.extract:ExtractConfig", {"codec"}, {}),
    ("extract", "fusedata.stages.extract:ExtractJob", {"config", "log"}, {}),
    ("align", "fusedata.stages.align:AlignConfig", {"codec"}, {}),
    ("align", "fusedata.stages.align:AlignJob", {"config", "log"}, {}),
    ("fuse", "fusedata.stages.fuse:FuseConfig", {"codec", "include_target"}, {}),
    ("fuse", "fusedata.stages.fuse:FuseJob", {"config", "log", "names"}, {}),
    ("train", "fusedata.train:TrainConfig", set(), {}),
])
def test_cli_options_are_the_config_fields(command, config, skip, renamed):
    """Every field of a stage's config is a command-line option with the dataclass's default (the
    codec's default is resolved at run time; --no-target is include_target's negation)."""
    import dataclasses
    import importlib

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    params = {p.name: p for p in main.commands[command].params}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("internal"):
            continue
        param = params.get(renamed.get(f.name, f.name))
        assert param is not None, f"{command}: no option for {name}.{f.name}"
        if f.default is not dataclasses.MISSING and not param.required:
            default = param.get_default(click.Context(main.commands[command]))
            assert default == f.default, f"{command} --{f.name}: {param.default!r} != {f.default!r}"
    assert "no_target" in params if command == "fuse" else True


def _rewritten(shard: Path) -> None:
    """The same table written again with another compression: other bytes (the sha256 differs), the
    same data, so a reader that skips the check gives the same result as on the original."""
    table = pq.read_table(shard)
    pq.write_table(table, shard, compression="snappy")


def _flip_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _damaged_copies(spine: Path, tmp_path: Path, damage) -> tuple[Path, Path, Path]:
    """Copies of topk/llama, aligned/gemma and fused with `damage` done to each one's shard-00001."""
    copies = (_copy_dataset(spine / "topk/llama", tmp_path / "topk"),
              _copy_dataset(spine / "aligned/gemma", tmp_path / "aligned"),
              _copy_dataset(spine / "fused", tmp_path / "fused"))
    for folder in copies:
        damage(folder / "shard-00001.parquet")
    return copies


def _reading_commands(spine: Path, tiny_llama: Path, tmp_path: Path, topk: Path, aligned: Path,
                      fused: Path) -> dict[str, tuple[list[str], Path]]:
    """Each command that reads a dataset: (its arguments, the damaged folder it reads)."""
    local = ["--executor", "local", "--quiet"]
    return {
        "inspect": (["inspect", str(topk)], topk),
        "inspect --plot": (["inspect", str(fused), "--plot", str(tmp_path / "plots")], fused),
        "align": (["align", "--target", str(topk), "--source", str(spine / "topk/gemma"), "--output",
                   str(tmp_path / "out-align"), "--cache-dir", str(spine / "vocab"), *local], topk),
        "fuse": (["fuse", "--target", str(spine / "topk/llama"), "--aligned", str(aligned), "--output",
                  str(tmp_path / "out-fuse"), *local], aligned),
        "train": (["train", "--data", str(fused), "--model", str(tiny_llama), "--output", str(tmp_path / "ckpt"),
                   "--max-steps", "1"], fused),
    }


def test_every_reader_verifies_the_shards_it_reads(tiny_llama, spine, tmp_path):
    """inspect, align, fuse and train check each input shard against its manifest sha256 and refuse a
    damaged one by file name; --no-verify reads it as before."""
    topk, aligned, fused = _damaged_copies(spine, tmp_path, _flip_byte)
    commands = _reading_commands(spine, tiny_llama, tmp_path, topk, aligned, fused)
    for name, (args, folder) in commands.items():
        result = CliRunner().invoke(main, args)
        _assert_usage_error(result.exit_code, result.stderr, result,
                            re.escape(str(folder / "shard-00001.parquet")) + ": damaged")
        assert not (tmp_path / "out-align").exists() and not (tmp_path / "out-fuse").exists(), name

    for folder, src in ((topk, spine / "topk/llama"), (aligned, spine / "aligned/gemma"), (fused, spine / "fused")):
        (folder / "shard-00001.parquet").write_bytes((src / "shard-00001.parquet").read_bytes())
        _rewritten(folder / "shard-00001.parquet")
    for name, (args, _) in commands.items():
        result = CliRunner().invoke(main, [*args, "--no-verify"])
        assert result.exit_code == 0, (name, result.stderr, result.exception)
    for s in Manifest.read(spine / "fused").shards:  # fuse read the rewritten shard as the original
        assert pq.read_table(tmp_path / "out-fuse" / s.name).equals(pq.read_table(spine / "fused" / s.name))


def _truncated(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def test_unreadable_shard_is_one_error_line_naming_it(tiny_llama, spine, tmp_path):
    """With --no-verify, a truncated shard still stops every reader with one error line naming it."""
    commands = _reading_commands(spine, tiny_llama, tmp_path, *_damaged_copies(spine, tmp_path, _truncated))
    for args, folder in commands.values():
        result = CliRunner().invoke(main, [*args, "--no-verify"])
        _assert_usage_error(result.exit_code, result.stderr, result,
                            re.escape(str(folder / "shard-00001.parquet")) + ": damaged or not a readable shard")


def test_train_refuses_a_label_outside_the_vocabulary(tiny_llama, spine, tmp_path):
    fused = _copy_dataset(spine / "fused", tmp_path / "fused")
    for shard in sorted(fused.glob("shard-*.parquet")):
        table = pq.read_table(shard)
        labels = table.column("labels").to_pylist()
        labels[0][0] = 10**6
        table = table.set_column(table.schema.get_field_index("labels"), "labels",
                                 pa.array(labels, table.schema.field("labels").type))
        pq.write_table(table, shard)
    result = CliRunner().invoke(main, ["train", "--data", str(fused), "--model", str(tiny_llama), "--output",
                                       str(tmp_path / "ckpt"), "--max-steps", "1", "--warmup-steps", "0",
                                       "--no-verify"])
    _assert_usage_error(result.exit_code, result.stderr, result,
                        r"fused/shard-\d{5}\.parquet: column 'labels' holds token ids outside the vocabulary")


def test_eval_refuses_when_there_is_nothing_to_score(tiny_llama, tmp_path):
    """No data and no tasks is a usage error, and so is held-out data with no token to predict (a
    one-token document), instead of a table of zeros."""
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--tasks", ""])
    _assert_usage_error(result.exit_code, result.stderr, result, r"nothing to evaluate")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a"}) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--data", str(one), "--tasks", ""])
    _assert_usage_error(result.exit_code, result.stderr, result, rf"{re.escape(str(one))}: nothing to score")
