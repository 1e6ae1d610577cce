"""Where the models of an explore run live. The loop asks a pool for a list of calls
(model, method, arguments) and gets the results in order; the local pool runs them one after
the other in this process, the Ray pool (jobs/explore_ray.py) runs each model in its own
actor so calls to different models proceed at the same time."""

from __future__ import annotations

from typing import Any, Protocol

Call = tuple[str, str, tuple[Any, ...]]  # (model spec, TextModel method, positional arguments)


class ModelPool(Protocol):
    def call(self, calls: list[Call]) -> list[Any]: ...

    def close(self) -> None: ...


class LocalPool:
    """Every model in this process, loaded on first use."""

    def __init__(self, device: str = "cpu", batch_size: int = 8, threads: int = 0) -> None:
        self.device, self.batch_size, self.threads = device, batch_size, threads
        self.models: dict[str, Any] = {}

    def model(self, spec: str) -> Any:
        if spec not in self.models:
            from fusedata.explore.textmodel import TextModel

            self.models[spec] = TextModel(spec, self.device, self.batch_size, self.threads)
        return self.models[spec]

    def call(self, calls: list[Call]) -> list[Any]:
        return [getattr(self.model(spec), method)(*args) for spec, method, args in calls]

    def close(self) -> None:
        self.models.clear()
