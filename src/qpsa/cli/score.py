"""`q-psa score`: Q-PSA layer scores, with checkpoints so a long run can be resumed.

Registered in `qpsa.cli.app`; heavy imports (torch, the model) happen inside the function so that
`q-psa --help` stays instant. Every user error is a QpsaError raised before any heavy work
where it can be known then (numbers, --layers, the output path, an existing checkpoint).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Optional

import typer

from qpsa.cli.options import (
    DatasetOpt,
    DeviceOpt,
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


def score(
    model: ModelArg,
    samples_per_matrix: Annotated[int, typer.Option("--samples-per-matrix", help="samples (N) per matrix")] = 100,
    layers: Annotated[Optional[str], typer.Option(help='layers to score, e.g. "0-5,9" (default: all)')] = None,
    seed: Annotated[int, typer.Option(help="seed of the sampling (per layer and matrix)")] = 42,
    max_tokens: Annotated[int, typer.Option(help="evaluation tokens: the text's first N, as one window")] = 500,
    unit: Annotated[str, typer.Option(help="what one sample moves: weight (code ±1), block (all codes ±1, random "
                                           "signs) or byte (raw byte ±1, the original study)")] = "weight",
    estimator: Annotated[str, typer.Option(help="exact (every sample evaluated) or probe (N samples moved together "
                                                "with random signs, K probes)")] = "exact",
    probes: Annotated[Optional[int], typer.Option(help="probes (K) per layer or per matrix (--probe-scope), --estimator "
                                                       "probe (default: 12 per layer, 2 per matrix)")] = None,
    probe_scope: Annotated[str, typer.Option("--probe-scope", help="layer (one probe moves N units of every matrix of "
                                                                   "the layer) or matrix (per-matrix breakdown)")] = "layer",
    precision: Annotated[Optional[str], typer.Option(help="float32 or float64 (default: float64 for exact, "
                                                          "float32 for probe)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="perturbations evaluated per batch")] = 8,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    out: Annotated[Optional[str], typer.Option(help="results JSON (a CSV goes beside it); default "
                                                    "score-<model>.json")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from <out>.ckpt")] = False,
    workers: WorkersOpt = None, ray_address: RayAddressOpt = None,
    device: DeviceOpt = "cpu",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Q-PSA: layer importance from ±1-step moves of quantized weights (see docs/qpsa.md)."""
    from qpsa.scores.qpsa.settings import QpsaSettings
    from qpsa.sources.catalog import resolve_model

    settings = QpsaSettings(samples_per_matrix=samples_per_matrix, seed=seed, max_tokens=max_tokens, unit=unit,
                            estimator=estimator, probes=probes, precision=precision, batch_size=batch_size,
                            probe_scope=probe_scope)
    check_text_choice(text, dataset)
    model_path = resolve_model(model)
    out_path = results_path(out, f"score-{model_stem(model)}.json", model_path)
    from qpsa.scores.checkpoint import Checkpoint, checkpoint_path

    ckpt_path = checkpoint_path(out_path)
    ckpt = None
    if ckpt_path.exists() or ckpt_path.is_symlink():
        if not resume:
            raise QpsaError(f"{ckpt_path}: a checkpoint of an unfinished run exists; pass --resume to continue it "
                            "or delete it to start over")
        ckpt = Checkpoint.load(ckpt_path)

    from qpsa.gguf.read import open_gguf
    from qpsa.model.config import config_from_metadata
    from qpsa.model.layers import parse_layers
    from qpsa.sources.texts import resolve_text

    gguf_file = open_gguf(model_path)
    meta = gguf_file.metadata
    n_layer = meta.get(f"{gguf_file.arch}.block_count")
    if not isinstance(n_layer, int) or n_layer < 1:
        raise QpsaError(f"{model_path}: no layer count ({gguf_file.arch}.block_count) in the metadata")
    layer_list = sorted(parse_layers(layers, n_layer))
    config = config_from_metadata(meta)
    if max_tokens > config.context_length:
        raise QpsaError(f"--max-tokens {max_tokens} exceeds the model's context length {config.context_length}")
    eval_text = resolve_text(text, dataset)
    header = {"model": {"sha256": gguf_file.sha256, "path": str(model_path), "n_layer": n_layer},
              "text": {"sha256": eval_text.sha256}, "settings": settings.to_dict(), "layers": layer_list}
    if ckpt is not None:
        ckpt.check_matches(header)

    executor = open_workers(workers, ray_address, model, compute_options(device, "float32", max_memory)["device"])
    import hashlib

    import torch

    from qpsa.model.kernel import engine
    from qpsa.model.load import load_model
    from qpsa.scores.base import eval_tokens
    from qpsa.scores.qpsa.run import score_qpsa
    from qpsa.scores.results import ScoreRun

    start = time.perf_counter()
    compute = compute_options(device, "float32", max_memory)
    compute["dtype"] = settings.dtype  # Q-PSA's own --precision (float32 or float64)
    loaded = load_model(model, ctx=max_tokens, batch=batch_size, **compute)
    tokens = eval_tokens(loaded, eval_text, max_tokens)
    header["text"] = {"sha256": eval_text.sha256, "span": tokens.span, "start_token": tokens.start,
                      "n_tokens": int(tokens.tokens.shape[1]),
                      "tokens_sha256": hashlib.sha256(tokens.tokens.numpy().astype("<i8").tobytes()).hexdigest()}
    if ckpt is not None:
        ckpt.check_matches(header)
    else:
        ckpt = Checkpoint(ckpt_path, header, environment={"torch": torch.__version__, **engine()})
    env = {"torch": torch.__version__, **engine()}
    if ckpt.environment and ckpt.environment != env:
        _note(f"warning: the checkpoint was written with {ckpt.environment}, this run has {env}; float results "
              "of the remaining matrices may differ in the last bits from an uninterrupted run")

    units = settings.units_of_layer
    what = "layers" if settings.layer_probes else "matrices"
    total = len(layer_list) * len(units)
    todo = total - sum(1 for i in layer_list for m in units if f"{i}/{m}" in ckpt.units)
    if resume and ckpt.units:
        finished = [i for i in layer_list if all(f"{i}/{m}" in ckpt.units for m in units)]
        from qpsa.scores.checkpoint import _ranges

        _note(f"resuming {ckpt_path}: {total - todo} of {total} {what} finished "
              f"(complete layers: {_ranges(finished) or 'none'}); computing {todo}")
    elif resume:
        _note(f"no finished {what} in a checkpoint at {ckpt_path}; starting from the beginning")
    if not as_json:
        _note(f"{loaded.config.arch} {loaded.path.name}  sha256 {loaded.file.sha256[:16]}…  "
              f"text {eval_text.name}  {tokens.n_scored} scored tokens  {settings.estimator} estimator, "
              f"unit {settings.unit}, {settings.resolved_precision}")
    from qpsa.report.progress import progress_bar

    with progress_bar(f"Q-PSA ({what})", todo, quiet=as_json) as advance:
        result = score_qpsa(loaded, tokens, settings, layer_list, checkpoint=ckpt, advance=advance, log=_note,
                            executor=executor)
    run_info = result.scores.details["run"]
    _note(f"layers computed: {_ranges_or_none(run_info['computed_layers'])}; "
          f"fully resumed from the checkpoint: {_ranges_or_none(run_info['resumed_layers'])} "
          f"({len(run_info['resumed_units'])} {what} resumed, {len(run_info['computed_units'])} computed)")
    score_settings = {**settings.to_dict(), "probes": settings.probes if settings.estimator == "probe" else None,
                      "layers": layer_list}
    score_run = ScoreRun(
        command="score",
        model=loaded.describe(),
        text=tokens.describe(), settings=score_settings,
        base={"ppl": result.base_ppl, "nll": result.base_nll},
        methods={"qpsa": result.scores}, seconds=time.perf_counter() - start,
    )
    score_run.save(out_path)
    ckpt.delete()
    if as_json:
        print_json(score_run.to_dict())
        return
    from rich.console import Console

    from qpsa.report.qpsa_tables import qpsa_report

    qpsa_report(Console(), score_run)
    Console().print(f"results: {out_path} (and {out_path.with_suffix('.csv').name})")



def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ranges_or_none(layers: list[int]) -> str:
    from qpsa.scores.checkpoint import _ranges

    return _ranges(layers) or "none"
