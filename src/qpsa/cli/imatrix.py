"""`q-psa imatrix`: llama.cpp's importance matrix computed in q-psa's engine, or an existing one checked
against the model (docs/quantization.md)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from qpsa.cli.options import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelArg,
    RayAddressOpt,
    TextOpt,
    WorkersOpt,
    check_positive,
    check_text_choice,
    compute_options,
    console,
    open_workers,
    print_json,
)
from qpsa.errors import QpsaError


def imatrix(
    model: ModelArg,
    output: Annotated[str | None, typer.Option(help="the imatrix file to write: GGUF, or llama.cpp's legacy format for a .dat name")] = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: Annotated[int, typer.Option(help="window size in tokens (llama-imatrix's -c)")] = 512,
    chunks: Annotated[int | None, typer.Option(help="at most this many windows (default: every whole window)")] = None,
    show: Annotated[str | None, typer.Option(help="instead: read this imatrix (GGUF or .dat), check it against the model, show it")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from <output>.ckpt, the units an interrupted run finished")] = False,
    workers: WorkersOpt = None, ray_address: RayAddressOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Sum of squared input activations per column of every layer matrix, as llama-imatrix computes it."""
    from qpsa.gguf.write import check_output_path
    from qpsa.sources.catalog import resolve_model

    start = time.perf_counter()
    if show is not None:
        return _show(model, show, as_json)
    if output is None:
        raise QpsaError("give --output FILE (GGUF, or a .dat name for llama.cpp's legacy format), or --show FILE")
    check_positive(ctx=ctx, chunks=chunks)
    check_text_choice(text, dataset)
    check_output_path(output, resolve_model(model))
    from pathlib import Path

    from qpsa.quant.imatrix_sums import ImatrixCheckpoint

    ckpt_path, ckpt = Path(str(output) + ".ckpt"), None
    if ckpt_path.exists():
        if not resume:
            raise QpsaError(f"{ckpt_path}: a checkpoint of an unfinished run exists; pass --resume to continue it "
                            "or delete it to start over")
        ckpt = ImatrixCheckpoint.load(ckpt_path)
    compute = compute_options(device, dtype, max_memory)
    executor = open_workers(workers, ray_address, model, compute["device"])

    from qpsa.eval.perplexity import make_windows
    from qpsa.model.load import load_model
    from qpsa.quant.imatrix import compute_imatrix, imatrix_units
    from qpsa.report.progress import ConsoleProgress
    from qpsa.sources.texts import resolve_text

    eval_text = resolve_text(text, dataset)
    loaded = load_model(model, ctx=ctx, **compute)
    windows = make_windows(loaded.tokenizer, eval_text.text, ctx, None, None, loaded.config.context_length)
    tokens = windows.tokens[:chunks]  # llama-imatrix takes min(--chunks, the whole windows there are)
    ckpt = _checkpoint(ckpt, ckpt_path, loaded, eval_text, tokens, resume)
    resumed = sorted(ckpt.state.finished(), key=ckpt.state.order.index)
    screen = console()
    if not as_json:
        from qpsa.report.tables import run_header

        run_header(screen, loaded, eval_text, f"{tokens.shape[0]} windows of {ctx} tokens, every position", layers=False)
    left = sum(int(unit[0].shape[0]) for key, unit in imatrix_units(tokens).items() if key not in resumed)  # windows
    with ConsoleProgress(as_json).task("imatrix", left) as advance:
        result = compute_imatrix(loaded.model, tokens, text or eval_text.name, advance, executor=executor,
                                 checkpoint=ckpt)
    result.write(output, loaded.config.arch)
    ckpt.delete()
    out = {"model": loaded.describe(), "text": eval_text.describe(), "ctx": ctx, "chunks": int(tokens.shape[0]),
           "output": str(output), "format": "dat" if str(output).lower().endswith(".dat") else "gguf",
           "seconds": time.perf_counter() - start, "imatrix": result.summary(),
           "resumed_units": resumed, "units": len(ckpt.state.order),
           "execution": None if executor is None else executor.describe()}
    if as_json:
        return print_json(out)
    from qpsa.report.quant_tables import imatrix_report

    imatrix_report(screen, out)


def _checkpoint(ckpt, path, loaded, eval_text, tokens, resume: bool):
    """The run's checkpoint: the one found (checked against this run: one line if it is another's), or a new one."""
    import hashlib
    import sys

    from qpsa.quant.imatrix import WINDOW_BATCH, imatrix_units
    from qpsa.quant.imatrix_sums import ImatrixCheckpoint, UnitSums

    header = {"model": loaded.file.sha256, "text": eval_text.sha256, "ctx": int(tokens.shape[1]),
              "chunks": int(tokens.shape[0]), "dtype": str(loaded.model.dtype).removeprefix("torch."),
              "tokens": hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest(), "batch": WINDOW_BATCH}
    if ckpt is not None:
        ckpt.check_matches(header)
        print(f"resuming {path}: {len(ckpt.state.finished())} of {len(ckpt.state.order)} units finished", file=sys.stderr)
        return ckpt
    if resume:
        print(f"no checkpoint at {path}; starting from the beginning", file=sys.stderr)
    return ImatrixCheckpoint(path, header, UnitSums(list(imatrix_units(tokens))))


def _show(model: str, path: str, as_json: bool):
    from qpsa.gguf.read import open_gguf
    from qpsa.quant.imatrix import read_imatrix
    from qpsa.sources.catalog import resolve_model

    gguf_file = open_gguf(resolve_model(model))
    result = read_imatrix(path)
    result.check_against(gguf_file)
    out = {"model": {"path": str(gguf_file.path), "sha256": gguf_file.sha256}, "input": path,
           "imatrix": result.summary()}
    if as_json:
        return print_json(out)
    from qpsa.report.quant_tables import imatrix_report

    imatrix_report(console(), out)
