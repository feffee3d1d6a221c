"""What the commands share: the model argument, `--json`, console and JSON output, default output
names, number checks and the results-path check (all before any heavy work)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from qpsa.errors import QpsaError

ModelArg = Annotated[str, typer.Argument(help="a bundled model name (see `q-psa models`) or a path to a .gguf file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]
TextOpt = Annotated[Optional[str], typer.Option(help="a UTF-8 text file to evaluate on (default: the default text)")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="a named dataset: wikitext-2 (downloaded once, cached)")]


def console():
    from rich.console import Console

    return Console()


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def model_stem(model: str) -> str:
    """The short name in default output names: a bundled model's name, else the file's stem."""
    from qpsa.sources.catalog import BUNDLED

    return model if model in BUNDLED else Path(model).stem


def check_positive(**values) -> None:
    for name, v in values.items():
        if v is not None and (v <= 0 or (isinstance(v, float) and not math.isfinite(v))):
            raise QpsaError(f"--{name.replace('_', '-')} must be a positive number (got {v})")


def check_text_choice(text: str | None, dataset: str | None) -> None:
    if text and dataset:
        raise QpsaError("give either --text or --dataset, not both")


def results_path(out: str | None, default: str, model_path: Path) -> Path:
    """Where a results JSON (and the CSV beside it) go: `out`, or `default` here. QpsaError, before
    any work, for a folder, a .csv name, a missing or unwritable folder, or the model file itself."""
    path = Path(out).expanduser() if out else Path(default)
    if path.is_dir():
        raise QpsaError(f"--out {path}: is a directory; give a file name such as {path / Path(default).name}")
    if path.suffix.lower() == ".csv":
        raise QpsaError(f"--out {path}: give the JSON file's name; the CSV is written beside it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QpsaError(f"--out {path}: the folder {parent} does not exist")
    model_file = Path(model_path).resolve()
    for p in (path, path.with_suffix(".csv")):
        if p.resolve() == model_file:
            raise QpsaError(f"--out {path}: would overwrite the model file {model_path}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as e:
        raise QpsaError(f"--out {path}: cannot write in {parent} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def results_folder(out: str | None, default: str) -> Path:
    """A folder for a command's results: `out`, or `default` here; QpsaError if it is a file."""
    path = Path(out).expanduser() if out else Path(default)
    if path.exists() and not path.is_dir():
        raise QpsaError(f"--out {path}: exists and is not a folder")
    return path


WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="run the units on N Ray workers, one CPU thread each (and one GPU each on --device cuda): a local "
                      "cluster of N, or N workers of the cluster at --ray-address (needs pip install 'q-psa[cluster]'; "
                      "docs/cluster.md)")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="join the Ray cluster at HOST:PORT (what `ray start --head` prints), or auto")]


def open_workers(workers: int | None, ray_address: str | None, model: str, device=None):
    """The executor of --workers/--ray-address (None: this process), started before any long work so
    that a bad option, a missing Ray, a silent address or a node without the model file is one line.
    `device` (the resolved --device): on CUDA every worker takes one GPU of the cluster.
    It is released when the command ends (`close_workers`), with a line per worker (units,
    throughput) on stderr."""
    if workers is None and ray_address is None:
        return None
    if workers is not None and workers < 1:
        raise QpsaError(f"--workers must be at least 1 (got {workers})")
    from qpsa.gguf.read import open_gguf
    from qpsa.parallel import open_executor
    from qpsa.sources.catalog import resolve_model

    path = resolve_model(model)
    executor = open_executor(workers, ray_address, path, open_gguf(path).sha256, device=device)

    def close():
        summary = executor.describe()
        executor.close()
        for name, w in summary["per_worker"].items():
            print(f"{name}: {w['units']} units, {w['busy_seconds']:.1f} s busy, "
                  f"{w['units_per_second']:.3g} units/s", file=sys.stderr)

    _CLOSE.append(close)
    return executor


_CLOSE: list = []  # releases the workers of the running command (qpsa.cli.app.main calls close_workers)


def close_workers() -> None:
    while _CLOSE:
        _CLOSE.pop()()


# ---- where the model computes: --device, --dtype, --max-memory (every command that computes) ----

DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda:0 where a GPU is visible)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16: the precision of weights "
                                       "and activations (float32 on the CPU is q-psa's reference)")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="memory q-psa may use on the device beyond the mapped file, e.g. 12G (default: what is "
    "free); the whole model is dequantized at load when it fits, else layers are dequantized as they run")]


def compute_options(device: str = "cpu", dtype: str = "float32", max_memory: str | None = None) -> dict:
    """load_model's keyword arguments for the three options, checked (QpsaError before any work)."""
    from qpsa.model.device import parse_size, resolve_device, resolve_dtype

    dev = resolve_device(device)
    return {"device": dev, "dtype": resolve_dtype(dtype, dev),
            "max_memory": parse_size(max_memory) if max_memory is not None else None}
