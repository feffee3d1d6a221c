"""`q-psa requantize`, `q-psa sensitivity` and `q-psa plan`: what quantization costs a model, and where."""

from __future__ import annotations

import time
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
    check_positive,
    compute_options,
    console,
    model_stem,
    open_workers,
    print_json,
    results_folder,
)
from qpsa.errors import QpsaError

TensorTypeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--tensor-type", help="llama-quantize's REGEX=TYPE override, e.g. 'ffn_down=q6_k' (repeatable)"),
]
OutputTypeOpt = Annotated[Optional[str], typer.Option(help="type of the output head (default: llama-quantize's choice)")]
EmbeddingTypeOpt = Annotated[Optional[str], typer.Option(help="type of token_embd.weight")]
PureOpt = Annotated[bool, typer.Option(help="one type for every tensor, the output head included")]
FallbackOpt = Annotated[
    bool, typer.Option("--fallback/--no-fallback",
                       help="where a type cannot encode a tensor's rows, take llama-quantize's fallback type "
                            "(--no-fallback: fail instead, naming the tensor)")
]


def requantize(
    model: ModelArg,
    type_: Annotated[str, typer.Option("--type", help="llama-quantize's type (preset): Q4_K_M, Q5_K_M, Q3_K_M, Q6_K, "
                                                      "Q8_0, Q4_0, Q2_K, Q3_K_S/L, Q4_K_S, Q5_K_S, Q4_1, Q5_0, Q5_1, "
                                                      "F16, BF16, F32; Q3_K, Q4_K, Q5_K are its aliases of the _M ones")],
    output: Annotated[Optional[str], typer.Option(help="the GGUF file to write")] = None,
    tensor_type: TensorTypeOpt = None,
    output_tensor_type: OutputTypeOpt = None,
    token_embedding_type: EmbeddingTypeOpt = None,
    pure: PureOpt = False,
    fallback: FallbackOpt = True,
    imatrix: Annotated[Optional[str], typer.Option(
        help="importance matrix (GGUF or .dat, from llama-imatrix or q-psa imatrix): quantize as llama-quantize --imatrix")] = None,
    dry_run: Annotated[bool, typer.Option(help="show the types and sizes, write nothing")] = False,
    as_json: JsonOpt = False,
):
    """Re-encode a model's weights as `llama-quantize --allow-requantize MODEL OUT TYPE` does (see docs/quantization.md)."""
    from qpsa.gguf.read import open_gguf
    from qpsa.gguf.write import check_output_path
    from qpsa.quant.requantize import choose_types, preset_named, size_summary, write_requantized
    from qpsa.report.progress import progress_bar
    from qpsa.sources.catalog import resolve_model

    if output is None and not dry_run:
        raise QpsaError("give --output FILE.gguf (or --dry-run to only show the plan)")
    preset = preset_named(type_)
    start = time.perf_counter()
    gguf_file = open_gguf(resolve_model(model))
    if output is not None:
        check_output_path(output, gguf_file.path)
    weights = None
    if imatrix is not None:
        from qpsa.quant.imatrix import read_imatrix

        weights = read_imatrix(imatrix)  # checked against the model by choose_types
    choices = choose_types(gguf_file, preset, imatrix=weights,
                           **_type_options(tensor_type, output_tensor_type, token_embedding_type, pure, fallback))
    before = size_summary([_unchanged(c) for c in choices])
    after = size_summary(choices)
    if not dry_run:
        with progress_bar("requantizing", len(choices), quiet=as_json) as advance:
            write_requantized(gguf_file, choices, output, advance, file_type=preset.file_type, imatrix=weights)
    seconds = time.perf_counter() - start
    result = {"model": {"path": str(gguf_file.path), "sha256": gguf_file.sha256}, "type": preset.name,
              "file_type": preset.file_type, "output": None if dry_run else str(output),
              "imatrix": None if weights is None else _imatrix_summary(weights, choices),
              "before": before, "after": after, "seconds": seconds,
              "tensors": [c.to_dict() for c in choices]}
    if as_json:
        print_json(result)
        return
    from qpsa.report.quant_tables import requantize_report

    requantize_report(console(), result)


def _type_options(tensor_type, output_tensor_type, token_embedding_type, pure, fallback) -> dict:
    from qpsa.quant.requantize import parse_tensor_type, qtype_named

    return {
        "overrides": [parse_tensor_type(spec) for spec in tensor_type or []],
        "output_type": qtype_named(output_tensor_type) if output_tensor_type else None,
        "token_embedding_type": qtype_named(token_embedding_type) if token_embedding_type else None,
        "pure": pure,
        "fallback": fallback,
    }


def _imatrix_summary(imatrix, choices) -> dict:
    from qpsa.gguf.read import file_sha256

    changed = [c.name for c in choices if c.target != c.source]
    weighted = [n for n in changed if n in imatrix.in_sum2]
    return {"path": imatrix.path, "sha256": file_sha256(Path(imatrix.path)), "entries": len(imatrix.in_sum2),
            "weighted": len(weighted), "unweighted": sorted(set(changed) - set(weighted))}


def _unchanged(choice):
    import dataclasses

    return dataclasses.replace(choice, target=choice.source)





CtxOpt = Annotated[int, typer.Option(help="window size in tokens (llama.cpp's perplexity protocol)")]
GranularityOpt = Annotated[str, typer.Option(
    help="requantize one layer at a time, or one tensor; mixture-of-experts models: 'experts' (each layer's experts "
         "together, the rest of the layer apart) or 'expert' (one expert at a time; sensitivity only)")]
ResumeOpt = Annotated[bool, typer.Option(help="reuse the finished groups of a matching earlier run in --out")]
ImatrixOpt = Annotated[Optional[str], typer.Option(
    help="importance matrix (GGUF or .dat, from llama-imatrix or q-psa imatrix): every requantization is weighted "
         "by it, as llama-quantize --imatrix")]


def sensitivity(
    model: ModelArg,
    to: Annotated[str, typer.Option("--to", help="the lower type to requantize each group to, e.g. Q4_0")],
    granularity: GranularityOpt = "layer",
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: CtxOpt = 512,
    chunks: Annotated[int, typer.Option(help="windows of text to measure on")] = 4,
    out: Annotated[Optional[str], typer.Option(help="folder for the JSON, CSV and plot (default sensitivity-MODEL)")] = None,
    resume: ResumeOpt = False,
    imatrix: ImatrixOpt = None,
    workers: WorkersOpt = None, ray_address: RayAddressOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Requantize one layer (or tensor) at a time and measure the KL divergence and PPL change it causes."""
    from qpsa.quant.requantize import qtype_named
    from qpsa.report.quant_files import write_sensitivity

    qtype = qtype_named(to)
    compute = compute_options(device, dtype, max_memory)
    executor = open_workers(workers, ray_address, model, compute["device"])
    session = _session(model, text, dataset, ctx, chunks, out, f"sensitivity-{model_stem(model)}", as_json,
                       imatrix=imatrix, compute=compute)
    session.executor = executor
    result = session.sensitivity(qtype, granularity, resume)
    files = write_sensitivity(session, result)
    if as_json:
        return print_json({**session.header(), **result.to_dict(), "files": files})
    from qpsa.report.quant_tables import sensitivity_report

    sensitivity_report(console(), result, session.header())
    console().print("wrote " + ", ".join(files))


def _session(model, text, dataset, ctx, chunks, out, default_out, quiet, held_out: bool = False,
             imatrix: str | None = None, compute: dict | None = None):
    from qpsa.quant.session import MeasurementSession
    from qpsa.report.progress import ConsoleProgress

    check_positive(ctx=ctx, chunks=chunks)
    return MeasurementSession(model, text, dataset, ctx, chunks, results_folder(out, default_out),
                              ConsoleProgress(quiet), held_out, imatrix, compute)


def _gradient_load(compute: dict, predictors: list[str]) -> dict:
    """load_model's arguments for these predictors: the gradient ones (as Fisher) need the whole
    float model and a gradient per weight at once, which the memory check then asks for (one line if
    it does not fit)."""
    from qpsa.quant.predictors import NEEDS

    grads = [n for n in predictors if NEEDS.get(n) in ("gradients", "draws")]
    if not grads:
        return compute
    return {**compute, "grad": True, "whole": f"the gradient predictors ({', '.join(grads)})"}


DEFAULT_PLAN_TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
DrawsOpt = Annotated[int, typer.Option(help="fisher_kl: label draws per window (its standard error falls as 1/√draws)")]


def plan(
    model: ModelArg,
    target_bpw: Annotated[Optional[float], typer.Option(
        help="size budget in bits per weight over all tensors (llama.cpp's BPW)")] = None,
    target_preset: Annotated[Optional[str], typer.Option(
        help="size budget: exactly the size of this llama-quantize preset on the model, e.g. Q4_K_M")] = None,
    types: Annotated[Optional[list[str]], typer.Option("--types", help="candidate types (default Q8_0 Q6_K Q5_K Q4_K Q3_K Q2_K)")] = None,
    granularity: GranularityOpt = "layer",
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: CtxOpt = 512,
    chunks: Annotated[int, typer.Option(help="windows to measure sensitivities on; as many following ones check the plan")] = 2,
    out: Annotated[Optional[str], typer.Option(help="folder for plan.json, the recipe and the sensitivities (default plan-MODEL)")] = None,
    output: Annotated[Optional[str], typer.Option(help="also write the planned GGUF here")] = None,
    resume: ResumeOpt = False,
    imatrix: ImatrixOpt = None,
    estimator: Annotated[Optional[str], typer.Option(
        help="predict every option with this predictor (e.g. fisher_kl_diag; see `q-psa predictors`) and measure only "
             "those the choice rests on")] = None,
    draws: DrawsOpt = 2,
    workers: WorkersOpt = None, ray_address: RayAddressOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Choose a type per layer (or tensor) under a size budget from measured KLD, then check the plan on held-out
    text against llama-quantize's presets and uniform types, falling back to the best of them that fits if it is better."""
    from qpsa.gguf.write import check_output_path
    from qpsa.quant.plan import make_plan
    from qpsa.quant.requantize import preset_named, qtype_named
    from qpsa.report.html import write_report_beside
    from qpsa.report.quant_files import write_plan_plot, write_sensitivity

    qtypes = [qtype_named(t) for t in (types or DEFAULT_PLAN_TYPES)]
    if estimator is not None:
        from qpsa.quant.predictors import check_predictor

        check_predictor(estimator)
        check_positive(draws=draws)
    if (target_bpw is None) == (target_preset is None):
        raise QpsaError("give one budget: --target-bpw B or --target-preset NAME (e.g. Q4_K_M)")
    if target_preset is not None:
        target_preset = preset_named(target_preset).name
    elif not (0 < target_bpw < 64):
        raise QpsaError(f"--target-bpw must be between 0 and 64 bits per weight (got {target_bpw})")
    compute = compute_options(device, dtype, max_memory)
    executor = open_workers(workers, ray_address, model, compute["device"])
    session = _session(model, text, dataset, ctx, chunks, out, f"plan-{model_stem(model)}", as_json, held_out=True,
                       imatrix=imatrix, compute=_gradient_load(compute, [estimator] if estimator else []))
    session.executor = executor
    if output is not None:
        check_output_path(output, session.loaded.path)
    result = make_plan(session, qtypes, target_bpw, granularity, resume,
                       measured=lambda r: write_sensitivity(session, r), target_preset=target_preset,
                       estimator=estimator, draws=draws)
    result.execution = None if executor is None else executor.describe()
    files = result.write(session.out, output, session.progress)
    files.append(write_plan_plot(session.out, result))
    files.append(str(write_report_beside(session.out / "plan.json")))
    if as_json:
        return print_json({**session.header(), **result.to_dict(), "files": files})
    from qpsa.report.quant_tables import plan_report

    plan_report(console(), result)
    console().print("wrote " + ", ".join(files))


def predictors(
    model: ModelArg,
    types: Annotated[Optional[list[str]], typer.Option("--types", help="target types (default Q4_0)")] = None,
    granularity: Annotated[str, typer.Option(help="requantize one tensor at a time, or one layer at a time")] = "tensor",
    names: Annotated[Optional[list[str]], typer.Option("--predictors", help="predictors to compare (default: all)")] = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: CtxOpt = 512,
    chunks: Annotated[int, typer.Option(help="windows of text to measure and predict on")] = 2,
    draws: DrawsOpt = 2,
    out: Annotated[Optional[str], typer.Option(help="folder for predictors.json, the plots and the measured "
                                                    "sensitivities (default predictors-MODEL)")] = None,
    resume: ResumeOpt = False,
    imatrix: ImatrixOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """How well cheap quantities predict the measured KLD of requantizing each tensor (or layer): Spearman ρ with a
    bootstrap interval, and each predictor's cost beside the measurement's."""
    from qpsa.quant.predictors import PREDICTORS, check_predictor, compare_predictors
    from qpsa.quant.requantize import qtype_named
    from qpsa.report.quant_files import write_predictors, write_sensitivity

    qtypes = [qtype_named(t) for t in (types or ["Q4_0"])]
    chosen = [check_predictor(n) for n in (names or PREDICTORS)]
    check_positive(draws=draws)
    compute = _gradient_load(compute_options(device, dtype, max_memory), chosen)
    session = _session(model, text, dataset, ctx, chunks, out, f"predictors-{model_stem(model)}", as_json,
                       imatrix=imatrix, compute=compute)
    result = compare_predictors(session, qtypes, granularity, chosen, draws, resume,
                                measured_cb=lambda r: write_sensitivity(session, r))
    files = write_predictors(session, result)
    if as_json:
        return print_json({**session.header(), **result.to_dict(), "files": files})
    from qpsa.report.quant_tables import predictors_report

    predictors_report(console(), result)
    console().print("wrote " + ", ".join(files))
