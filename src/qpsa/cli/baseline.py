"""The `q-psa baseline` and `q-psa agreement` commands (registered in qpsa.cli.app).

Thin: arguments are checked here (before any model is loaded), the work is
`qpsa.scores.baselines.run_baselines`, the rendering `qpsa.report.scores_tables`. Heavy imports
stay inside the functions so that `q-psa --help` stays instant.

`--methods` takes names in any of three spellings, all equivalent:
`--methods a b c`, `--methods a --methods b --methods c`, `--methods a,b,c`.
Click cannot give an option a variable number of values: `qpsa.cli.main` rewrites `--methods a b`
as `--methods a --methods b`, and without that rewrite the command still accepts extra positional
arguments (`BASELINE_CONTEXT`) and reads them as further method names. Either way MODEL must come
before `--methods a b c` (after it, it would be read as one more method name).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

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
    check_text_choice,
    compute_options,
    model_stem,
    open_workers,
    print_json,
    results_path,
)
from qpsa.errors import QpsaError
from qpsa.scores.registry import find_method, method_names

# from the registry, which imports no torch, so `--help` stays instant
METHOD_NAMES = tuple(method_names("baseline"))

# context_settings for app.command(): lets `--methods a b c` leave b and c as extra arguments
BASELINE_CONTEXT = {"allow_extra_args": True}


def split_methods(methods: list[str] | None, extra: list[str]) -> list[str]:
    """Method names from the --methods values and any extra arguments (all methods if none given).

    Names may be comma- or space-separated. `qpsa.cli.main` already rewrites `--methods a b` as
    `--methods a --methods b`; extra arguments are the names after `--methods a` when the command
    is invoked without that rewrite."""
    if extra and not methods:
        raise QpsaError(f"unexpected extra argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}")
    if not methods:
        return list(METHOD_NAMES)
    names = []
    for value in [*methods, *extra]:
        names += [x for x in value.replace(",", " ").split() if x]
    for name in names:
        find_method(name, "baseline")
    if not names:
        raise QpsaError(f"--methods is empty; known: {', '.join(METHOD_NAMES)}")
    return list(dict.fromkeys(names))


def baseline(
    ctx: typer.Context,
    model: ModelArg,
    methods: Annotated[
        Optional[list[str]],
        typer.Option("--methods", help=f"methods to run (default: all): {', '.join(METHOD_NAMES)}; "
                                       "space- or comma-separated, or --methods repeated"),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="evaluate on the text's first N tokens, as one window")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the random baseline")] = 42,
    n: Annotated[int, typer.Option("--n", help="angular distance compares the states n layers apart")] = 1,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    out: Annotated[Optional[str], typer.Option(help="results JSON (a CSV is written beside it); "
                                                    "default baseline-MODEL.json here")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the layer ablation from <out>.ckpt")] = False,
    workers: WorkersOpt = None, ray_address: RayAddressOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Baseline layer-importance scores (ablation, weight norm, random, ShortGPT block influence,
    angular distance, Fisher), their rankings and how well they agree."""
    from qpsa.sources.catalog import resolve_model

    names = split_methods(methods, list(ctx.args))
    if max_tokens < 2:
        raise QpsaError(f"--max-tokens must be at least 2 (got {max_tokens})")
    if n < 1:
        raise QpsaError(f"--n must be at least 1 (got {n})")
    check_text_choice(text, dataset)
    compute = compute_options(device, dtype, max_memory)
    path = results_path(out, f"baseline-{model_stem(model)}.json", resolve_model(model))
    from qpsa.scores.checkpoint import AblationCheckpoint, checkpoint_path

    ckpt_path, ckpt = checkpoint_path(path), None
    if ckpt_path.exists() and "layer_ablation" in names:
        if not resume:
            raise QpsaError(f"{ckpt_path}: a checkpoint of an unfinished run exists; pass --resume to continue it "
                            "or delete it to start over")
        ckpt = AblationCheckpoint.load(ckpt_path)

    executor = open_workers(workers, ray_address, model, compute["device"])
    from qpsa.model.load import load_model
    from qpsa.report.progress import ConsoleProgress
    from qpsa.scores.base import ScoreSettings, eval_tokens
    from qpsa.scores.baselines import run_baselines
    from qpsa.scores.results import rank_agreement
    from qpsa.sources.texts import resolve_text

    eval_text = resolve_text(text, dataset)
    loaded = load_model(model, ctx=max_tokens, batch=1, grad="fisher" in names,
                        whole="fisher" if "fisher" in names else None, **compute)
    tokens = eval_tokens(loaded, eval_text, max_tokens)
    if n > loaded.config.n_layer:
        raise QpsaError(f"--n {n} exceeds the model's {loaded.config.n_layer} layers")
    settings = ScoreSettings(seed=seed, max_tokens=max_tokens, angular_n=n)
    if "layer_ablation" in names:
        import hashlib

        header = {"model": loaded.file.sha256, "text": eval_text.sha256, "max_tokens": max_tokens,
                  "tokens": hashlib.sha256(tokens.tokens.numpy().astype("<i8").tobytes()).hexdigest()}
        if ckpt is None:
            ckpt = AblationCheckpoint(ckpt_path, header)
        ckpt.check_matches(header)
    console = None
    if not as_json:
        from rich.console import Console

        from qpsa.report.tables import run_header

        console = Console()
        run_header(console, loaded, eval_text, f"first {tokens.tokens.shape[1]} tokens, {tokens.n_scored} scored")

    run = run_baselines(loaded, tokens, names, settings, ConsoleProgress(quiet=as_json), executor, ckpt)
    run.save(path)
    if ckpt is not None:
        ckpt.delete()
    with warnings.catch_warnings():  # constant scores give NaN correlations, reported as such
        warnings.simplefilter("ignore")
        rows = rank_agreement(run.methods) if len(run.methods) > 1 else []
    if as_json:
        print_json({**run.to_dict(), "agreement": rows, "out": str(path)})
        return
    from qpsa.report.scores_tables import baseline_report

    console.print(f"base PPL {run.base['ppl']:.4f}  (mean NLL {run.base['nll']:.4f})")
    baseline_report(console, run, rows, out=str(path))


def agreement(
    files: Annotated[list[str], typer.Argument(help="results files written by `q-psa baseline` or `q-psa score`")],
    as_json: JsonOpt = False,
):
    """Rank agreement (Spearman ρ, Kendall τ) between every pair of methods in one or more results
    files; with several files, methods are named FILE-STEM:METHOD."""
    from qpsa.scores.results import ScoreRun, rank_agreement

    runs = [ScoreRun.load(f) for f in files]
    stems = [Path(f).stem for f in files]
    methods = {}
    for k, (f, stem, run) in enumerate(zip(files, stems, runs)):
        prefix = "" if len(files) == 1 else (stem if stems.count(stem) == 1 else f"{stem}#{k + 1}") + ":"
        for name, s in run.methods.items():
            methods[prefix + name] = s
    lengths = {name: len(s.scores) for name, s in methods.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} ({v})" for k, v in lengths.items())
        raise QpsaError(f"the methods score different numbers of layers: {listed}")
    if len(methods) < 2:
        raise QpsaError(f"rank agreement needs at least two methods; {', '.join(files)} hold{'s' if len(files) == 1 else ''} "
                        f"{len(methods)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = rank_agreement(methods)
    if as_json:
        print_json({"files": files, "methods": list(methods), "agreement": rows})
        return
    from rich.console import Console

    from qpsa.report.scores_tables import agreement_table, rankings_table

    console = Console()
    rankings_table(console, methods)
    agreement_table(console, rows)
