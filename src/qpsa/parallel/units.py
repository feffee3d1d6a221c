"""A job, its units' results and their accounting: what every executor shares (qpsa.parallel)."""

from __future__ import annotations

import importlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

_job_ids = itertools.count()


@dataclass
class Job:
    """One kind of work over one model: `setup` and `work` are "module:function" import paths, so a
    worker finds them by name; `args` (tokens, windows, settings: anything picklable) go to each
    worker once. `dtype` is the torch dtype name the worker's model is loaded in, `load` the rest of
    `load_model`'s keyword arguments (the driver's `Transformer.load_options`: --device,
    --max-memory and the memory plan's inputs), so a worker loads the model as the driver did."""

    setup: str  # setup(loaded, args) -> state
    work: str  # work(state, unit) -> result
    args: Any = None
    dtype: str = "float32"
    load: dict = field(default_factory=dict)
    local_state: Any = None  # the state as this process already has it (LocalExecutor uses it, no setup)
    id: str = field(default_factory=lambda: f"job-{next(_job_ids)}")


def function(path: str) -> Callable:
    """The function at "module:function"."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


OnResult = Callable[[str, Any], None]


class Executor(Protocol):
    def run(self, job: Job, units: dict[str, Any], on_result: OnResult) -> None:
        """Compute every unit; on_result(key, result) as each finishes (in any order)."""

    def describe(self) -> dict:
        """The execution record: backend, workers, per-unit timings."""

    def close(self) -> None:
        """Release the workers."""


class UnitLog:
    """Which worker computed each unit and how long it took; per-worker throughput."""

    def __init__(self):
        self.units: dict[str, dict] = {}
        self.started = time.perf_counter()

    def add(self, key: str, worker: str, seconds: float, attempts: int = 1) -> None:
        """One finished unit. A key seen before (the same unit of another run on this executor: a
        study's Q-PSA at each N) is kept beside it as `key#2`, `key#3`…, so every unit counts."""
        name, n = key, 1
        while name in self.units:
            n += 1
            name = f"{key}#{n}"
        self.units[name] = {"worker": worker, "seconds": round(seconds, 6)}
        if attempts > 1:
            self.units[name]["attempts"] = attempts

    def per_worker(self) -> dict[str, dict]:
        wall = time.perf_counter() - self.started
        out: dict[str, dict] = {}
        for u in self.units.values():
            w = out.setdefault(u["worker"], {"units": 0, "busy_seconds": 0.0})
            w["units"] += 1
            w["busy_seconds"] += u["seconds"]
        for w in out.values():
            w["busy_seconds"] = round(w["busy_seconds"], 6)
            w["units_per_second"] = w["units"] / wall if wall > 0 else None
        return out


def no_setup(loaded, args) -> None:
    """A job's setup that prepares nothing (overhead benchmarks: bench/workers_scale.py)."""


def echo(state, unit):
    """A unit that computes nothing and returns its input: what remains is the executor's own cost."""
    return unit
