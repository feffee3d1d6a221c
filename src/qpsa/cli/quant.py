"""`q-psa requantize`, `q-psa sensitivity` and `q-psa plan`: what quantization costs a model, and where."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from qpsa.errors import QpsaError

ModelArg = Annotated[str, typer.Argument(help="a bundled model name or a path to a .gguf file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]
TensorTypeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--tensor-type", help="llama-quantize's REGEX=TYPE override, e.g. 'ffn_down=q6_k' (repeatable)"),
]
OutputTypeOpt = Annotated[Optional[str], typer.Option(help="type of the output head (default: llama-quantize's choice)")]
EmbeddingTypeOpt = Annotated[Optional[str], typer.Option(help="type of token_embd.weight")]
PureOpt = Annotated[bool, typer.Option(help="one type for every tensor, the output head included")]
FallbackOpt = Annotated[
    bool, typer.Option(help="where a type cannot encode a tensor's rows, use llama-quantize's fallback type instead of failing")
]


def requantize(
    model: ModelArg,
    type_: Annotated[str, typer.Option("--type", help="the type for the weights: Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K, F16, BF16, F32")],
    output: Annotated[Optional[str], typer.Option(help="the GGUF file to write")] = None,
    tensor_type: TensorTypeOpt = None,
    output_tensor_type: OutputTypeOpt = None,
    token_embedding_type: EmbeddingTypeOpt = None,
    pure: PureOpt = False,
    fallback: FallbackOpt = False,
    dry_run: Annotated[bool, typer.Option(help="show the types and sizes, write nothing")] = False,
    as_json: JsonOpt = False,
):
    """Re-encode a model's weights into another quantization type, as llama-quantize would (see docs/quantization.md)."""
    from qpsa.gguf.read import open_gguf
    from qpsa.gguf.write import check_output_path
    from qpsa.quant.requantize import choose_types, summarize, write_requantized
    from qpsa.report.progress import progress_bar
    from qpsa.sources.catalog import resolve_model

    if output is None and not dry_run:
        raise QpsaError("give --output FILE.gguf (or --dry-run to only show the plan)")
    start = time.perf_counter()
    gguf_file = open_gguf(resolve_model(model))
    if output is not None:
        check_output_path(output, gguf_file.path)
    choices = choose_types(gguf_file, type_, **_type_options(tensor_type, output_tensor_type, token_embedding_type,
                                                            pure, fallback))
    before = summarize([_unchanged(c) for c in choices])
    after = summarize(choices)
    if not dry_run:
        with progress_bar("requantizing", len(choices), quiet=as_json) as advance:
            write_requantized(gguf_file, choices, output, progress=advance)
    seconds = time.perf_counter() - start
    result = {"model": {"path": str(gguf_file.path), "sha256": gguf_file.sha256}, "type": type_.upper(),
              "output": None if dry_run else str(output), "before": before, "after": after, "seconds": seconds,
              "tensors": [c.to_dict() for c in choices]}
    if as_json:
        _print_json(result)
        return
    from qpsa.report.quant_tables import requantize_report

    requantize_report(_console(), result)


def _type_options(tensor_type, output_tensor_type, token_embedding_type, pure, fallback) -> dict:
    from qpsa.quant.requantize import parse_tensor_type, qtype_named

    return {
        "overrides": [parse_tensor_type(spec) for spec in tensor_type or []],
        "output_type": qtype_named(output_tensor_type) if output_tensor_type else None,
        "token_embedding_type": qtype_named(token_embedding_type) if token_embedding_type else None,
        "pure": pure,
        "fallback": fallback,
    }


def _unchanged(choice):
    import dataclasses

    return dataclasses.replace(choice, target=choice.source)


def _console():
    from rich.console import Console

    return Console()


def _print_json(obj) -> None:
    import sys

    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _write_json(path: Path, obj) -> None:
    from qpsa.fsutil import write_atomic

    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


TextOpt = Annotated[Optional[str], typer.Option(help="a UTF-8 text file (default: the default text)")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="a named dataset: wikitext-2")]
CtxOpt = Annotated[int, typer.Option(help="window size in tokens (llama.cpp's perplexity protocol)")]
GranularityOpt = Annotated[str, typer.Option(help="requantize one layer at a time, or one tensor at a time")]
ResumeOpt = Annotated[bool, typer.Option(help="reuse the finished groups of a matching earlier run in --out")]


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
    as_json: JsonOpt = False,
):
    """Requantize one layer (or tensor) at a time and measure the KL divergence and PPL change it causes."""
    from qpsa.quant.requantize import qtype_named

    qtype = qtype_named(to)
    session = _Session(model, text, dataset, ctx, chunks, out or f"sensitivity-{_stem(model)}", as_json)
    result = session.sensitivity(qtype, granularity, resume)
    files = session.write_sensitivity(result)
    if as_json:
        return _print_json({**session.header(), **result.to_dict(), "files": files})
    from qpsa.report.quant_tables import sensitivity_report

    sensitivity_report(_console(), result, session.header())
    _console().print("wrote " + ", ".join(files))


class _Session:
    """One model and text for sensitivity and plan: the measured span's windows, the reference
    pass over them (made on first use), and the output folder."""

    def __init__(self, model, text, dataset, ctx, chunks, out, quiet, held_out: bool = False):
        from qpsa.cli.app import _check_positive
        from qpsa.eval.perplexity import make_windows
        from qpsa.model.load import load_model
        from qpsa.sources.texts import resolve_text

        _check_positive(ctx=ctx, chunks=chunks)
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise QpsaError(f"{self.out}: exists and is not a folder")
        self.text = resolve_text(text, dataset)
        self.loaded = load_model(model)
        self.ctx, self.chunks, self.quiet = ctx, chunks, quiet
        windows = make_windows(self.loaded.tokenizer, self.text.text, ctx, 2 * chunks if held_out else chunks, None,
                               self.loaded.config.context_length)
        self.windows = _span(windows, 0, chunks)
        self.held_out = _span(windows, chunks, 2 * chunks) if held_out else None
        self._ref = None
        self.measured = {}  # statistics by (group, exact types), shared across types

    def header(self) -> dict:
        return {"model": {"name": self.loaded.name, "path": str(self.loaded.path), "sha256": self.loaded.file.sha256},
                "text": self.text.describe(), "ctx": self.ctx, "chunks": self.chunks,
                "windows": f"windows 0..{self.chunks - 1} of {self.ctx} tokens (measured span)"}

    def reference(self):
        from qpsa.quant.sensitivity import Reference
        from qpsa.report.progress import progress_bar

        if self._ref is None:
            with progress_bar("reference pass", self.windows.tokens.shape[0], quiet=self.quiet) as advance:
                self._ref = Reference(self.loaded.model, self.windows, progress=advance)
        return self._ref

    def checkpoint(self, qtype, granularity) -> Path:
        return self.out / f"sensitivity-{qtype.name}-{granularity}.json"

    def sensitivity(self, qtype, granularity: str, resume: bool):
        from qpsa.quant.sensitivity import quant_groups, row_from_dict, run_sensitivity
        from qpsa.report.progress import progress_bar

        groups = quant_groups(self.loaded, granularity)
        path = self.checkpoint(qtype, granularity)
        done = {}
        if resume and path.exists():
            try:
                saved = json.loads(path.read_text())
                same = {k: saved.get(k) for k in ("model", "text", "ctx", "chunks", "type", "granularity")}
                want = {**{k: v for k, v in self.header().items() if k != "windows"}, "type": qtype.name,
                        "granularity": granularity}
                if same == json.loads(json.dumps(want)):
                    done = {r["group"]["name"]: row_from_dict(r) for r in saved["rows"]}
            except (OSError, ValueError, KeyError, TypeError):
                done = {}
        self.out.mkdir(parents=True, exist_ok=True)
        ref = self.reference()
        rows = []

        def checkpoint(row):
            rows.append(row)
            partial = {**self.header(), "type": qtype.name, "granularity": granularity, "complete": False,
                       "rows": [r.to_dict() for r in list(done.values()) + rows]}
            _write_json(path, partial)

        todo = len([g for g in groups if g.name not in done])
        with progress_bar(f"requantizing to {qtype.name}, one {granularity} at a time", todo, quiet=self.quiet) as advance:
            def on_row(row):
                checkpoint(row)
                advance(f"{row.group.name}: KLD {row.stats.kld:.2e}")

            result = run_sensitivity(self.loaded, ref, qtype, groups, done, on_row, self.measured)
        result.granularity = granularity
        return result

    def write_sensitivity(self, result) -> list[str]:
        from qpsa.report.plots import quant_sensitivity_plot

        path = self.out / f"sensitivity-{result.qtype}-{result.granularity}.json"
        _write_json(path, {**self.header(), **result.to_dict(), "complete": True})
        csv_path = path.with_suffix(".csv")
        lines = ["group,type,bytes,bytes_before,kld,kld_se,kld_p99,dnll,dnll_se,ppl,ppl_base,same_top"]
        for r in result.rows:
            s = r.stats
            lines.append(f"{r.group.name},{r.qtype},{r.bytes},{r.bytes_before},{s.kld:.6g},{s.kld_se:.3g},"
                         f"{s.kld_p99:.6g},{s.dnll:.6g},{s.dnll_se:.3g},{s.ppl:.6g},{s.ppl_base:.6g},{s.same_top:.6f}")
        from qpsa.fsutil import write_atomic

        write_atomic(csv_path, "\n".join(lines) + "\n")
        png = path.with_suffix(".png")
        quant_sensitivity_plot(png, result, f"{self.loaded.path.name}: each {result.granularity} alone to {result.qtype} "
                                            f"({result.n_tokens} tokens of {self.text.name})")
        return [str(path), str(csv_path), str(png)]


def _span(windows, first: int, last: int):
    from qpsa.eval.perplexity import Windows

    return Windows(windows.tokens[first:last], windows.score_from,
                   f"windows {first}..{last - 1} of {windows.tokens.shape[1]} tokens, second half scored")


def _stem(model: str) -> str:
    return Path(model).stem if model.endswith(".gguf") else model


DEFAULT_PLAN_TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


def plan(
    model: ModelArg,
    target_bpw: Annotated[float, typer.Option(help="size budget in bits per weight over all tensors (llama.cpp's BPW)")],
    types: Annotated[Optional[list[str]], typer.Option("--types", help="candidate types (default Q8_0 Q6_K Q5_K Q4_K Q3_K Q2_K)")] = None,
    granularity: GranularityOpt = "layer",
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: CtxOpt = 512,
    chunks: Annotated[int, typer.Option(help="windows to measure sensitivities on; as many following ones check the plan")] = 2,
    out: Annotated[Optional[str], typer.Option(help="folder for plan.json, the recipe and the sensitivities (default plan-MODEL)")] = None,
    output: Annotated[Optional[str], typer.Option(help="also write the planned GGUF here")] = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
):
    """Choose a type per layer (or tensor) under a size budget from measured KLD, then check the plan on held-out text."""
    from qpsa.gguf.write import check_output_path
    from qpsa.quant.plan import make_plan
    from qpsa.quant.requantize import qtype_named

    qtypes = [qtype_named(t) for t in (types or DEFAULT_PLAN_TYPES)]
    if not (0 < target_bpw < 64):
        raise QpsaError(f"--target-bpw must be between 0 and 64 bits per weight (got {target_bpw})")
    session = _Session(model, text, dataset, ctx, chunks, out or f"plan-{_stem(model)}", as_json, held_out=True)
    if output is not None:
        check_output_path(output, session.loaded.path)
    result = make_plan(session, qtypes, target_bpw, granularity, resume)
    files = result.write(session.out, output, quiet=as_json)
    if as_json:
        return _print_json({**session.header(), **result.to_dict(), "files": files})
    from qpsa.report.quant_tables import plan_report

    plan_report(_console(), result)
    _console().print("wrote " + ", ".join(files))
