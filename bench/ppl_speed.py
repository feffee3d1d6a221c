"""Perplexity speed: q-psa against the float32 roofline and against llama.cpp, measured in one run.

For each model: the roofline is the GFLOP/s of a large float32 matmul measured now; the protocol's
FLOPs per window come from `forward_flops` (weight matmuls and causal attention over ctx tokens,
the output head only on the ctx/2 − 1 scored positions); q-psa's time per window is the mean
over the timed windows, after a warm-up batch (batches of WINDOW_BATCH windows). llama.cpp runs through llama-cpp-python on the same file, text,
ctx and thread count, asking for logits only on the scored half, as llama-perplexity does.

    python bench/ppl_speed.py [--models smollm2-135m gemma3-270m] [--chunks 6] [--threads 2]
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


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_model(name: str, text: str, chunks: int, threads: int) -> dict:
    from qpsa.eval.perplexity import WINDOW_BATCH, make_windows, perplexity
    from qpsa.model.load import load_model
    from qpsa.model.transformer import forward_flops

    loaded = load_model(name)
    windows = make_windows(loaded.tokenizer, text, ctx=512, chunks=chunks)
    perplexity(loaded.model, make_windows(loaded.tokenizer, text, ctx=512, chunks=WINDOW_BATCH))  # warm-up
    gflops_before = matmul_gflops()
    result = perplexity(loaded.model, windows)
    gflops_after = matmul_gflops()
    gflops = max(gflops_before, gflops_after)
    per_window = result.seconds / chunks
    flops = forward_flops(loaded.config, 512, 512 - 1 - 256)
    roofline = flops / (gflops * 1e9)
    out = {"model": name, "ppl": result.ppl, "chunks": chunks, "qpsa_s_per_window": per_window,
           "gflop_per_window": flops / 1e9, "roofline_gflops": gflops,
           "roofline_s_per_window": roofline, "ratio_to_roofline": per_window / roofline}
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
    parser.add_argument("--chunks", type=int, default=8)
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
        print(f"  roofline       {row['roofline_gflops']:.1f} GFLOP/s (2048² float32 matmul, measured now)")
        print(f"  FLOPs/window   {row['gflop_per_window']:.1f} GFLOP -> roofline {row['roofline_s_per_window']:.3f} s")
        print(f"  q-psa          {row['qpsa_s_per_window']:.3f} s per window (after a warm-up batch)"
              f" = {row['ratio_to_roofline']:.2f}x roofline (target <= 1.10)")
        if "llamacpp_s_per_window" in row:
            print(f"  llama.cpp      {row['llamacpp_s_per_window']:.3f} s per window, PPL {row['llamacpp_ppl']:.4f}"
                  f" -> q-psa is {row['llamacpp_over_qpsa']:.2f}x as fast (target >= 1)")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
