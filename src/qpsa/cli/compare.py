"""`q-psa compare BASE OTHER`: llama.cpp's KL-divergence statistics and greedy answers, side by side.

Registered in `qpsa.cli.app`; heavy imports happen inside the function so that `q-psa --help` stays
instant. Every check that needs no model (arguments, files, prompts, the base file's header) runs
before any model is loaded. See docs/compare.md.
"""

from __future__ import annotations

import json
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
    TextOpt,
    compute_options,
    print_json,
    results_path,
)
from qpsa.errors import QpsaError


def compare(
    base: Annotated[str, typer.Argument(help="the reference model: a bundled name or a path to a .gguf file")],
    other: Annotated[Optional[str], typer.Argument(help="the model compared with BASE (or give --type)")] = None,
    qtype: Annotated[Optional[str], typer.Option("--type", help="compare with BASE requantized in memory to this "
                                                                "llama-quantize type, e.g. Q4_K_M or Q4_0 (instead of OTHER)")] = None,
    tensor_type: Annotated[Optional[list[str]], typer.Option("--tensor-type", help="with --type: REGEX=TYPE for the "
                                                             "tensors whose names match (repeatable)")] = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: Annotated[Optional[int], typer.Option(help="window size in tokens (default 512, or the base file's)")] = None,
    chunks: Annotated[Optional[int], typer.Option(help="number of windows (default: all whole windows, or the "
                                                       "base file's)")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="a UTF-8 file with one prompt per line (default: a "
                                                        "built-in list)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate per prompt; 0 skips "
                                                                         "the generations")] = 16,
    raw: Annotated[bool, typer.Option("--raw", help="continue prompts as plain text, not in the chat format")] = False,
    save_base: Annotated[Optional[str], typer.Option("--save-base", help="also write BASE's log-probs here, to "
                                                     "reuse with --base-logits")] = None,
    base_logits: Annotated[Optional[str], typer.Option("--base-logits", help="read BASE's log-probs from this file "
                                                       "(written by --save-base, or by llama.cpp's "
                                                       "--kl-divergence-base) instead of running BASE")] = None,
    out: Annotated[Optional[str], typer.Option(help="also write the results as JSON here, and an HTML report "
                                                    "beside it (FILE.html)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    as_json: JsonOpt = False,
):
    """KL divergence, Δp, same top token and PPL of OTHER against BASE (llama.cpp's --kl-divergence), and greedy answers."""
    from qpsa.eval.compare.logprobs import BaseLogProbsFile
    from qpsa.eval.generation import TASK_PROMPTS, read_prompts
    from qpsa.sources.catalog import resolve_model

    start = time.perf_counter()
    # -- checks that need no model
    if (other is None) == (qtype is None):
        raise QpsaError("give OTHER (a second model) or --type TYPE (BASE requantized in memory), one of them")
    if tensor_type and qtype is None:
        raise QpsaError("--tensor-type needs --type")
    if save_base and base_logits:
        raise QpsaError("give --save-base or --base-logits, not both")
    for name, v in (("ctx", ctx), ("chunks", chunks)):
        if v is not None and v <= 0:
            raise QpsaError(f"--{name} must be a positive number (got {v})")
    if max_new_tokens < 0:
        raise QpsaError(f"--max-new-tokens must be zero or more (got {max_new_tokens})")
    overrides = []
    if qtype is not None:
        from qpsa.quant.requantize import parse_tensor_type, preset_named

        preset_named(qtype)
        overrides = [parse_tensor_type(spec) for spec in tensor_type or []]
    base_path = resolve_model(base)
    other_path = resolve_model(other) if other is not None else None
    prompt_list = read_prompts(prompts) if prompts else list(TASK_PROMPTS)
    if save_base:
        from qpsa.gguf.write import check_output_path

        for source in (base_path, other_path):
            if source is not None:
                check_output_path(save_base, source)
    out_path = results_path(out, "compare.json", base_path) if out is not None else None
    base_file = BaseLogProbsFile.open(base_logits) if base_logits else None
    if base_file is not None:
        ctx, chunks = ctx or base_file.ctx, chunks or base_file.n_chunk
    ctx = ctx or 512
    from qpsa.sources.texts import resolve_text

    eval_text = resolve_text(text, dataset)

    # -- models, vocabulary, windows
    from qpsa.eval.compare.logprobs import BaseLogProbsWriter
    from qpsa.eval.compare.run import check_base_file, check_same_vocabulary, compare_windows, tokenizer_fingerprint
    from qpsa.eval.perplexity import make_windows
    from qpsa.model.load import load_model

    compute = compute_options(device, dtype, max_memory)
    loaded_base = load_model(base, batch=1, **compute)
    if qtype is not None:
        from qpsa.quant.requantize import requantize_model

        loaded_other = requantize_model(loaded_base, qtype, overrides)
        other_name = loaded_other.name
    else:
        loaded_other = load_model(other, batch=1, **compute)
        other_name = other
    base_md, other_md = loaded_base.file.metadata, loaded_other.file.metadata
    check_same_vocabulary(base, base_md, loaded_base.config.vocab_size, other_name, other_md,
                          loaded_other.config.vocab_size)
    windows = make_windows(loaded_base.tokenizer, eval_text.text, ctx, chunks, None, loaded_base.config.context_length)
    n_windows = windows.tokens.shape[0]
    if windows.n_scored < 2 * n_windows:
        raise QpsaError(f"--ctx {ctx} scores fewer than 2 tokens per window; use a larger --ctx")
    fingerprint = tokenizer_fingerprint(base_md)
    tok = loaded_base.tokenizer
    if base_file is not None:
        check_base_file(base_file, windows, loaded_base.config.vocab_size, loaded_base.file.sha256,
                        eval_text.describe(), fingerprint, tok.bos_id if tok.add_bos else None)

    base_info = loaded_base.describe()
    other_info = {"name": other_name, "path": str(loaded_other.path),
                  "sha256": loaded_other.file.sha256 if qtype is None else None,
                  "requantized_from": loaded_base.file.sha256 if qtype is not None else None,
                  "type": qtype, "tensor_types": tensor_type or []}
    console = None
    if not as_json:
        from rich.console import Console

        console = Console()
        console.print(f"[bold]base[/]  {loaded_base.path.name}  sha256 {loaded_base.file.sha256[:16]}…"
                      + (f"  (log-probs from {base_file.path})" if base_file else ""))
        console.print(f"[bold]other[/] {other_name}" + (f"  sha256 {loaded_other.file.sha256[:16]}…" if qtype is None else ""))
        console.print(f"text {eval_text.name}  sha256 {eval_text.sha256[:16]}…  {windows.description}")
        if base_file is not None and base_file.meta is None:
            console.print("[yellow]the base file has no q-psa metadata (llama.cpp's format): checked its tokens, "
                          "ctx, windows and vocabulary, not which model wrote it[/]")

    # -- the windows: base (or its file) and other, interleaved
    writer = BaseLogProbsWriter(save_base, windows, loaded_base.config.vocab_size) if save_base else None
    from qpsa.report.progress import ConsoleProgress

    try:
        run = compare_windows(loaded_other.model, windows, base_file or loaded_base.model, writer,
                              progress=ConsoleProgress(quiet=as_json))
        if writer is not None:
            writer.finish({"format": "q-psa base log-probs 1", "model": base_info, "text": eval_text.describe(),
                           "ctx": run.ctx, "chunks": run.n_windows, "vocab_size": loaded_base.config.vocab_size,
                           "tokenizer_sha256": fingerprint, "windows": windows.description,
                           "ppl_base": run.stats.ppl_base, "ppl_base_se": run.stats.ppl_base_se,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    # -- greedy generations
    gen_seconds, fmt, answers = 0.0, None, []
    if max_new_tokens > 0:
        from qpsa.eval.generation import side_by_side
        from qpsa.report.progress import progress_bar

        t = time.perf_counter()
        with progress_bar("generations", len(prompt_list), quiet=as_json) as advance:
            fmt, answers = side_by_side(loaded_base.model, loaded_other.model, tok, base_md, prompt_list,
                                        max_new_tokens, raw=raw, advance=advance)
        gen_seconds = time.perf_counter() - t

    timings = {"load_base_s": loaded_base.load_seconds, "load_other_s": loaded_other.load_seconds,
               "base_windows_s": run.base_seconds, "other_windows_s": run.other_seconds,
               "generation_s": gen_seconds, "total_s": time.perf_counter() - start}
    result = {"base": base_info, "other": other_info, "text": eval_text.describe(), "ctx": run.ctx,
              "chunks": run.n_windows, "windows": windows.description, "n_scored": run.n_scored,
              "base_logits": {"read_from": str(base_file.path) if base_file else None,
                              "saved_to": str(save_base) if save_base else None},
              "statistics": run.stats.to_dict(), "running": run.running,
              "generations": {"format": fmt, "max_new_tokens": max_new_tokens,
                              "prompts": [a.to_dict() for a in answers]},
              "timings": timings}
    written = []
    if out_path is not None:
        from qpsa.fsutil import write_atomic
        from qpsa.report.html import write_report_beside

        write_atomic(out_path, json.dumps(result, indent=2, default=str) + "\n")
        written = [str(out_path), str(write_report_beside(out_path))]
    if as_json:
        print_json({**result, "files": written} if written else result)
        return
    from qpsa.report.compare_tables import compare_report, generation_report

    compare_report(console, run)
    if answers:
        generation_report(console, fmt, answers, "BASE", "OTHER", max_new_tokens)
    if save_base:
        size = Path(save_base).stat().st_size
        console.print(f"saved the base's log-probs to {save_base} ({size / 2**20:.1f} MiB)")
    if written:
        console.print("wrote " + ", ".join(written))
    console.print(f"base {timings['base_windows_s']:.1f} s, other {timings['other_windows_s']:.1f} s over "
                  f"{run.n_windows} windows; generations {gen_seconds:.1f} s; total {timings['total_s']:.1f} s")
