"""Which engine runs a job and with what workers (`--engine local|ray --address A --workers N`),
and the error a job that cannot run or finish raises."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ENGINES", "EngineOptions", "EngineError"]

ENGINES = ("local", "ray")


class EngineError(RuntimeError):
    """A job could not run or finish on its engine; the message says which inputs it lost,
    `missing` lists them all (input names, in input order)."""

    def __init__(self, message: str, missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


@dataclass(frozen=True)
class EngineOptions:
    """name: "local" (this process, the default) or "ray". For Ray: `address` of a running
    cluster (None: RAY_ADDRESS, or a local instance), `workers` actors, each with
    `cpus_per_worker` CPUs and `gpus_per_worker` GPUs (Ray's num_cpus / num_gpus), and a dead
    worker restarted and its chunk redone up to `retries` times. `fault` (tests only): a
    worker dies on chunk `fault[1]` while the marker file `fault[0]` exists (see
    `verifier.engines.ray_engine`)."""

    name: str = "local"
    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    retries: int = 3
    fault: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise EngineError(f"unknown engine {self.name!r}; choose one of {ENGINES}")
        if self.name == "local" and self.address:
            raise EngineError("--address is for --engine ray")
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.retries < 0:
            raise EngineError("workers >= 1, cpus per worker > 0, gpus per worker >= 0 and "
                              "retries >= 0 are needed")
