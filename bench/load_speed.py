"""Model load time: q-psa (first load with an empty cache, then warm) against transformers' GGUF loader.

transformers: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` plus
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` on the same file, float32. q-psa:
`load_model(path)` (validation, dequantization, tokenizer) with a fresh cache folder (first load,
which builds and caches the tokenizer) and again with that cache (warm). All in one run.

    python bench/load_speed.py [--models smollm2-135m gemma3-270m]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time


def time_transformers(path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    seconds = time.perf_counter() - t
    del model
    gc.collect()
    return seconds


def time_qpsa(path) -> float:
    from qpsa.model.load import load_model

    t = time.perf_counter()
    loaded = load_model(str(path))
    seconds = time.perf_counter() - t
    del loaded
    gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    args = parser.parse_args()
    from qpsa.sources.catalog import resolve_model

    for name in args.models:
        path = resolve_model(name)
        with tempfile.TemporaryDirectory() as cache:
            os.environ["QPSA_CACHE"] = cache
            first = time_qpsa(path)
            warm = min(time_qpsa(path) for _ in range(2))
        hf = time_transformers(path)
        print(f"{name}: transformers {hf:.1f} s | q-psa first load {first:.1f} s ({hf / first:.1f}x faster) | "
              f"warm {warm:.2f} s ({hf / warm:.1f}x faster; target >= 5x)", flush=True)


if __name__ == "__main__":
    main()
