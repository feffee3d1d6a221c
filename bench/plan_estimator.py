"""What `plan --estimator` saves, measured in one run: the same plan made twice from cold processes,
once measuring every option and once predicting them and measuring only what the choice rests on.

Both runs get the same model, text, imatrix, budget, candidate types and windows; each is a fresh
`q-psa plan` process (no shared cache). Printed: wall seconds of each, options measured, forward
passes counted from FLOPs (the estimator's gradients included), the held-out KLD of the plan each
chose, and the ratios. The held-out KLDs should agree within their standard errors; the plan is
checked by measurement in both.

    python bench/plan_estimator.py [--model smollm2-135m] [--preset Q3_K_M] [--estimator fisher_kl_diag]
        [--imatrix FILE] [--chunks 1] [--granularity layer] [--out DIR] [--json]

Without --imatrix one is computed first (8 windows of the text), outside the timed runs.
On a machine other processes share the wall times swing; the counted passes do not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


def q_psa(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "qpsa", *map(str, args), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"q-psa {' '.join(map(str, args[:2]))} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="Q3_K_M", help="the budget: this llama-quantize preset's size")
    parser.add_argument("--estimator", default="fisher_kl_diag")
    parser.add_argument("--imatrix", default=None)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--granularity", default="layer", choices=("layer", "tensor"))
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--out", default=None, help="folder for both runs (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="plan-estimator-"))
    out.mkdir(parents=True, exist_ok=True)
    imatrix = args.imatrix
    if imatrix is None:
        imatrix = out / "imatrix.gguf"
        q_psa("imatrix", args.model, "--text", args.text, "--chunks", 8, "--output", imatrix)
    common = [args.model, "--target-preset", args.preset, "--imatrix", imatrix, "--text", args.text,
              "--chunks", args.chunks, "--granularity", args.granularity, "--types", *TYPES]
    runs = {}
    for mode, extra in (("full", []), ("estimator", ["--estimator", args.estimator])):
        start = time.perf_counter()
        plan = q_psa("plan", *common, "--out", out / mode, *extra)
        runs[mode] = {"seconds": time.perf_counter() - start, "plan": plan}
    full, est = runs["full"]["plan"], runs["estimator"]["plan"]
    n_options = sum(len(g["options"]) - 1 for g in full["groups"])
    measured = est["estimator"]["measured"]
    rows = {
        "full": {"seconds": runs["full"]["seconds"], "measured": n_options, "options": n_options,
                 "kld": full["plan"]["kld"], "kld_se": full["plan"]["kld_se"], "bpw": full["plan"]["bits_per_weight"]},
        "estimator": {"seconds": runs["estimator"]["seconds"], "measured": measured, "options": n_options,
                      "kld": est["plan"]["kld"], "kld_se": est["plan"]["kld_se"], "bpw": est["plan"]["bits_per_weight"],
                      "predict_seconds": est["estimator"]["predict_seconds"],
                      "predictor_cost": est["estimator"]["predictor_cost"]},
    }
    result = {"model": args.model, "preset": args.preset, "estimator": args.estimator, "chunks": args.chunks,
              "granularity": args.granularity, "runs": rows,
              "wall_ratio": rows["full"]["seconds"] / rows["estimator"]["seconds"],
              "measured_ratio": n_options / max(measured, 1),
              "same_plan": full["tensor_types"] == est["tensor_types"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}, budget {args.preset}, {args.granularity}, {args.chunks} window(s); estimator {args.estimator}")
    print(f"{'run':<10} {'wall s':>8} {'measured':>10} {'held-out KLD ± se':>20} {'bpw':>7}")
    for mode, r in rows.items():
        print(f"{mode:<10} {r['seconds']:>8.1f} {r['measured']:>4} / {r['options']:<4} "
              f"{r['kld']:>10.4f} ± {r['kld_se']:.4f} {r['bpw']:>7.3f}")
    print(f"wall time: {result['wall_ratio']:.2f}x faster with the estimator; "
          f"{result['measured_ratio']:.2f}x fewer options measured; same plan: {result['same_plan']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
