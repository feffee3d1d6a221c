"""Units on Ray actors: a local cluster of N workers, or an existing cluster joined by address.

Each actor (`_Worker`) checks on its own node that the model file exists there with the driver's
sha256, then loads the model once (per dtype) and keeps the state of the jobs it ran last
(`Job.setup`, e.g. the reference pass over the windows). The driver hands units out as workers
free up, two in flight per worker so none waits for the next, and passes each result to the
caller as it arrives. A unit whose worker died (its process killed, its node lost) is run again on
another worker (and Ray restarts the dead one, up to `MAX_RESTARTS` times); after `MAX_ATTEMPTS`
failures of the same unit the run stops with one line — the finished units are already in the
caller's checkpoint.

Bad input is one line (`QpsaError`) before any unit runs: `--workers` below 1; Ray not installed
(`pip install 'q-psa[cluster]'`) or older than `MIN_RAY`; an address that does not answer within
`CONNECT_TIMEOUT` seconds; a node without the model file or with a different one (by sha256);
more workers than the cluster has CPUs (or GPUs, for `--device cuda`).

Where the driver computes on CUDA, every actor asks Ray for one GPU (`actor_options`), so Ray
places one worker per GPU and makes that GPU the worker's only visible one (the worker computes on
its `cuda:0`); a local cluster is started with every GPU this machine has. On the CPU an actor
asks for `threads` CPUs and no GPU.

Token authentication: Ray 2.60 switches it on for every new local cluster (`ray.init()` without an
address and without `RAY_AUTH_MODE`), creating ~/.ray/auth_token if there is none, and logs a
warning saying so ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled
to opt out") from `ray._private.authentication.authentication_token_setup`. The local cluster keeps
that mode (it listens on 127.0.0.1 only); that one notice is dropped while it starts
(`_quiet_token_notice`), and every other Ray message still shows. Setting RAY_AUTH_MODE=token in
the driver's environment instead does not work once ray is imported: the driver keeps the cached
mode and the new cluster refuses it. A driver joining a cluster by address sends its token where
it has one (`join_auth_mode`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from qpsa.errors import QpsaError
from qpsa.parallel.units import Job, OnResult, UnitLog, function

MIN_RAY = (2, 10)
CONNECT_TIMEOUT = 5.0  # seconds to wait for an address to answer
MAX_RESTARTS = 4  # Ray restarts a dead worker this many times
MAX_ATTEMPTS = 3  # a unit is tried on this many workers before the run gives up
READY_TIMEOUT = 300.0  # seconds for the workers to start and check the model file
IN_FLIGHT = 2  # units queued per worker
STATES_KEPT = 2  # job states a worker keeps (plan: one reference for the measured span at a time)


def require_ray():
    """The ray module; one line telling how to install it, or that it is too old."""
    try:
        import ray
    except ImportError:
        raise QpsaError("--workers and --ray-address need Ray: pip install 'q-psa[cluster]'") from None
    if _version(ray.__version__) < MIN_RAY:
        raise QpsaError(f"Ray {ray.__version__} is too old for --workers (needs {'.'.join(map(str, MIN_RAY))} or newer): "
                        "pip install 'q-psa[cluster]'")
    return ray


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def actor_options(device, threads: int) -> dict:
    """Ray's options for one worker actor: `threads` CPUs, and one GPU where `device` (a torch
    device or its name; None is the CPU) is CUDA; restarted up to `MAX_RESTARTS` times, its
    tasks never retried by Ray (the executor hands a lost unit to another worker itself)."""
    kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    return {"num_cpus": threads, "num_gpus": 1 if kind == "cuda" else 0, "max_restarts": MAX_RESTARTS,
            "max_task_retries": 0}


def check_answers(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """QpsaError unless something listens at HOST:PORT (or ray://HOST:PORT) within `timeout` seconds."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise QpsaError(f"--ray-address {address}: give HOST:PORT (the address `ray start --head` prints), or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise QpsaError(f"--ray-address {address}: no Ray cluster answers there within {timeout:g} s "
                        f"({e.strerror or type(e).__name__}); start one with `ray start --head` (docs/cluster.md)") from None


TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


@contextmanager
def _quiet_token_notice():
    """Drop Ray's notice that a new local cluster uses token authentication (module docstring)."""
    import logging

    def other(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)

    logger = logging.getLogger(TOKEN_LOGGER)
    logger.addFilter(other)
    try:
        yield
    finally:
        logger.removeFilter(other)


def join_auth_mode() -> bool:
    """Whether this driver sends a token when it joins a cluster by address. Ray 2.60 sends one only
    in `RAY_AUTH_MODE=token`, which it never sets by itself for an explicit address, so a cluster
    with token authentication would refuse the driver even with the token at hand. Where the mode
    is unset and a token is there (`RAY_AUTH_TOKEN`, the file at `RAY_AUTH_TOKEN_PATH`, or
    ~/.ray/auth_token), the token mode is set: a cluster without authentication accepts it too.
    Ray reads the mode into its cached config when it is imported, so this runs before `import ray`
    (where ray is already imported, the cache is refreshed as Ray itself does when it sets the mode)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN") or (Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:
            try:
                sys.modules["ray._raylet"].Config.initialize("")
            except Exception:  # another Ray version: the mode then applies to the next process only
                pass
        return True
    return False


def local_gpus() -> int:
    """The CUDA GPUs this machine shows torch: what a local cluster for `--device cuda` offers."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class _Worker:
    """One Ray actor: the model file checked on its node, the model loaded once, job states kept."""

    def __init__(self, path: str, sha256: str, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.gpus = list(ray.get_gpu_ids())  # the one GPU Ray gave this worker (it sees it as cuda:0), or none
        self.node = ray.util.get_node_ip_address()
        self.pid = os.getpid()
        self.error = None
        self.models: dict = {}
        self.states: dict = {}
        p = Path(path)
        if not p.is_file():
            self.error = f"node {self.node}: no model file {path} there (every node needs the same file at the same path)"
            return
        from qpsa.gguf.read import file_sha256

        digest = file_sha256(p)
        if digest != sha256:
            self.error = (f"node {self.node}: {path} has sha256 {digest[:12]}…, the driver's has {sha256[:12]}…; "
                          "copy the same file to every node")
        self.path = path

    def ready(self) -> dict:
        return {"node": self.node, "pid": self.pid, "error": self.error}

    def run(self, job: Job, unit):
        if self.error:
            raise QpsaError(self.error)
        state = self.states.get(job.id)
        if state is None:
            state = function(job.setup)(self._model(job.dtype, job.load), job.args)
            while len(self.states) >= STATES_KEPT:
                self.states.pop(next(iter(self.states)))
            self.states[job.id] = state
        t = time.perf_counter()
        result = function(job.work)(state, unit)
        return result, time.perf_counter() - t, f"{self.node} pid {self.pid}"

    def _model(self, dtype: str, load: dict):
        """The model loaded in `dtype` with the driver's other load settings (device, memory budget)."""
        key = (dtype, tuple(sorted(load.items(), key=lambda kv: kv[0])))
        if key not in self.models:
            import torch

            from qpsa.model.load import load_model

            device = load.get("device")
            if self.gpus and device is not None and torch.device(device).type == "cuda":
                load = {**load, "device": torch.device("cuda", 0)}  # the driver's cuda:N is this worker's own GPU
            self.models[key] = load_model(self.path, dtype=getattr(torch, dtype), **load)
        return self.models[key]


class RayExecutor:
    """Units on `workers` Ray actors (each `threads` torch threads) of a local cluster, or of the
    cluster at `address`. A cluster that this process already joined (ray.init) is used as it is."""

    backend = "ray"

    def __init__(self, model_path, sha256: str, workers: int | None, address: str | None = None, threads: int = 1,
                 device=None):
        if workers is not None and workers < 1:
            raise QpsaError(f"--workers must be at least 1 (got {workers})")
        if threads < 1:
            raise QpsaError(f"worker threads must be at least 1 (got {threads})")
        if address is not None:
            check_answers(address)
        self.token = join_auth_mode() if address is not None else False  # before `import ray` (join_auth_mode)
        ray = require_ray()
        self.ray = ray
        self.address, self.threads = address, threads
        self.options = actor_options(device, threads)
        self.started_here = False
        if not ray.is_initialized():
            self._init(workers, address)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if workers is None:  # joined a cluster: as many workers as its CPUs (GPUs) hold
            workers = max(1, cpus // threads if not self.options["num_gpus"] else min(gpus, cpus // threads))
        if workers * threads > cpus:
            self.close()
            raise QpsaError(f"--workers {workers} of {threads} thread{'s' * (threads > 1)} need {workers * threads} CPUs; "
                            f"the Ray cluster has {cpus}")
        if self.options["num_gpus"] and workers > gpus:
            self.close()
            raise QpsaError(f"--workers {workers} on CUDA need {workers} GPU{'s' * (workers > 1)} (one each); "
                            f"the Ray cluster has {gpus}")
        self.n_workers = workers
        self.log = UnitLog()
        self.retries = 0
        self.actor_class = ray.remote(_Worker).options(**self.options)
        self.path, self.sha256 = str(Path(model_path).resolve()), sha256
        self.key = (ray.get_runtime_context().get_job_id(), self.path, sha256, threads, self.options["num_gpus"])
        parked = _PARKED.pop(self.key, [])
        for other in list(_PARKED):  # warm workers of another model hold CPUs the new ones need
            for a in _PARKED.pop(other):
                _kill(ray, a)
        self.actors = parked[:workers] + [self.actor_class.remote(self.path, sha256, threads)
                                          for _ in range(workers - len(parked[:workers]))]
        for a in parked[workers:]:
            _kill(ray, a)
        try:
            self.info = ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT)
        except Exception as e:  # an actor that cannot even start (a node without qpsa installed)
            self.close()
            raise QpsaError(f"a Ray worker could not start: {_first_line(e)}") from None
        errors = [i["error"] for i in self.info if i["error"]]
        if errors:
            self.close()
            raise QpsaError(errors[0])

    def _init(self, workers: int | None, address: str | None) -> None:
        import logging

        ray = self.ray
        try:
            if address is None:
                if workers is None:
                    raise QpsaError("give --workers N (a local cluster of N workers) or --ray-address HOST:PORT")
                with _quiet_token_notice():
                    ray.init(num_cpus=workers * self.threads, num_gpus=local_gpus() if self.options["num_gpus"] else 0,
                             include_dashboard=False, log_to_driver=False,
                             _node_ip_address="127.0.0.1", logging_level=logging.ERROR, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
        except QpsaError:
            raise
        except Exception as e:  # version mismatch with the cluster, authentication, no cluster at "auto"
            where = f"--ray-address {address}" if address else "a local Ray cluster"
            hint = ""
            if address and not self.token:
                hint = (" (a cluster with token authentication needs its token here: copy the head's ~/.ray/auth_token, "
                        "or set RAY_AUTH_TOKEN; docs/cluster.md)")
            raise QpsaError(f"{where}: {_first_line(e)}{hint}") from None
        self.started_here = True

    def pids(self) -> list[int]:
        """Process ids of the workers now (tests kill one)."""
        return [i["pid"] for i in self.ray.get([a.ready.remote() for a in self.actors])]

    def run(self, job: Job, units: dict, on_result: OnResult) -> None:
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        lost = _lost_errors()
        if not self.log.units:
            self.log.started = time.perf_counter()
        shipped = ray.put(dataclasses.replace(job, local_state=None))
        queue = deque((key, unit, 0, None) for key, unit in units.items())  # key, unit, attempts, worker to avoid
        pending: dict = {}  # object ref -> (key, unit, attempts, worker index)
        load = [0] * len(self.actors)

        def submit():
            while queue:
                key, unit, attempts, avoid = queue[0]
                order = sorted(range(len(self.actors)), key=lambda w: (w == avoid, load[w]))
                w = order[0]
                if load[w] >= IN_FLIGHT:
                    return
                queue.popleft()
                pending[self.actors[w].run.remote(shipped, unit)] = (key, unit, attempts, w)
                load[w] += 1

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            key, unit, attempts, w = pending.pop(ref)
            load[w] -= 1
            try:
                result, seconds, worker = ray.get(ref)
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, QpsaError):
                    raise QpsaError(str(cause)) from None
                raise cause if isinstance(cause, Exception) else e
            except (RayActorError, *lost):
                if attempts + 1 >= MAX_ATTEMPTS:
                    raise QpsaError(f"unit {key} failed on {MAX_ATTEMPTS} workers (each died); the finished units "
                                    "are in the checkpoint: rerun with --resume") from None
                self.retries += 1
                queue.appendleft((key, unit, attempts + 1, w))
                submit()
                continue
            self.log.add(key, f"worker {w} ({worker})", seconds, attempts + 1)
            on_result(key, result)
            submit()

    def describe(self) -> dict:
        return {"backend": "ray", "ray_version": self.ray.__version__, "workers": self.n_workers,
                "threads": self.threads, "gpus_per_worker": self.options["num_gpus"], "address": self.address or "local",
                "nodes": sorted({i["node"] for i in self.info}), "retries": self.retries,
                "units": dict(self.log.units), "per_worker": self.log.per_worker()}

    def close(self) -> None:
        """Shut the workers down, and the cluster if this executor started it. Workers of a cluster
        that someone else started (a library caller's ray.init, the tests) are kept warm for the
        next executor of the same model and threads in this Ray session."""
        actors, self.actors = getattr(self, "actors", []), []
        healthy = all(not i["error"] for i in getattr(self, "info", [{"error": "not started"}]))
        if actors and healthy and not self.started_here and self.ray.is_initialized():
            _PARKED.setdefault(self.key, []).extend(actors)
            return
        for a in actors:
            _kill(self.ray, a)
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
            self.started_here = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_PARKED: dict[tuple, list] = {}  # warm workers by (Ray job, model path, sha256, threads, GPUs)


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def _lost_errors() -> tuple:
    """Ray's errors for a task whose worker process or object was lost (names vary across versions)."""
    import ray.exceptions as rx

    names = ("WorkerCrashedError", "ObjectLostError", "OwnerDiedError", "NodeDiedError", "ActorUnavailableError")
    return tuple(getattr(rx, n) for n in names if hasattr(rx, n))


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]
