"""What Q-PSA costs, in full-forward equivalents, and whether the cheap probe ranks layers like the exact estimator.

The unit is one full float32 forward over the evaluation tokens (embedding, every layer, output
head and NLL; batch 1), median of 3. As the machine may be shared, the unit is measured again
around every phase and each phase is divided by the mean of the units that bracket it.

(a) exact estimator, float32 and float64: seconds per evaluated direction (one perturbed model,
    + or −) on layers spread over depth, in forward equivalents, averaged over those layers
    (target ≤ 0.7 for float32); the float32−float64 difference of the same samples' values is
    float32's noise floor.
(b) probe estimator, float32, N=100 per matrix, with the default probes (layer scope, K=12 per
    layer; `--probe-scope matrix --probes K` for per-matrix probes): total forward equivalents for every
    layer (target ≤ 600; the original per-sample protocol costs 30×7×100×2 = 42,000). By default
    measured on the same spread layers and extrapolated to all layers with a per-layer cost
    a + b·(L−i)/L fitted to them (`--probe-layers all` measures every layer: ~15 minutes more).
(c) agreement: Spearman ρ (p-value, and a bootstrap 95% interval over the matrices' samples) between
    the probe's layer scores and the exact float64 estimator's on the spread layers (N per matrix
    as large as the time allows; the exact samples are the first N units of the probe's first
    probe), plus the same at the level of the (layer, matrix) pairs for matrix-scope probes, and the
    probe's own split-half reliability (ρ between the layer scores of its first and second half of
    probes, each half an independent estimate). `--probe-results FILE` takes
    the probe values from a `q-psa score --estimator probe` results file with the same settings
    (identical numbers, same seeds) and skips (b).

    python bench/qpsa_cost.py [--model smollm2-135m] [--layers 6] [--exact-n 4] [--probe-layers spread|all]
                              [--probe-scope layer|matrix] [--probes K]
                              [--probe-results FILE] [--json-out FILE]

Runs in ~12 minutes on 2 idle cores with the defaults (a machine shared with another job can make
it several times slower; the equivalents stay comparable as the unit is re-measured).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def spread(n_layer: int, k: int) -> list[int]:
    return sorted({round(i * (n_layer - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


class Units:
    """Full float32 forwards (median of 3), measured whenever asked; phases use the mean around them."""

    def __init__(self, model, tokens):
        from qpsa.scores.qpsa.evaluate import Evaluator

        self.model, self.tokens, self.seen = model, tokens, []
        Evaluator(model, tokens, 1)  # warm-up

    def measure(self) -> float:
        from qpsa.scores.base import LayerStates
        from qpsa.scores.qpsa.evaluate import chunked_nll

        times = []
        for _ in range(3):
            t = time.perf_counter()
            st = LayerStates(self.model, self.tokens)
            with torch.inference_mode():
                chunked_nll(self.model, st.states[-1], self.tokens)
            times.append(time.perf_counter() - t)
        self.seen.append(statistics.median(times))
        return self.seen[-1]


def run_units(ev, file, settings, layers, log) -> dict:
    """Per layer: the raw results of every unit (matrices, or the layer for layer-scope probes),
    seconds and directions."""
    from qpsa.scores.qpsa.moves import plan_unit
    from qpsa.scores.qpsa.summary import evaluate_plan

    out = {}
    for i in layers:
        t = time.perf_counter()
        raws = {m: evaluate_plan(ev, plan_unit(file, settings, i, m)) for m in settings.units_of_layer}
        sec = time.perf_counter() - t
        dirs = sum(r["n_directions"] for r in raws.values())
        out[i] = {"raws": raws, "seconds": sec, "directions": dirs}
        log(f"  layer {i:2d}: {dirs} directions in {sec:.1f} s ({sec / dirs:.3f} s each)")
    return out


def fit_total(per_layer_seconds: dict[int, float], n_layer: int) -> float:
    """Σ over all layers of a + b·(L−i)/L, fitted by least squares to the measured layers."""
    xs = np.array([(n_layer - i) / n_layer for i in per_layer_seconds])
    ys = np.array(list(per_layer_seconds.values()))
    if len(xs) < 2:
        return float(ys.mean() * n_layer)
    b, a = np.polyfit(xs, ys, 1)
    return float(sum(a + b * (n_layer - i) / n_layer for i in range(n_layer)))


def probe_from_results(path: str, args, layers: list[int]) -> dict:
    """The raw per-matrix probe results of `layers` from a `q-psa score --estimator probe` results file."""
    d = json.loads(Path(path).read_text())["methods"]["qpsa"]["details"]
    want = {"estimator": "probe", "samples_per_matrix": args.probe_n, "probes": args.settings.probes,
            "probe_scope": args.settings.probe_scope, "precision": "float32", "max_tokens": args.tokens}
    for k, v in want.items():
        if d.get(k) != v:
            raise SystemExit(f"{path}: {k} is {d.get(k)!r}, this bench needs {v!r}")
    return {i: {"raws": {m: {**d["samples"][str(i)][m], "matrix": m} for m in args.settings.units_of_layer},
                "seconds": math.nan}
            for i in layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--layers", type=int, default=6, help="layers spread over depth for (a) and (c)")
    ap.add_argument("--exact-n", type=int, default=4, help="samples per matrix of the exact float64 run (c)")
    ap.add_argument("--f32-n", type=int, default=1, help="samples per matrix of the exact float32 run (a)")
    ap.add_argument("--probe-n", type=int, default=100)
    ap.add_argument("--probes", type=int, default=None, help="default: the estimator's (12 per layer, 2 per matrix)")
    ap.add_argument("--probe-scope", choices=("layer", "matrix"), default="layer")
    ap.add_argument("--probe-layers", choices=("spread", "all"), default="spread")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--probe-results", default=None,
                    help="take the probe values for (c) from this `q-psa score --estimator probe` results file "
                         "(same seed and settings) instead of computing them; skips (b)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    from qpsa.scores.qpsa.settings import QpsaSettings

    args.settings = QpsaSettings(samples_per_matrix=args.probe_n, estimator="probe", probes=args.probes,
                                 probe_scope=args.probe_scope, precision="float32", batch_size=args.batch_size,
                                 max_tokens=args.tokens)
    args.probes = args.settings.probes

    from scipy.stats import spearmanr

    from qpsa.model.load import load_model
    from qpsa.model.transformer import Transformer
    from qpsa.scores.base import eval_tokens
    from qpsa.scores.qpsa.evaluate import Evaluator
    from qpsa.scores.qpsa.run import deterministic
    from qpsa.scores.qpsa.settings import MATRICES, QpsaSettings
    from qpsa.scores.qpsa.summary import layer_summary, matrix_summary, sample_values
    from qpsa.sources.texts import text_from_file

    def log(line):
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    L = loaded.config.n_layer
    tokens = eval_tokens(loaded, text_from_file(TEXT), args.tokens)
    layers = spread(L, args.layers)
    model32 = loaded.model
    units = Units(model32, tokens.tokens)
    report: dict = {"model": args.model, "n_layer": L, "tokens": args.tokens, "threads": torch.get_num_threads(),
                    "layers": layers, "batch_size": args.batch_size}
    with deterministic():
        u0 = units.measure()
        log(f"unit: one full float32 forward over {args.tokens} tokens = {u0:.3f} s (median of 3)")

        # (a) exact float32
        s32 = QpsaSettings(samples_per_matrix=args.f32_n, precision="float32", batch_size=args.batch_size)
        log(f"(a) exact float32, N={args.f32_n}/matrix, layers {layers}")
        ev32 = Evaluator(model32, tokens.tokens, args.batch_size)
        ex32 = run_units(ev32, loaded.file, s32, layers, log)
        u1 = units.measure()
        unit_a = (u0 + u1) / 2
        eq32 = {i: r["seconds"] / r["directions"] / unit_a for i, r in ex32.items()}

        # (a) exact float64 and (c)'s exact reference
        weights = {k: v for k, v in model32.weights.items() if "_qkv." not in k and "_gate_up." not in k
                   and not (k == "output.weight" and v is model32.weights.get("token_embd.weight"))}
        model64 = Transformer(loaded.config, weights, dtype=torch.float64)
        s64 = QpsaSettings(samples_per_matrix=args.exact_n, precision="float64", batch_size=args.batch_size)
        log(f"(a, c) exact float64, N={args.exact_n}/matrix, layers {layers}")
        ev64 = Evaluator(model64, tokens.tokens, args.batch_size)
        ex64 = run_units(ev64, loaded.file, s64, layers, log)
        del model64, ev64
        u2 = units.measure()
        unit_b = (u1 + u2) / 2
        eq64 = {i: r["seconds"] / r["directions"] / unit_b for i, r in ex64.items()}

        # float32 vs float64 on the same samples (the first f32_n of each matrix)
        diffs, v64s = [], []
        for i in layers:
            for m in MATRICES:
                a = sample_values(ex32[i]["raws"][m], ev32.base_ppl, "exact")["value"]
                b = sample_values(ex64[i]["raws"][m], math.exp(float(ev32.base_nll.mean())), "exact")["value"]
                n = min(len(a), len(b), args.f32_n)
                diffs += (a[:n] - b[:n]).tolist()
                v64s += b[:n].tolist()
        diffs, v64s = np.array(diffs), np.array(v64s)
        floor32 = float(np.sqrt((diffs**2).mean()))

        # (b) probe
        probe_layers = list(range(L)) if args.probe_layers == "all" else layers
        sp = args.settings
        probe_dirs = L * len(sp.units_of_layer) * 2 * args.probes
        if args.probe_results:  # a `q-psa score --estimator probe` results file: same seeds, same numbers
            pr = probe_from_results(args.probe_results, args, layers)
            probe_eq, probe_total = {i: math.nan for i in layers}, math.nan
            log(f"(b) skipped: probe results of layers {layers} taken from {args.probe_results}")
        else:
            log(f"(b) probe float32, N={args.probe_n}/matrix, K={args.probes} per {sp.probe_scope}, "
                f"layers {probe_layers}")
            pr = run_units(ev32, loaded.file, sp, probe_layers, log)
            u3 = units.measure()
            unit_c = (u2 + u3) / 2
            probe_eq = {i: r["seconds"] / unit_c for i, r in pr.items()}
            probe_total = sum(probe_eq.values()) if args.probe_layers == "all" else fit_total(probe_eq, L)

    # (c) agreement
    base32 = ev32.base_ppl
    base64 = math.exp(float(ev32.base_nll.mean()))
    punits = sp.units_of_layer
    exact_scores, probe_scores, exact_pm, probe_pm, halves = [], [], [], [], ([], [])
    per_layer = {}

    def half(raw: dict, which: int) -> dict:
        k = len(raw["dnll_plus"]) // 2
        cut = slice(0, k) if which == 0 else slice(k, None)
        return {**raw, "dnll_plus": raw["dnll_plus"][cut], "dnll_minus": raw["dnll_minus"][cut]}

    for i in layers:
        em = {m: matrix_summary(ex64[i]["raws"][m], base64, "exact", None) for m in MATRICES}
        pm = {m: matrix_summary(pr[i]["raws"][m], base32, "probe", None) for m in punits}
        el, pl = layer_summary(em), layer_summary(pm)
        for h in (0, 1):
            halves[h].append(layer_summary({m: matrix_summary(half(pr[i]["raws"][m], h), base32, "probe", None)
                                            for m in punits})["score"])
        exact_scores.append(el["score"])
        probe_scores.append(pl["score"])
        if not sp.layer_probes:
            exact_pm += [em[m]["mean"] for m in MATRICES]
            probe_pm += [pm[m]["mean"] for m in MATRICES]
        per_layer[i] = {"exact": el["score"], "exact_se": el["se"], "probe": pl["score"], "probe_se": pl["se"],
                        "exact_matrices": {m: em[m]["mean"] for m in MATRICES},
                        "probe_units": {m: pm[m]["mean"] for m in punits},
                        "probe_first_order_rms": pl["first_order"],
                        "exact_eq_per_direction_f32": eq32[i], "exact_eq_per_direction_f64": eq64[i],
                        "probe_eq": probe_eq[i]}
    rho, p = spearmanr(exact_scores, probe_scores)
    rho_m, p_m = spearmanr(exact_pm, probe_pm) if exact_pm else (math.nan, math.nan)
    rho_half, p_half = spearmanr(*halves)
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(2000):  # resample each matrix's exact samples and each unit's probes
        es, ps = [], []
        for i in layers:
            e_means = []
            for m in MATRICES:
                ve = sample_values(ex64[i]["raws"][m], base64, "exact")["value"]
                e_means.append(rng.choice(ve, len(ve)).mean())
            p_means = []
            for m in punits:
                vp = sample_values(pr[i]["raws"][m], base32, "probe")["value"]
                p_means.append(rng.choice(vp, len(vp)).mean())
            es.append(np.mean(e_means))
            ps.append(np.mean(p_means))
        r = spearmanr(es, ps)[0]
        if not math.isnan(r):
            boot.append(r)
    ci = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if boot else (math.nan, math.nan)

    fit32 = fit_total({i: eq32[i] for i in layers}, L) / L  # all-layer mean per direction
    fit64 = fit_total({i: eq64[i] for i in layers}, L) / L
    report.update({
        "unit_seconds": units.seen,
        "exact_float32_eq_per_direction_mean_measured": float(np.mean(list(eq32.values()))),
        "exact_float32_eq_per_direction_all_layers_fit": fit32,
        "exact_float64_eq_per_direction_mean_measured": float(np.mean(list(eq64.values()))),
        "exact_float64_eq_per_direction_all_layers_fit": fit64,
        "float32_floor_rms": floor32, "float32_floor_max": float(np.abs(diffs).max()),
        "float64_values_median_abs": float(np.median(np.abs(v64s))),
        "float32_fraction_of_samples_with_error_above_value": float((np.abs(diffs) > np.abs(v64s)).mean()),
        "probe_scope": sp.probe_scope, "probes": sp.probes, "probe_total_eq": probe_total, "probe_measured_layers": probe_layers, "probe_directions_all_layers": probe_dirs,
        "probe_eq_per_direction": probe_total / probe_dirs, "probe_results": args.probe_results,
        "original_protocol_eq": L * len(MATRICES) * 100 * 2,
        "spearman_layers": float(rho), "spearman_layers_p": float(p), "spearman_layers_bootstrap_95": ci,
        "spearman_matrices": float(rho_m), "spearman_matrices_p": float(p_m),
        "probe_split_half_spearman": float(rho_half), "probe_split_half_p": float(p_half),
        "per_layer": per_layer, "seconds": time.perf_counter() - start,
    })
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))

    print(f"\nQ-PSA cost on {args.model} ({L} layers), {args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}")
    print(f"unit (one full float32 forward): {', '.join(f'{u:.3f}' for u in units.seen)} s at the phase boundaries")
    print(f"(a) exact, per evaluated direction: float32 {report['exact_float32_eq_per_direction_mean_measured']:.3f} "
          f"equivalents on layers {layers} (all-layer fit {fit32:.3f}; target ≤ 0.7); float64 "
          f"{report['exact_float64_eq_per_direction_mean_measured']:.3f} (fit {fit64:.3f})")
    print(f"    float32 noise floor (RMS of float32 − float64 values, {len(diffs)} samples): {floor32:.2e} ΔPPL; "
          f"median |float64 value| {report['float64_values_median_abs']:.2e}; float32 error > value in "
          f"{report['float32_fraction_of_samples_with_error_above_value']:.0%} of samples")
    how = "measured" if args.probe_layers == "all" else f"extrapolated from layers {probe_layers}"
    if args.probe_results:
        print(f"(b) not measured: probe values from {args.probe_results}")
    else:
        print(f"(b) probe N={args.probe_n}, K={args.probes} per {sp.probe_scope}, every layer: {probe_total:.0f} "
              f"equivalents ({how}; "
              f"{probe_dirs} directions, {probe_total / probe_dirs:.3f} each; target ≤ 600; original protocol "
              f"{report['original_protocol_eq']:,})")
    print(f"(c) Spearman ρ probe vs exact float64 (N={args.exact_n}) over layers {layers}: {rho:.3f} (p {p:.3g}, "
          f"bootstrap 95% [{ci[0]:.2f}, {ci[1]:.2f}])"
          + (f"; over the {len(exact_pm)} (layer, matrix) means: {rho_m:.3f} (p {p_m:.3g})" if exact_pm else ""))
    print(f"    probe split-half reliability (first vs second half of the probes): ρ = {rho_half:.3f} (p {p_half:.3g})")
    print("    layer   exact f64 ± se          probe ± se          eq/dir f32  f64")
    for i in layers:
        r = per_layer[i]
        print(f"    {i:5d}  {r['exact']:.3e} ± {r['exact_se'] or 0:.1e}   {r['probe']:.3e} ± {r['probe_se'] or 0:.1e}"
              f"   {r['exact_eq_per_direction_f32']:.3f}  {r['exact_eq_per_direction_f64']:.3f}")
    print(f"total bench time {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
