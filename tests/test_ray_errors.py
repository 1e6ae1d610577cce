"""A failure inside a Ray worker reaches the user as it does with the local executor: the same one
`error:` line (naming the shard) and exit status, not Ray's multi-line wrapping of it; `--debug`
prints the worker's traceback too."""

from __future__ import annotations

import re
import shutil

import pytest
from click.testing import CliRunner

from cli.main import main
from schemas.manifest import MANIFEST_NAME

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    from jobs.ray_executor import init_ray

    init_ray(None, num_cpus=2, log=lambda m: None)  # as `--executor ray` starts it (and quiets Ray's logging)
    yield
    ray.shutdown()


def _extract(model, corpus, out, executor: str, *extra: str):
    return CliRunner().invoke(main, [*extra, "extract", "--model", str(model), "--input", str(corpus), "--output",
                                     str(out), "--top-k", "5", "--max-length", "24", "--docs-per-shard", "2",
                                     "--executor", executor, "--quiet"])


def _error(result) -> tuple[int, str]:
    """(exit status, the error line), with the random digits of temporary file names blanked."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    return result.exit_code, re.sub(r"\.tmp-\d+", ".tmp-N", lines[-1])


def _same_error_on_both(model, corpus, out, capfd, *ray_options: str) -> tuple[int, str]:
    """Run the same failing command on each executor: (exit status, error line), the same on both."""
    errors = {}
    for executor in ("local", "ray"):
        result = _extract(model, corpus, out, executor, *(ray_options if executor == "ray" else ()))
        if "--debug" in ray_options and executor == "ray":
            assert "Traceback" in result.stderr and "the worker's traceback:" in result.stderr, result.stderr
        else:
            assert "Traceback" not in result.stderr and "Ray" not in result.stderr, result.stderr
        assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1, result.stderr
        errors[executor] = _error(result)
    noise = capfd.readouterr().err  # what Ray itself printed to the terminal
    assert "Traceback" not in noise and "RayTaskError" not in noise, noise
    hint = " (`fusedata --debug ...` prints the traceback)"
    assert errors["ray"] == (errors["local"][0], errors["local"][1].removesuffix(hint if ray_options else ""))
    return errors["local"]


def test_a_model_that_fails_to_load(local_ray, tiny_llama, corpus_file, tmp_path, capfd):
    """Its actor cannot start; with --debug the worker's traceback comes before the same error line."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")  # tokenizer, config fine
    status, line = _same_error_on_both(broken, corpus_file, tmp_path / "topk", capfd, "--debug")
    assert status == 1 and line.startswith("error: SafetensorError: "), line


def test_an_oserror_writing_a_shard_names_it(local_ray, tiny_llama, corpus_file, tmp_path, capfd):
    out = tmp_path / "topk"
    assert _extract(tiny_llama, corpus_file, out, "local").exit_code == 0
    (out / MANIFEST_NAME).unlink()
    (out / "shard-00001.parquet").unlink()
    (out / "shard-00001.parquet").mkdir()  # the shard cannot be moved into place: an OSError in the worker
    status, line = _same_error_on_both(tiny_llama, corpus_file, out, capfd)
    assert status == 1
    assert line.startswith(f"error: {out / 'shard-00001.parquet'}: IsADirectoryError: [Errno 21] Is a directory")
    assert line.endswith("(`fusedata --debug ...` prints the traceback)")


def test_a_plain_actors_error_is_unwrapped(local_ray):
    """explore's model pool calls plain actors: their exception comes back as itself."""
    from jobs.worker_errors import TRACEBACK_NOTE, worker_error

    @ray.remote(num_cpus=0)
    class Failing:
        def call(self) -> None:
            raise PermissionError(13, "Permission denied", "/models/x")

    actor = Failing.remote()
    with pytest.raises(ray.exceptions.RayTaskError) as wrapped:
        ray.get(actor.call.remote())
    exc = worker_error(wrapped.value)
    assert type(exc) is PermissionError and str(exc) == "[Errno 13] Permission denied: '/models/x'"
    assert any(n.startswith(TRACEBACK_NOTE) and "PermissionError" in n for n in exc.__notes__)
    ray.kill(actor)
