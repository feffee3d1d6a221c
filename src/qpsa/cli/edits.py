"""`q-psa prune` and `q-psa loop`: validate rankings by removing or repeating layers (see qpsa.edits.pruning)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from qpsa.cli.options import DeviceOpt, DtypeOpt, JsonOpt, MaxMemoryOpt, ModelArg, compute_options, print_json
from qpsa.errors import QpsaError

RankingsOpt = Annotated[Optional[str], typer.Option(help="results JSON from `q-psa baseline` or `q-psa score`")]
MethodsOpt = Annotated[Optional[list[str]], typer.Option("--methods", help="methods of the rankings file to use (default: all)")]
TextOpt = Annotated[Optional[str], typer.Option(help="the text the rankings were computed on (default: the default text)")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="the named dataset the rankings were computed on")]
EvalTextOpt = Annotated[Optional[str], typer.Option(help="evaluate on the first span of this file instead of the held-out span")]
EvalTokensOpt = Annotated[Optional[int], typer.Option(help="tokens to evaluate on (default: as many as the rankings used)")]
OutOpt = Annotated[Optional[str], typer.Option(help="write the table as JSON here (a CSV beside it)")]


def prune(
    model: ModelArg,
    rankings: RankingsOpt = None,
    methods: MethodsOpt = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="numbers of layers to remove (repeat or list: --k 1 2 4 8)")] = None,
    protect_first: Annotated[int, typer.Option(help="never remove the first N layers")] = 0,
    protect_last: Annotated[int, typer.Option(help="never remove the last N layers")] = 0,
    layers: Annotated[Optional[str], typer.Option(help="remove exactly these layers instead of using a ranking, e.g. 12,13")] = None,
    output: Annotated[Optional[str], typer.Option(help="also write the pruned model as a GGUF here")] = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    eval_text: EvalTextOpt = None,
    eval_tokens: EvalTokensOpt = None,
    out: OutOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Remove the K least important layers of each ranking and measure PPL on held-out tokens."""
    _run("prune", model, rankings, methods, k, 0, protect_first, protect_last, layers, output,
         text, dataset, eval_text, eval_tokens, out, as_json, compute_options(device, dtype, max_memory))


def loop(
    model: ModelArg,
    rankings: RankingsOpt = None,
    methods: MethodsOpt = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="numbers of layers to repeat (--k 1 2 4)")] = None,
    repeat: Annotated[int, typer.Option(help="extra passes through each chosen layer")] = 1,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    eval_text: EvalTextOpt = None,
    eval_tokens: EvalTokensOpt = None,
    out: OutOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Run each of the K most important layers again right after itself and measure PPL on held-out tokens."""
    _run("loop", model, rankings, methods, k, repeat, 0, 0, None, None,
         text, dataset, eval_text, eval_tokens, out, as_json, compute_options(device, dtype, max_memory))


def _run(kind, model, rankings, methods, ks, repeat, protect_first, protect_last, layers, output,
         text, dataset, eval_text, eval_tokens, out, as_json, compute):
    from qpsa.edits.pruning import EditReport, HeldOutEvaluator, loop_candidates, prune_candidates, repeating, without
    from qpsa.gguf.write import check_output_path
    from qpsa.model.layers import parse_layers
    from qpsa.report.progress import progress_bar
    from qpsa.scores.base import eval_tokens as make_tokens
    from qpsa.scores.results import ScoreRun
    from qpsa.sources.catalog import resolve_model
    from qpsa.sources.texts import resolve_text, text_from_file

    start = time.perf_counter()
    default_ks = ks is None  # defaults: 1, 2, 4, 8 (prune) / 1, 2, 4 (loop), those the model can take
    ks = ks or ([1, 2, 4, 8] if kind == "prune" else [1, 2, 4])
    for name, values in (("--k", ks), ("--protect-first", [protect_first]), ("--protect-last", [protect_last])):
        if any(v < 0 for v in values) or (name == "--k" and any(v < 1 for v in values)):
            raise QpsaError(f"{name} must be {'positive' if name == '--k' else 'zero or more'} (got {values})")
    if kind == "loop" and repeat < 1:
        raise QpsaError(f"--repeat must be at least 1 (got {repeat})")
    if eval_tokens is not None and eval_tokens < 2:
        raise QpsaError(f"--eval-tokens must be at least 2 (got {eval_tokens})")
    if (rankings is None) == (layers is None):
        raise QpsaError("give --rankings FILE (a results JSON) or --layers (an explicit list), one of them")
    model_path = resolve_model(model)
    run = ScoreRun.load(rankings) if rankings else None
    if run is not None:
        methods = _pick_methods(run, methods)
    if output is not None:
        check_output_path(output, model_path)
        if layers is None and (len(methods) != 1 or len(ks) != 1):
            raise QpsaError("--output writes one pruned model: give --layers, or one --methods and one --k")
    out_path = Path(out) if out else None
    if out_path is not None:
        check_output_path(out_path, model_path)

    from qpsa.model.load import load_model

    loaded = load_model(model, batch=1, ctx=eval_tokens or 1024, **compute)
    n_layer = loaded.config.n_layer
    if run is not None:
        if run.model.get("sha256") != loaded.file.sha256 or run.model.get("n_layer") != n_layer:
            raise QpsaError(f"{rankings}: the rankings are for another model ({run.model.get('name')}, "
                            f"{run.model.get('n_layer')} layers, sha256 {str(run.model.get('sha256'))[:12]}…), "
                            f"not {model} ({n_layer} layers, sha256 {loaded.file.sha256[:12]}…)")
    if default_ks:
        room = n_layer - protect_first - protect_last - (1 if kind == "prune" else 0)
        ks = [k for k in ks if k <= room] or [1]
    explicit = parse_layers(layers, n_layer) if layers else None
    if explicit is not None and len(explicit) >= n_layer:
        raise QpsaError(f"--layers: removing all {n_layer} layers leaves nothing")

    # Plan every edit first, so a bad K fails before any evaluation.
    plan = []
    if explicit is not None:
        plan.append(("explicit", len(explicit), explicit, without(n_layer, explicit)))
    else:
        for method in methods:
            scores = run.methods[method]
            for k in ks:
                if kind == "prune":
                    chosen = prune_candidates(scores, k, n_layer, protect_first, protect_last)
                    plan.append((method, k, chosen, without(n_layer, chosen)))
                else:
                    chosen = loop_candidates(scores, k, n_layer)
                    plan.append((method, k, chosen, repeating(n_layer, chosen, repeat)))

    n_tokens = eval_tokens or (run.text["n_tokens"] if run else 500)
    if eval_text:
        tokens = make_tokens(loaded, text_from_file(eval_text), n_tokens, span="score")
        tokens.span = "eval-text"
    else:
        the_text = resolve_text(text, dataset)
        after = 0
        if run is not None:
            if the_text.sha256 != run.text["sha256"]:
                raise QpsaError(f"{rankings}: the rankings were computed on {run.text['name']} (sha256 "
                                f"{run.text['sha256'][:12]}…), not {the_text.name}; pass the same --text/--dataset, or --eval-text")
            after = run.text["start_token"] + run.text["n_scored"] + 1 - (1 if loaded.tokenizer.add_bos else 0)
        tokens = make_tokens(loaded, the_text, n_tokens, span="held-out", start=after or None)

    evaluator = HeldOutEvaluator(loaded, tokens)
    report = EditReport(kind, evaluator.base_ppl, tokens.describe(),
                        settings={"model": model, "model_sha256": loaded.file.sha256, "rankings": rankings,
                                  "ks": ks, "repeat": repeat, "protect_first": protect_first,
                                  "protect_last": protect_last})
    with progress_bar(kind, len(plan), quiet=as_json) as advance:
        for method, k, chosen, layer_list in plan:
            edit = evaluator.edit(method, k, chosen, layer_list)
            report.edits.append(edit)
            advance(f"{method} K={k}: ×{edit.ratio:.3g}")
    if output is not None:
        from qpsa.edits.export import write_layers

        chosen = plan[0][2]
        write_layers(loaded.file, without(n_layer, chosen), output)
        report.settings["output"] = str(output)
    report.seconds = time.perf_counter() - start
    if out_path is not None:
        _save(report, out_path)
    if as_json:
        print_json(report.to_dict())
        return
    from rich.console import Console

    from qpsa.report.tables import edit_report

    edit_report(Console(), report)


def _pick_methods(run, methods):
    available = list(run.methods)
    if not methods:
        return available
    names = [m for part in methods for m in part.replace(",", " ").split()]
    missing = [m for m in names if m not in run.methods]
    if missing:
        raise QpsaError(f"method {missing[0]!r} is not in the rankings file (it has: {', '.join(available)})")
    return names


def _save(report, path: Path) -> None:
    import csv
    import io

    from qpsa.fsutil import write_atomic

    write_atomic(path, json.dumps(report.to_dict(), indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "method", "k", "layers", "ppl", "ratio", "ratio_se"])
    for e in report.edits:
        w.writerow([report.kind, e.method, e.k, " ".join(map(str, e.layers)), e.ppl, e.ratio, e.ratio_se])
    write_atomic(path.with_suffix(".csv"), buf.getvalue())
