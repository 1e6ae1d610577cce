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

    def __init__(self, device: str = "cpu", batch_size: int = 8, threads: int = 0, backend: str = "hf") -> None:
        self.device, self.batch_size, self.threads, self.backend = device, batch_size, threads, backend
        self.models: dict[str, Any] = {}

    def model(self, spec: str) -> Any:
        if spec not in self.models:
            from fusedata.explore.textmodel import load_text_model

            self.models[spec] = load_text_model(spec, self.backend, self.device, self.batch_size, self.threads)
        return self.models[spec]

    def call(self, calls: list[Call]) -> list[Any]:
        return [getattr(self.model(spec), method)(*args) for spec, method, args in calls]

    def close(self) -> None:
        for model in self.models.values():
            model.close()
        self.models.clear()
