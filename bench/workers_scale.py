"""What Ray workers cost and gain, measured in one run: overhead per unit, scheduling latency, and
the speed-up of 2 single-thread workers over one process with 2 threads.

1. Overhead per unit: N units that compute nothing (`qpsa.parallel.units:echo`), run in this
   process and on 2 workers; the difference per unit is what an executor adds to each.
2. Scheduling latency: one such unit sent to one idle worker and its answer awaited, the median
   of 50 round trips (nothing else in flight).
3. Speed-up: `q-psa sensitivity --granularity layer` (or tensor) of the model to Q4_0 on `--chunks`
   windows of `--ctx` tokens: in this process with 2 torch threads, and on 2 workers of 1 thread
   each, the same numbers checked. End to end, the workers' run includes starting them (each
   loads the model and makes its own reference pass); steady state counts only the units' wall
   time. The per-unit seconds it prints are the measured costs docs/benchmarks.md scales up.

    python bench/workers_scale.py [--model smollm2-135m] [--granularity layer] [--ctx 512] [--chunks 1] [--json]

On a machine that other processes share the times swing; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--granularity", default="layer", choices=("layer", "tensor"))
    parser.add_argument("--type", default="Q4_0")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--units", type=int, default=400, help="empty units for the overhead measurement")
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import ray
    from gguf import GGMLQuantizationType

    from qpsa.eval.perplexity import make_windows
    from qpsa.model.load import load_model
    from qpsa.parallel import Job, LocalExecutor
    from qpsa.parallel.ray_workers import RayExecutor
    from qpsa.quant.sensitivity import Reference, quant_groups, run_sensitivity
    from qpsa.sources.catalog import resolve_model
    from qpsa.sources.texts import resolve_text

    qtype = GGMLQuantizationType[args.type]
    path = resolve_model(args.model)
    torch.set_num_threads(2)
    loaded = load_model(str(path))
    text = resolve_text(args.text if Path(args.text).exists() else None, None)
    windows = make_windows(loaded.tokenizer, text.text, args.ctx, args.chunks, None, loaded.config.context_length)
    groups = quant_groups(loaded, args.granularity)

    # ---- one process, 2 threads
    t = time.perf_counter()
    ref = Reference(loaded.model, windows)
    t_ref = time.perf_counter() - t
    local = LocalExecutor(loaded)
    t = time.perf_counter()
    one = run_sensitivity(loaded, ref, qtype, groups, executor=local)
    t_units_local = time.perf_counter() - t
    t_local = t_ref + t_units_local

    # ---- 2 workers, 1 thread each
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             configure_logging=False)
    try:
        t = time.perf_counter()
        workers = RayExecutor(path, loaded.file.sha256, 2, threads=1)
        t_start = time.perf_counter() - t
        t = time.perf_counter()
        two = run_sensitivity(loaded, ref, qtype, groups, executor=workers)
        t_units_ray = time.perf_counter() - t  # includes each worker's own reference pass (setup)
        ray_units = workers.describe()["units"]
        same = [r.stats for r in one.rows] == [r.stats for r in two.rows]

        # ---- overhead per unit and latency: units that compute nothing
        empty = Job("qpsa.parallel.units:no_setup", "qpsa.parallel.units:echo", None)
        units = {str(k): k for k in range(args.units)}
        workers.run(empty, {"warm": 0}, lambda k, r: None)
        t = time.perf_counter()
        workers.run(empty, units, lambda k, r: None)
        per_unit_ray = (time.perf_counter() - t) / args.units
        t = time.perf_counter()
        LocalExecutor().run(empty, units, lambda k, r: None)
        per_unit_local = (time.perf_counter() - t) / args.units
        shipped = ray.put(empty)
        actor = workers.actors[0]
        trips = []
        for _ in range(50):
            t = time.perf_counter()
            ray.get(actor.run.remote(shipped, 0))
            trips.append(time.perf_counter() - t)
        workers.close()
    finally:
        ray.shutdown()

    local_unit = [r.seconds for r in one.rows]
    ray_unit = [u["seconds"] for u in ray_units.values()]
    out = {
        "model": loaded.describe()["name"] if "name" in loaded.describe() else str(path.name),
        "granularity": args.granularity, "type": args.type, "ctx": args.ctx, "chunks": args.chunks,
        "units": len(groups), "same_numbers": same, "ray_version": ray.__version__,
        "local_2_threads": {"reference_seconds": t_ref, "units_seconds": t_units_local, "total_seconds": t_local,
                            "median_unit_seconds": statistics.median(local_unit)},
        "ray_2x1_thread": {"start_seconds": t_start, "units_seconds": t_units_ray, "total_seconds": t_start + t_units_ray,
                           "median_unit_seconds": statistics.median(ray_unit)},
        "speedup_end_to_end": t_local / (t_start + t_units_ray),
        "speedup_units": t_units_local / t_units_ray,
        "one_thread_unit_over_two_thread_unit": statistics.median(ray_unit) / statistics.median(local_unit),
        "overhead_per_unit_seconds": per_unit_ray - per_unit_local,
        "scheduling_latency_seconds": statistics.median(trips),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    lo, ra = out["local_2_threads"], out["ray_2x1_thread"]
    print(f"{out['model']}: sensitivity to {args.type} by {args.granularity}, {len(groups)} units, "
          f"{args.chunks}×{args.ctx} tokens; same numbers: {same}")
    print(f"  one process, 2 threads : reference {lo['reference_seconds']:.2f} s + units {lo['units_seconds']:.2f} s "
          f"= {lo['total_seconds']:.2f} s (median unit {lo['median_unit_seconds']:.3f} s)")
    print(f"  2 workers × 1 thread   : start {ra['start_seconds']:.2f} s + units (each worker's reference pass "
          f"included) {ra['units_seconds']:.2f} s = {ra['total_seconds']:.2f} s (median unit {ra['median_unit_seconds']:.3f} s)")
    print(f"  speed-up end to end {out['speedup_end_to_end']:.2f}×, units only {out['speedup_units']:.2f}×; "
          f"a 1-thread unit takes {out['one_thread_unit_over_two_thread_unit']:.2f}× a 2-thread one")
    print(f"  overhead per unit {1e3 * out['overhead_per_unit_seconds']:.2f} ms "
          f"({args.units} empty units), scheduling latency {1e3 * out['scheduling_latency_seconds']:.2f} ms (median round trip)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
