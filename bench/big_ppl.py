"""Perplexity on a large (synthetic) model on this machine: q-psa's peak memory and speed against
llama.cpp's on the same file, windows and threads (issue 14's CPU target).

Each engine runs in its own child process, so its peak resident memory (ru_maxrss, which counts the
file's mapped pages it touched) is its own. q-psa reports where its time went: dequantizing layers
(WeightStore.dequantize_seconds) and the rest of the forward (matmuls, attention, head).

    python bench/synth_gguf.py llama3-8b --type Q4_0
    python bench/big_ppl.py /root/.cache/qpsa/synth/llama3-8b-Q4_0.gguf --chunks 2 --max-memory 3G
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

QPSA = """
import json, sys, time, torch
sys.path.insert(0, {src!r})
from qpsa.eval.perplexity import make_windows, perplexity
from qpsa.model.device import parse_size
from qpsa.model.load import load_model
torch.set_num_threads({threads})
t = time.perf_counter()
m = load_model({path!r}, max_memory=parse_size({max_memory!r}) if {max_memory!r} else None)
load = time.perf_counter() - t
w = make_windows(m.tokenizer, open({text!r}).read()[:400000], ctx={ctx}, chunks={chunks})
r = perplexity(m.model, w)
s = m.model.weights
print(json.dumps({{"ppl": r.ppl, "seconds_per_window": r.seconds_per_window, "load_seconds": load,
                  "dequantize_seconds": s.dequantize_seconds, "units_dequantized": s.dequantized,
                  "forward_seconds": r.seconds, "memory": m.memory.to_dict()}}))
"""

LLAMA = """
import json, sys
sys.path.insert(0, {src!r})
from qpsa.reference.llamacpp import LlamaCpp
r = LlamaCpp({path!r}, ctx={ctx}, threads={threads}).perplexity(open({text!r}).read()[:400000], chunks={chunks})
print(json.dumps({{"ppl": r.ppl, "seconds_per_window": r.seconds_per_window}}))
"""


def child(code: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_gib"] = peak / 2**20 if peak > before else None  # None: an earlier child peaked higher
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--skip-llamacpp", action="store_true")
    args = parser.parse_args(argv)
    params = dict(src=str(ROOT / "src"), path=args.path, threads=args.threads, ctx=args.ctx, chunks=args.chunks,
                  text=str(TEXT), max_memory=args.max_memory)
    size = Path(args.path).stat().st_size
    report = {"file": args.path, "file_gib": size / 2**30, "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
              "threads": args.threads, "ctx": args.ctx, "chunks": args.chunks}
    report["qpsa"] = child(QPSA.format(**params))  # first: its peak is its own
    if not args.skip_llamacpp:
        report["llamacpp"] = child(LLAMA.format(**params))
        report["ppl_ratio"] = report["qpsa"]["ppl"] / report["llamacpp"]["ppl"]
        report["speed_ratio"] = report["qpsa"]["seconds_per_window"] / report["llamacpp"]["seconds_per_window"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
