"""Where a command's independent units run: in this process (the default) or on Ray workers.

A long measurement is a list of independent *units* (one layer's ablation batch, one Q-PSA
matrix, one group's requantization, one window batch of an importance matrix) that all read the
same model and the same shared inputs. A `Job` names, by import path, how to prepare a worker for
them (`setup(loaded, args) -> state`, once per worker) and how to compute one
(`work(state, unit) -> result`); an executor runs its units and hands each result to the caller
as it arrives, so the caller checkpoints it at once:

    job = Job("qpsa.quant.sensitivity:setup_reference", "qpsa.quant.sensitivity:measure_group",
              args={"windows": windows}, local_state=ref)
    executor.run(job, {"layer 3": (group, qtype), ...}, on_result)   # on_result(key, result)

`LocalExecutor` (the default) runs the units one after the other in this process, on the state
the caller already built (`local_state`), which is exactly the single-process computation.
`qpsa.parallel.ray_workers.RayExecutor` runs them on Ray actors that each load the model once from
its file (its sha256 checked on the worker's node) and keep the state of the last jobs; units are
handed out as workers free up, and a unit whose worker died is run again on another.

Results do not depend on where a unit ran: every unit draws its random numbers from its own seeds
(never from a stream shared across units), and the driver puts results together in unit order,
not arrival order. `describe()` is the execution record that results files keep: the backend,
the Ray version, the worker count and address, and every unit's worker and seconds.
"""

from __future__ import annotations

import time
from typing import Any

from qpsa.parallel.units import Executor, Job, OnResult, UnitLog, function

__all__ = ["Executor", "Job", "LocalExecutor", "OnResult", "UnitLog", "function", "open_executor"]


class LocalExecutor:
    """Every unit in this process, in order, on the caller's own state: the single-process run."""

    backend = "local"

    def __init__(self, loaded=None):
        self.loaded = loaded
        self.log = UnitLog()
        self._states: dict[str, Any] = {}

    def run(self, job: Job, units: dict[str, Any], on_result: OnResult) -> None:
        state = job.local_state
        if state is None:
            if job.id not in self._states:
                self._states = {job.id: function(job.setup)(self.loaded, job.args)}
            state = self._states[job.id]
        work = function(job.work)
        for key, unit in units.items():
            t = time.perf_counter()
            result = work(state, unit)
            self.log.add(key, "local", time.perf_counter() - t)
            on_result(key, result)

    def describe(self) -> dict:
        import torch

        return {"backend": "local", "workers": 1, "threads": torch.get_num_threads(), "address": None,
                "ray_version": None, "units": dict(self.log.units), "per_worker": self.log.per_worker()}

    def close(self) -> None:
        self._states.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_executor(workers: int | None, address: str | None, model_path, sha256: str, loaded=None,
                  threads: int = 1, device=None):
    """`LocalExecutor` when neither `workers` nor `address` is given, else a `RayExecutor` of
    `workers` actors (each `threads` torch threads, and one GPU where `device` is CUDA) on a local
    cluster or the one at `address`.
    Every user error (workers < 1, Ray missing or too old, an address that does not answer, a
    node without the model file) is a one-line QpsaError, raised before any measurement."""
    if workers is None and address is None:
        return LocalExecutor(loaded)
    from qpsa.parallel.ray_workers import RayExecutor

    return RayExecutor(model_path, sha256, workers, address, threads, device)
