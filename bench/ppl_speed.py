"""Perplexity speed: q-psa against the float32 roofline and against llama.cpp, measured in one run.

For each model: the protocol's FLOPs per window come from `forward_flops` (weight matmuls and
causal attention over ctx tokens, the output head only on the ctx/2 − 1 scored positions). q-psa
runs the windows in batches of WINDOW_BATCH (after a warm-up batch), and the roofline, the GFLOP/s
of a 2048² float32 matmul, is measured right before and right after each batch: the batch's
ratio is its time over the roofline time of its FLOPs at the better of those two rates. This VM's
matmul rate drifts by ±10% from minute to minute, so each batch is set against the machine as it
was during that batch; the figure reported is the median of the batches' ratios (each batch's is
printed too). llama.cpp runs through llama-cpp-python on the same file, text, ctx and thread
count, asking for logits only on the scored half, as llama-perplexity does.

    python bench/ppl_speed.py [--models smollm2-135m gemma3-270m] [--chunks 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_model(name: str, text: str, chunks: int, threads: int) -> dict:
    from qpsa.eval.perplexity import WINDOW_BATCH, make_windows, ppl_from_nll, window_nlls
    from qpsa.model.load import load_model
    from qpsa.model.transformer import forward_flops

    loaded = load_model(name)
    windows = make_windows(loaded.tokenizer, text, ctx=512, chunks=chunks)
    flops = forward_flops(loaded.config, 512, 512 - 1 - 256)
    window_nlls(loaded.model, windows.tokens[:WINDOW_BATCH], windows.score_from)  # warm-up
    nlls, ratios, rates, seconds = [], [], [], 0.0
    rate = matmul_gflops()
    for first in range(0, chunks, WINDOW_BATCH):
        batch = windows.tokens[first : first + WINDOW_BATCH]
        t = time.perf_counter()
        nlls += window_nlls(loaded.model, batch, windows.score_from)
        dt = time.perf_counter() - t
        after = matmul_gflops()
        best = max(rate, after)
        ratios.append(dt / (len(batch) * flops / (best * 1e9)))
        rates.append(best)
        seconds += dt
        rate = after
    ppl = ppl_from_nll(torch.cat(nlls))[0]
    per_window = seconds / chunks
    out = {"model": name, "ppl": ppl, "chunks": chunks, "qpsa_s_per_window": per_window,
           "gflop_per_window": flops / 1e9, "roofline_gflops": statistics.median(rates),
           "roofline_s_per_window": flops / (statistics.median(rates) * 1e9),
           "batch_ratios": ratios, "ratio_to_roofline": statistics.median(ratios)}
    try:
        from qpsa.reference.llamacpp import LlamaCpp
    except ImportError:
        return out
    try:
        ref = LlamaCpp(loaded.path, ctx=512, threads=threads)
    except Exception as e:  # llama-cpp-python missing or broken: report, don't fail the bench
        out["llamacpp_error"] = str(e)
        return out
    r = ref.perplexity(text, chunks=chunks)
    out |= {"llamacpp_ppl": r.ppl, "llamacpp_s_per_window": r.seconds_per_window,
            "llamacpp_over_qpsa": r.seconds_per_window / per_window}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = TEXT.read_text(encoding="utf-8")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in args.models:
        row = bench_model(name, text, args.chunks, args.threads)
        rows.append(row)
        print(f"\n{name}: PPL {row['ppl']:.4f} over {row['chunks']} windows of 512")
        print(f"  roofline       {row['roofline_gflops']:.1f} GFLOP/s (2048² float32 matmul; median over the batches)")
        print(f"  FLOPs/window   {row['gflop_per_window']:.1f} GFLOP -> roofline {row['roofline_s_per_window']:.3f} s")
        print(f"  q-psa          {row['qpsa_s_per_window']:.3f} s per window (after a warm-up batch)")
        print(f"  x roofline     {row['ratio_to_roofline']:.3f} (median of batches; target <= 1.10); batches: "
              + " ".join(f"{r:.3f}" for r in row["batch_ratios"]))
        if "llamacpp_s_per_window" in row:
            print(f"  llama.cpp      {row['llamacpp_s_per_window']:.3f} s per window, PPL {row['llamacpp_ppl']:.4f}"
                  f" -> q-psa is {row['llamacpp_over_qpsa']:.2f}x as fast (target >= 1)")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
