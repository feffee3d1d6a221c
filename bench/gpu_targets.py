"""Issue 14's GPU targets, measured in one run on one CUDA GPU (figures go to docs/benchmarks.md).

1. ppl on the Llama-3-8B shape: seconds per 512-token window, against the roofline time of the
   window's FLOPs (`forward_flops`) at the rate of a large matmul of the same dtype measured in the
   same run (target ≤ 1.5×), and against transformers on the same GGUF on the same GPU (target ≥ 2×
   faster; transformers dequantizes the GGUF to a float checkpoint at load).
2. The original study's full Q-PSA protocol on the Qwen2.5-0.5B shape: N = 100 per matrix, every
   layer, 500 tokens (`q-psa score --samples-per-matrix 100 --max-tokens 500`; target < 2 minutes).
3. Layer ablation of all 32 layers of the 8B shape (`q-psa baseline --methods layer_ablation`;
   target < 1 minute).

    python bench/synth_gguf.py llama3-8b --type Q4_0 && python bench/synth_gguf.py qwen2.5-0.5b --type Q4_0
    python bench/gpu_targets.py [--dtype bfloat16] [--chunks 8] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
SYNTH = Path("/root/.cache/qpsa/synth")


def matmul_tflops(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def qpsa_ppl(path: Path, dtype: torch.dtype, chunks: int, ctx: int) -> dict:
    from qpsa.eval.perplexity import make_windows, perplexity
    from qpsa.model.load import load_model
    from qpsa.model.transformer import forward_flops

    start = time.perf_counter()
    loaded = load_model(str(path), dtype=dtype, device="cuda", ctx=ctx)
    load = time.perf_counter() - start
    windows = make_windows(loaded.tokenizer, TEXT.read_text()[:600000], ctx=ctx, chunks=chunks + 4)
    perplexity(loaded.model, dataclasses.replace(windows, tokens=windows.tokens[:4]))  # warm-up
    torch.cuda.synchronize()
    timed = dataclasses.replace(windows, tokens=windows.tokens[4:])
    start = time.perf_counter()
    result = perplexity(loaded.model, timed)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / chunks
    flops = forward_flops(loaded.config, ctx, ctx // 2 - 1)
    return {"ppl": result.ppl, "seconds_per_window": seconds, "load_seconds": load, "flops_per_window": flops,
            "memory": loaded.memory.to_dict(), "tokens": timed.tokens}


def transformers_ppl(path: Path, dtype: torch.dtype, tokens: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=dtype).to("cuda")
    load = time.perf_counter() - start
    model.eval()
    ctx = tokens.shape[1]
    nll = []
    with torch.inference_mode():
        model(tokens[:1].cuda())  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for w in tokens:
            logits = model(w[None].cuda()).logits[0, ctx // 2 : -1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, w[ctx // 2 + 1 :].cuda(), reduction="none"))
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / len(tokens)
    import math

    return {"ppl": math.exp(float(torch.cat(nll).mean())), "seconds_per_window": seconds, "load_seconds": load}


def cli_seconds(*args) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "qpsa", *map(str, args)], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    return {"seconds": time.perf_counter() - start, "exit": out.returncode, "stderr_tail": out.stderr[-500:]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--big", default=str(SYNTH / "llama3-8b-Q4_0.gguf"))
    parser.add_argument("--small", default=str(SYNTH / "qwen2.5-0.5b-Q4_0.gguf"))
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--only", nargs="*", default=["ppl", "qpsa", "ablation"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: these targets are measured on a GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype}
    if "ppl" in args.only:
        before = matmul_tflops(dtype)
        ours = qpsa_ppl(Path(args.big), dtype, args.chunks, args.ctx)
        after = matmul_tflops(dtype)
        rate = max(before, after) * 1e12
        tokens = ours.pop("tokens")
        ours["roofline_seconds"] = ours["flops_per_window"] / rate
        ours["roofline_ratio"] = ours["seconds_per_window"] / ours["roofline_seconds"]
        report["matmul_tflops"] = [before, after]
        report["ppl_8b"] = ours
        if not args.skip_transformers:
            torch.cuda.empty_cache()
            theirs = transformers_ppl(Path(args.big), dtype, tokens)
            report["transformers_8b"] = theirs
            report["speedup_vs_transformers"] = theirs["seconds_per_window"] / ours["seconds_per_window"]
    if "qpsa" in args.only:
        report["qpsa_full_protocol_0.5b"] = cli_seconds(
            "score", args.small, "--samples-per-matrix", 100, "--max-tokens", 500, "--text", TEXT,
            "--device", "cuda", "--out", "/tmp/gpu-qpsa-0.5b.json")
    if "ablation" in args.only:
        report["ablation_8b"] = cli_seconds(
            "baseline", args.big, "--methods", "layer_ablation", "--text", TEXT, "--device", "cuda",
            "--dtype", args.dtype, "--out", "/tmp/gpu-ablation-8b.json")
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
