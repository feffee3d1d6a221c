"""Cost of the layer-ablation baseline, in forward-pass equivalents, measured in one run.

One equivalent is one full forward over the evaluation tokens (embedding, every layer, the output
head on the scored positions, the NLL), the median of 3 timed here. The ablation of all L layers
is timed from scratch: the forward that caches the hidden states entering each layer, then the
staggered batch of L ablations (ablation i re-runs layers i+1 … L−1 from states[i], so the layer
work is L(L−1)/2 layer passes, plus one output head per ablation). Target: ≤ 0.6·L + 2.

    python bench/ablation_cost.py [--model smollm2-135m] [--max-tokens 500] [--threads N]

Run it on a quiet machine: when other processes share the cores, the forward's time swings by 2–3×
between the measurements before and after (both are printed; trust the result only when they agree).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from qpsa.model.load import load_model
    from qpsa.scores.base import ScoreSettings, eval_tokens, token_nll
    from qpsa.scores.baselines import clear_cache, head_units, layer_ablation, layer_states
    from qpsa.sources.texts import text_from_file

    loaded = load_model(args.model)
    tokens = eval_tokens(loaded, text_from_file(args.text), args.max_tokens)
    model, ids, L = loaded.model, tokens.tokens, loaded.config.n_layer

    def forward() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            h = model.run_layers(model.embed(ids), range(L), torch.arange(ids.shape[1]))
            token_nll(model, h, ids)
        return time.perf_counter() - start, time.process_time() - cpu

    def median3() -> tuple[float, float]:
        runs = [forward() for _ in range(3)]
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    forward()  # warm-up (rope tables, allocator)
    fwd, fwd_cpu = median3()

    clear_cache()
    start, cpu = time.perf_counter(), time.process_time()
    layer_states(loaded, tokens)
    states_s = time.perf_counter() - start
    scores = layer_ablation(loaded, tokens, ScoreSettings(max_tokens=args.max_tokens))
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    fwd_after, fwd_cpu_after = median3()  # the machine may have changed speed
    fwd_ref, fwd_cpu_ref = (fwd + fwd_after) / 2, (fwd_cpu + fwd_cpu_after) / 2

    # CPU time (all threads of this process) is the steadier measure on a shared machine: wall
    # time swings with whatever else runs, and not by the same factor for B = 1 and B = 4
    equivalents = total / fwd_ref
    cpu_equivalents = total_cpu / fwd_cpu_ref
    target = 0.6 * L + 2
    head = head_units(loaded.config, ids.shape[1])
    flop_equivalents = (L + L * (L - 1) / 2 + L * head) / (L + head)  # same cost model, in layer units
    result = {
        "model": args.model, "n_layer": L, "tokens": int(ids.shape[1]), "threads": torch.get_num_threads(),
        "forward_s": fwd, "forward_after_s": fwd_after, "states_s": states_s,
        "ablations_s": scores.seconds, "total_s": total, "batch": scores.details["batch"],
        "equivalents": equivalents, "cpu_equivalents": cpu_equivalents, "target": target,
        "ratio": equivalents / target, "cpu_ratio": cpu_equivalents / target,
        "flop_model_equivalents": flop_equivalents,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}: {L} layers, {ids.shape[1]} tokens, {torch.get_num_threads()} threads")
    print(f"one forward          {fwd:8.3f} s  (median of 3; {fwd_after:.3f} s after the ablations; "
          f"CPU {fwd_cpu:.3f} / {fwd_cpu_after:.3f} s)")
    print(f"states (1 forward)   {states_s:8.3f} s")
    print(f"{L} ablations         {scores.seconds:8.3f} s  (batches of up to {scores.details['batch']})")
    print(f"total                {total:8.3f} s  = {equivalents:.2f} forward equivalents in wall time, "
          f"{cpu_equivalents:.2f} in CPU time (cost model: {flop_equivalents:.2f})")
    print(f"target 0.6·L + 2     {target:8.2f}     ratio {equivalents / target:.2f} wall, "
          f"{cpu_equivalents / target:.2f} CPU ({'met' if max(equivalents, cpu_equivalents) <= target else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
