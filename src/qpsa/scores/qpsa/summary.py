"""Q-PSA's per-unit values and their aggregation to matrices and layers, and the noise floor."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from qpsa.scores.qpsa.evaluate import Evaluator, other_precision
from qpsa.scores.qpsa.moves import MatrixPlan, plan_unit
from qpsa.scores.qpsa.settings import FLOOR_LAYER, FLOOR_SAMPLES_PER_MATRIX, LAYER, ROUNDOFF_RATIO, QpsaSettings
from qpsa.stats import mean_se

# ---- per-unit results and aggregation ---------------------------------------------------------


def evaluate_plan(ev: Evaluator, plan: MatrixPlan) -> dict:
    """Evaluate a matrix's plan; the raw result that checkpoints and details store."""
    start = time.perf_counter()
    d = ev.dnll(plan.layer, plan.matrix, plan.directions) if plan.directions else np.empty(0)
    plus, minus = d[0::2], d[1::2]
    ok = np.isfinite(plus) & np.isfinite(minus)
    kept = [k for k, good in zip(plan.kept, ok) if good]
    skipped = plan.skipped + [k for k, good in zip(plan.kept, ok) if not good]
    return {"layer": plan.layer, "matrix": plan.matrix, "n_units": plan.n_units, "n_sampled": plan.n_sampled,
            "sampled": plan.index, "kept": kept, "skipped": skipped,
            "dnll_plus": [float(x) for x in plus[ok]], "dnll_minus": [float(x) for x in minus[ok]],
            "n_redrawn": plan.n_redrawn, "n_pinned": plan.n_pinned,
            "n_directions": len(plan.directions), "seconds": time.perf_counter() - start}


def sample_values(raw: dict, base_ppl: float, estimator: str) -> dict[str, np.ndarray]:
    """Per sample (exact) or per probe (probe, divided by N): value (ΔPPL), value_nll, first_order."""
    p, m = np.asarray(raw["dnll_plus"], dtype=np.float64), np.asarray(raw["dnll_minus"], dtype=np.float64)
    scale = 1.0 / max(raw["n_sampled"], 1) if estimator == "probe" else 1.0
    return {"value": base_ppl * 0.5 * (np.expm1(p) + np.expm1(m)) * scale,
            "value_nll": 0.5 * (p + m) * scale,
            "first_order": 0.5 * np.abs(p - m)}


def matrix_summary(raw: dict, base_ppl: float, estimator: str, floor: float | None) -> dict:
    v = sample_values(raw, base_ppl, estimator)
    mean, se = mean_se(v["value"])
    mean_nll, se_nll = mean_se(v["value_nll"])
    fo = v["first_order"]
    if estimator == "probe":  # E[(Σ s_j g_j δ_j)²] = Σ (g_j δ_j)²: RMS per unit = sqrt(mean(fo²)/N)
        first_order = float(np.sqrt((fo**2).mean() / raw["n_sampled"])) if len(fo) else math.nan
        first_order_rms = first_order
    else:
        first_order = float(fo.mean()) if len(fo) else math.nan
        first_order_rms = float(np.sqrt((fo**2).mean())) if len(fo) else math.nan
    n_below = int((np.abs(v["value"]) < floor).sum()) if floor is not None else None
    return {"mean": mean, "se": se, "mean_nll": mean_nll, "se_nll": se_nll, "first_order": first_order,
            "first_order_rms": first_order_rms, "n_samples": len(fo), "n_skipped": len(raw["skipped"]),
            "n_redrawn": raw["n_redrawn"], "n_pinned": raw["n_pinned"], "n_units": raw["n_units"],
            # a layer-scope probe moves N units of each matrix, not units in proportion to the matrices'
            # sizes, so it has no weight-count-weighted total
            "total_nll": None if raw["matrix"] == LAYER else raw["n_units"] * mean_nll,
            "total_nll_se": None if raw["matrix"] == LAYER else raw["n_units"] * se_nll,
            "n_below_floor": n_below, "below_floor": n_below / len(fo) if n_below is not None and len(fo) else None}


def _propagate(ses: list[float], weights: list[float]) -> float:
    """The standard error of Σ w·x from the x's independent standard errors (NaN if any is NaN)."""
    return math.sqrt(sum((w * s) ** 2 for w, s in zip(weights, ses)))


def layer_summary(per_matrix: dict[str, dict]) -> dict:
    """The layer's score from its matrices' summaries, or from its one LAYER summary (layer-scope
    probes: the mean per unit over the 7·N units moved together, which weights the matrices equally
    when each gave N units; no weight-count-weighted total)."""
    if LAYER in per_matrix:
        m = per_matrix[LAYER]
        return {"score": m["mean"], "se": m["se"], "score_nll": m["mean_nll"], "se_nll": m["se_nll"],
                "total_nll": None, "total_nll_se": None, "total_ppl": None, "first_order": m["first_order"],
                **{k: m[k] for k in ("n_samples", "n_skipped", "n_redrawn", "n_pinned", "n_below_floor",
                                     "below_floor")}}
    ms = list(per_matrix.values())
    k = len(ms)
    score = sum(m["mean"] for m in ms) / k
    below = [m["n_below_floor"] for m in ms]
    n = sum(m["n_samples"] for m in ms)
    n_below = None if any(b is None for b in below) else sum(below)
    return {
        "score": score, "se": _propagate([m["se"] for m in ms], [1 / k] * k),
        "score_nll": sum(m["mean_nll"] for m in ms) / k, "se_nll": _propagate([m["se_nll"] for m in ms], [1 / k] * k),
        "total_nll": sum(m["total_nll"] for m in ms),
        "total_nll_se": _propagate([m["se_nll"] for m in ms], [m["n_units"] for m in ms]),
        "total_ppl": sum(m["n_units"] * m["mean"] for m in ms),
        "first_order": sum(m["first_order"] for m in ms) / k,
        "n_samples": n, "n_skipped": sum(m["n_skipped"] for m in ms), "n_redrawn": sum(m["n_redrawn"] for m in ms),
        "n_pinned": sum(m["n_pinned"] for m in ms),
        "n_below_floor": n_below, "below_floor": None if n_below is None or n == 0 else n_below / n,
    }


# ---- the noise floor --------------------------------------------------------------------------


def measure_floor(ev: Evaluator, file, settings: QpsaSettings) -> dict:
    """How small a value the run can resolve, measured on the first samples of layer FLOOR_LAYER.

    * zero perturbations: a batch of δ = 0 through the same batched path must give ΔNLL = 0
      (the base NLL comes from the unbatched forward; this checks that batching changes nothing);
    * float32 vs float64: the same samples evaluated in both precisions; the RMS of the value
      difference is float32's floor, and float64's is estimated from it × 2⁻²⁹ (the ratio of
      the unit roundoffs), as nothing more precise is at hand to measure it against.
    """
    start = time.perf_counter()
    zero = ev.dnll(FLOOR_LAYER, None, [None] * min(ev.batch_size, 4))
    plans = [plan_unit(file, settings, FLOOR_LAYER, u) for u in settings.units_of_layer]
    take = FLOOR_SAMPLES_PER_MATRIX if settings.estimator == "exact" else 1
    raws = []
    for plan in plans:
        plan.directions, plan.kept = plan.directions[: 2 * take], plan.kept[:take]
        plan.skipped = []
        raws.append(plan)
    other = Evaluator(other_precision(ev.model), ev.tokens, ev.batch_size)
    values = {}
    for name, e in ((settings.resolved_precision, ev), ("float64" if ev.model.dtype == torch.float32 else "float32", other)):
        vs = []
        for plan in raws:
            raw = evaluate_plan(e, plan)
            vs.extend(sample_values(raw, e.base_ppl, settings.estimator)["value"].tolist())
        values[name] = vs
    del other
    v32, v64 = np.asarray(values["float32"]), np.asarray(values["float64"])
    diff = v32 - v64
    zero_max = float(np.abs(zero).max())
    if len(diff):
        rms32 = float(np.sqrt((diff**2).mean()))
        floor32, floor64 = max(rms32, zero_max), max(rms32 * ROUNDOFF_RATIO, zero_max)
        run_floor = floor32 if settings.resolved_precision == "float32" else floor64
    else:  # no sample of layer 0 could move (e.g. all-zero matrices): nothing to measure the floor on
        rms32 = floor32 = floor64 = run_floor = None
    return {
        "floor": run_floor,
        "floor_kind": "measured (RMS float32 − float64)" if settings.resolved_precision == "float32"
        else "estimated (float32 floor × 2⁻²⁹)",
        "float32": floor32, "float64": floor64,
        "float32_vs_float64_rms": rms32, "float32_vs_float64_max": float(np.abs(diff).max()) if len(diff) else math.nan,
        "zero_perturbation_max_abs_dnll": zero_max,
        "layer": FLOOR_LAYER, "n_samples": len(diff), "values_float32": v32.tolist(), "values_float64": v64.tolist(),
        "seconds": time.perf_counter() - start,
    }
