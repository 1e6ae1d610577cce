"""The Ray pool of `fusedata explore`: each model in an actor of its own, loaded once.

A round's calls to different models (every answerer answering the same questions, every
source proposing names) are sent together and run at the same time on the actors; calls to
one model queue on its actor. The loop itself stays in the driver: it owns the tree, the RNG
and the checkpoint, and only text crosses to the actors.
"""

from __future__ import annotations

from typing import Any

import ray

from fusedata.explore.pool import Call
from jobs.ray_executor import init_ray
from jobs.worker_errors import worker_error


@ray.remote
class _ModelActor:
    def __init__(self, spec: str, backend: str, device: str, batch_size: int, threads: int) -> None:
        from fusedata.explore.textmodel import load_text_model

        self.model, self.load_error = None, None
        try:  # raised by the first call: Ray keeps only the text of an actor's __init__ error
            self.model = load_text_model(spec, backend, device, batch_size, threads)
        except Exception as exc:
            self.load_error = exc

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        if self.load_error is not None:
            if method == "close":
                return None
            raise self.load_error
        return getattr(self.model, method)(*args)


class RayPool:
    def __init__(self, specs: list[str], address: str | None = None, device: str = "cpu", batch_size: int = 8,
                 backend: str = "hf") -> None:
        init_ray(address)
        cpus = ray.available_resources().get("CPU", 1.0)
        share = max(cpus / len(specs), 0.1)  # every model fits at once, even on 2 cores
        threads = max(1, int(share))
        gpus = {"num_gpus": 1.0 / len(specs)} if device.startswith("cuda") else {}
        self.actors = {
            spec: _ModelActor.options(num_cpus=share, **gpus).remote(spec, backend, device, batch_size, threads)
            for spec in dict.fromkeys(specs)
        }

    def call(self, calls: list[Call]) -> list[Any]:
        refs = [self.actors[spec].call.remote(method, args) for spec, method, args in calls]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:  # the actor's own error, not Ray's wrapper
            raise worker_error(exc) from None

    def close(self) -> None:
        for actor in self.actors.values():
            try:
                ray.get(actor.call.remote("close", ()), timeout=60)  # stops a vLLM child process
            except Exception:  # noqa: BLE001 - a dead actor has nothing left to stop
                pass
            ray.kill(actor)
        self.actors.clear()
