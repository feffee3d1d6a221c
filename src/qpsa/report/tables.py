"""Console rendering of results (computes nothing)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qpsa.eval.perplexity import PerplexityResult
from qpsa.model.inspection import ModelReport


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def run_header(console: Console, loaded, eval_text, detail: str, layers: bool = True) -> None:
    """The two lines every evaluating command starts with: which model (file, sha256, load time) and
    which text (name, sha256, `detail` on how it is used), so figures are never compared across them."""
    n_layer = f"  {loaded.config.n_layer} layers" if layers else ""
    console.print(f"[bold]{loaded.config.arch}[/] {loaded.path.name}{n_layer}  sha256 {loaded.file.sha256[:16]}…  "
                  f"(loaded in {loaded.load_seconds:.1f} s)")
    compute = loaded.compute() if hasattr(loaded, "compute") else None
    if compute:
        weights = f", weights {compute['weights']}" if "weights" in compute else ""
        console.print(f"device {compute['device']}, dtype {compute['dtype']}{weights}")
    console.print(f"text {eval_text.name}  sha256 {eval_text.sha256[:16]}…  {detail}")


def model_report(console: Console, r: ModelReport) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    arch = r.architecture + ("" if r.supported else "  (not supported by q-psa's engine)")
    for label, value in (
        ("file", r.path), ("size", f"{_bytes(r.file_size)} ({r.file_size:,} bytes)"), ("sha256", r.sha256),
        ("name", r.name or "-"), ("architecture", arch), ("GGUF version", r.gguf_version),
        ("layers", r.n_layer), ("heads / KV heads", f"{r.n_head} / {r.n_head_kv}"),
        ("embedding size", r.n_embd), ("FFN size", r.n_ff), ("vocabulary", r.vocab_size),
        ("context length", r.context_length),
        ("weights", f"{r.n_weights:,} at {r.bits_per_weight:.3f} bits per weight"),
        *((("experts", _experts_line(r.experts)),) if r.experts else ()),
    ):
        summary.add_row(label, str(value))
    console.print(summary)

    tensors = Table(title="Tensors (shape rows × row length)")
    for col, justify in (("name", "left"), ("shape", "right"), ("type", "left"), ("bytes", "right"), ("bits/weight", "right")):
        tensors.add_column(col, justify=justify)
    for t in r.tensors:
        tensors.add_row(t.name, " × ".join(map(str, t.shape)), t.type, f"{t.bytes:,}", f"{t.bits_per_weight:.3f}")
    console.print(tensors)

    layers = Table(title="Per-layer totals")
    for col, justify in (("layer", "right"), ("tensors", "right"), ("weights", "right"), ("bytes", "right"),
                         ("bits/weight", "right"), ("types (share of weights)", "left")):
        layers.add_column(col, justify=justify)
    for lt in r.layers:
        types = ", ".join(f"{k} {v / lt.n_weights:.0%}" for k, v in sorted(lt.types.items(), key=lambda kv: -kv[1]))
        layers.add_row(str(lt.layer), str(lt.n_tensors), f"{lt.n_weights:,}", f"{lt.bytes:,}",
                       f"{lt.bits_per_weight:.3f}", types)
    console.print(layers)


def _experts_line(e: dict) -> str:
    """Expert counts and sizes in one line: per layer, one expert's weights and bytes."""
    sizes = sorted({(p["weights"], p["bytes"], "/".join(dict.fromkeys(p["types"]))) for p in e["per_expert"]})
    one = "; ".join(f"{w:,} weights, {_bytes(b)} ({t})" for w, b, t in sizes[:3]) + ("; …" if len(sizes) > 3 else "")
    return (f"{e['count']} per layer in {e['layers']} layers, {e['used']} used per token, width "
            f"{e['feed_forward_length']}; one expert: {one}; experts hold {e['share_of_weights']:.0%} of the weights; "
            f"{e['active_weights_per_token']:,} weights active per token")


def perplexity_report(console: Console, r: PerplexityResult, engine: dict | None = None) -> None:
    running = Table(title="Running perplexity (cumulative over windows so far)")
    running.add_column("window", justify="right")
    running.add_column("PPL", justify="right")
    running.add_column("± se", justify="right")
    step = max(1, len(r.running) // 20)  # at most ~20 rows; the last one always
    for row in r.running:
        if row["window"] % step == 0 or row["window"] == len(r.running):
            running.add_row(str(row["window"]), f"{row['ppl']:.4f}", f"{row['ppl_se']:.4f}")
    console.print(running)
    console.print(f"[bold]PPL = {r.ppl:.4f} ± {r.ppl_se:.4f}[/]  (mean NLL {r.nll:.5f} ± {r.nll_se:.5f} nats "
                  f"over {r.n_scored:,} scored tokens; ± is one standard error)")
    console.print(f"{r.n_windows} windows of {r.ctx} tokens in {r.seconds:.1f} s: "
                  f"{r.seconds_per_window:.3f} s per window, {r.tokens_per_second:.0f} tokens/s"
                  + (f" ({engine['threads']} threads, CPU kernels: {engine['cpu_kernels']})" if engine else ""))


def edit_report(console: Console, r) -> None:
    """Pruning/looping: methods × K, each cell PPL ratio ± se, in the original study's form."""
    ks = sorted({e.k for e in r.edits})
    methods = list(dict.fromkeys(e.method for e in r.edits))
    verb = "removed" if r.kind == "prune" else "repeated"
    table = Table(title=f"PPL ratio to the unedited model ({r.kind}: K layers {verb}), "
                        f"held-out {r.eval_text['n_scored']} tokens of {r.eval_text['name']}; base PPL {r.base_ppl:.4f}")
    table.add_column("method")
    for k in ks:
        table.add_column(f"K={k}", justify="right")
    cells = {(e.method, e.k): e for e in r.edits}
    for m in methods:
        row = [m]
        for k in ks:
            e = cells.get((m, k))
            row.append("-" if e is None else f"{_ratio(e.ratio)} ± {_ratio(e.ratio_se)}")
        table.add_row(*row)
    console.print(table)
    layers = Table(title=f"Layers {verb}")
    layers.add_column("method")
    for k in ks:
        layers.add_column(f"K={k}")
    for m in methods:
        layers.add_row(m, *[",".join(map(str, cells[(m, k)].layers)) if (m, k) in cells else "-" for k in ks])
    console.print(layers)
    console.print(f"{len(r.edits)} evaluations in {r.seconds:.1f} s. Ratio = exp(mean ΔNLL) on the same tokens; "
                  "± is one standard error from paired per-token differences.")


def _ratio(x: float) -> str:
    if x != x or x == float("inf"):
        return str(x)
    return f"{x:.3f}" if x < 100 else f"{x:.3g}"
