"""`q-psa noise`: input sensitivity, Gaussian noise on the embeddings and typos in prompts (qpsa.eval.noise).

Thin: the settings are checked before the model loads, the work is `qpsa.eval.noise.run_noise`, the
rendering `qpsa.report.noise_tables` and `qpsa.report.noise_plots`. Heavy imports stay inside the
function so that `q-psa --help` stays instant.
"""

from __future__ import annotations

import json
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
    check_text_choice,
    compute_options,
    model_stem,
    print_json,
    results_folder,
)
from qpsa.errors import QpsaError


def noise(
    model: ModelArg,
    sigma: Annotated[Optional[list[float]], typer.Option(
        "--sigma", help="noise std relative to the RMS of the embedded window (--sigma 0.01 0.03 0.1)")] = None,
    typo_rate: Annotated[float, typer.Option(help="probability that each letter of a prompt is edited, in (0, 1]")] = 0.05,
    prompts: Annotated[Optional[str], typer.Option(
        help="a UTF-8 file of prompts, one per line (default: a few short factual questions)")] = None,
    text: Annotated[Optional[str], typer.Option(help="a UTF-8 text file for the embedding noise")] = None,
    dataset: DatasetOpt = None,
    ctx: Annotated[int, typer.Option(help="window size in tokens")] = 512,
    chunks: Annotated[int, typer.Option(help="number of windows")] = 4,
    seed: Annotated[int, typer.Option(help="seed of the noise and typo draws")] = 42,
    samples: Annotated[int, typer.Option(help="noise draws per window and σ; typo draws per prompt")] = 1,
    new_tokens: Annotated[int, typer.Option(help="length of the greedy continuations compared")] = 12,
    out: Annotated[Optional[str], typer.Option(help="folder for noise.json and noise.png (default noise-MODEL)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """Input sensitivity: Gaussian noise on the input embeddings (KL, top-1 flips, PPL ratio, and the
    hidden-state perturbation layer by layer) and random typos in prompts."""
    from qpsa.eval.generation import QUESTION_PROMPTS, read_prompts
    from qpsa.eval.noise.settings import DEFAULT_SIGMAS, NoiseSettings
    from qpsa.sources.catalog import resolve_model

    settings = NoiseSettings(sigmas=tuple(sigma or DEFAULT_SIGMAS), typo_rate=typo_rate, samples=samples, seed=seed,
                             ctx=ctx, chunks=chunks, new_tokens=new_tokens)
    check_text_choice(text, dataset)
    resolve_model(model)
    out_dir = results_folder(out, f"noise-{model_stem(model)}")
    prompt_list = read_prompts(prompts) if prompts else list(QUESTION_PROMPTS)

    from qpsa.eval.noise.run import run_noise
    from qpsa.eval.perplexity import make_windows
    from qpsa.model.load import load_model
    from qpsa.report.progress import progress_bar
    from qpsa.sources.texts import resolve_text

    eval_text = resolve_text(text, dataset)
    loaded = load_model(model, batch=samples, ctx=ctx, **compute_options(device, dtype, max_memory))
    windows = make_windows(loaded.tokenizer, eval_text.text, ctx, chunks, None, loaded.config.context_length)
    console = None
    if not as_json:
        from rich.console import Console

        from qpsa.report.tables import run_header

        console = Console()
        run_header(console, loaded, eval_text, f"{len(prompt_list)} prompts ({prompts or 'built-in'})")
    with progress_bar("noise", settings.passes(windows.tokens.shape[0], len(prompt_list)), quiet=as_json) as advance:
        report = run_noise(loaded, eval_text, prompt_list, settings, prompts_source=prompts or "built-in",
                           advance=advance, windows=windows)
    report.files = _write(report, out_dir)
    if as_json:
        print_json(report.to_dict())
        return
    from qpsa.report.noise_tables import noise_report

    noise_report(console, report)
    console.print("wrote " + ", ".join(report.files))


def _write(report, out_dir: Path) -> list[str]:
    """noise.json (atomically), noise.png and noise.html in `out_dir`; their paths."""
    from qpsa.fsutil import write_atomic
    from qpsa.report.html import write_report_beside
    from qpsa.report.noise_plots import perturbation_by_depth

    json_path, png_path, html_path = out_dir / "noise.json", out_dir / "noise.png", out_dir / "noise.html"
    files = [str(json_path), str(png_path), str(html_path)]
    report.files = files
    curves = [{"sigma": s.sigma, "depth": [x.depth for x in s.layers], "rel": [x.rel for x in s.layers],
               "rel_se": [x.rel_se for x in s.layers]} for s in report.embedding.sigmas]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, json.dumps(report.to_dict(), indent=1))
        perturbation_by_depth(png_path, curves, f"Embedding noise through the layers, {Path(report.model['path']).name}")
        write_report_beside(json_path)  # noise.html
    except OSError as e:
        raise QpsaError(f"--out {out_dir}: cannot write: {e.strerror or e}") from None
    return files
