"""Quantizer speed: q-psa's numpy scale searches against the compiled ones (searches.c), per type, in one run.

On one real weight matrix of a bundled model (dequantized from the file; SmolLM2's
blk.0.ffn_down.weight, 576 × 1536, by default), for every type q-psa quantizes to: ns per weight of
`qpsa.gguf.quants.quantize` with QPSA_KERNEL=0 (numpy) and with the compiled searches, without and
with importance weights (log-normal, one per column, seed 0: an imatrix's spread; the time does not
depend on their values much), the best of --repeats runs each, the ratio, and a check that both
give the same bytes; and ggml's own quantizer on the same input (`ggml_quantize_chunk` in
llama-cpp-python's libggml, one thread; "-" where llama-cpp-python is missing). With --llama, also the whole-model requantization of the bundled model:
`llama-quantize --allow-requantize IN OUT TYPE 1` (one thread) against `q-psa requantize IN --type TYPE`
(one process, as it runs), wall time of each command (best of --repeats, at most 3, interleaved), with
the compiled searches and with QPSA_KERNEL=0.

    python bench/quantize_speed.py [--model smollm2-135m] [--tensor blk.0.ffn_down.weight] [--repeats 3]
                                   [--llama Q4_K_M] [--llama-bin /root/.cache/qpsa/llamacpp-build/bin]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def load_tensor(path: Path, name: str) -> np.ndarray:
    from gguf import GGUFReader

    from qpsa.gguf.quants import dequantize

    for t in GGUFReader(str(path)).tensors:
        if t.name == name:
            shape = tuple(int(d) for d in reversed(t.shape))
            return dequantize(t.data, t.tensor_type, shape).numpy()
    raise SystemExit(f"{path} has no tensor {name}")


def best_of(repeats: int, f) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def time_types(x: np.ndarray, repeats: int) -> None:
    from gguf import GGMLQuantizationType

    from qpsa.gguf.quants import compiled, quantize

    if compiled.library() is None:
        raise SystemExit("the compiled searches are unavailable (no C compiler, or QPSA_KERNEL=0)")
    weights = np.exp(np.random.default_rng(0).normal(0, 2, x.shape[1])).astype(np.float32)
    print(f"{x.shape[0]} × {x.shape[1]} weights; ns per weight, best of {repeats}")
    try:
        from qpsa.reference.llamacpp import ggml_quantize
    except ImportError:
        ggml_quantize = None
    print(f"{'type':6} {'imatrix':8} {'numpy':>8} {'compiled':>9} {'ratio':>7} {'ggml':>7}  same bytes")
    for name in TYPES:
        qtype = GGMLQuantizationType[name]
        for w in (None, weights):
            os.environ["QPSA_KERNEL"] = "0"
            slow, a = best_of(repeats, lambda: quantize(x, qtype, w))  # noqa: B023
            os.environ["QPSA_KERNEL"] = "1"
            fast, b = best_of(repeats, lambda: quantize(x, qtype, w))  # noqa: B023
            per = 1e9 / x.size
            ggml = "-"
            if ggml_quantize is not None:
                ggml = f"{best_of(repeats, lambda: ggml_quantize(x, qtype, w))[0] * per:7.1f}"  # noqa: B023
            print(f"{name:6} {'yes' if w is not None else 'no':8} {slow * per:8.1f} {fast * per:9.1f} {slow / fast:6.1f}x "
                  f"{ggml:>7}  {bool((a == b).all())}")


def time_command(command: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def time_requantize(path: Path, qtype: str, llama_bin: Path, repeats: int) -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.gguf"
        ours_cmd = [sys.executable, "-m", "qpsa", "requantize", str(path), "--type", qtype, "--output", str(out)]
        llama_cmd = [str(llama_bin / "llama-quantize"), "--allow-requantize", str(path), str(out), qtype, "1"]
        llama = ours = numpy = float("inf")
        for _ in range(repeats):  # interleaved, so a change of load hits all three
            llama = min(llama, time_command(llama_cmd, env))
            ours = min(ours, time_command(ours_cmd, env))
            numpy = min(numpy, time_command(ours_cmd, {**env, "QPSA_KERNEL": "0"}))
    print(f"requantize {path.name} to {qtype}, wall seconds, best of {repeats}: llama-quantize (1 thread) {llama:.1f}, "
          f"q-psa compiled {ours:.1f} ({ours / llama:.1f}x llama's), q-psa numpy {numpy:.1f} ({numpy / llama:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tensor", default="blk.0.ffn_down.weight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama", metavar="TYPE", help="also time the whole-model requantization to this type")
    parser.add_argument("--llama-bin", type=Path, default=Path("/root/.cache/qpsa/llamacpp-build/bin"))
    args = parser.parse_args()
    from qpsa.sources.catalog import BUNDLED

    path = BUNDLED[args.model].path()
    time_types(load_tensor(path, args.tensor), args.repeats)
    if args.llama:
        time_requantize(path, args.llama, args.llama_bin, min(args.repeats, 3))


if __name__ == "__main__":
    main()
