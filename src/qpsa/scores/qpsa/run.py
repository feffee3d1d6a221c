"""Q-PSA done right: how much does moving a layer's weights by one quantization step cost?

Definitions (the full derivation and the rules at the grid's ends are in docs/qpsa.md):

* A *sample* moves one unit of a matrix in both directions and measures, over the evaluation
  tokens, ΔNLL(±) = mean NLL(perturbed ±) − mean NLL(base) and ΔPPL(±) = PPL(±) − PPL(base)
  (computed as PPL(base)·expm1(ΔNLL) so no digits are lost). Its Q-PSA value is the
  bidirectional average ½(ΔPPL(+) + ΔPPL(−)); ½(ΔNLL(+) + ΔNLL(−)) is stored beside it, and
  ½|ΔNLL(+) − ΔNLL(−)| is the first-order (one-sided) magnitude.
* Units (`unit`): "weight" moves one weight's integer code by ±1 in its block's grid;
  "block" moves every code of one block by ±1 with random signs (the sign vector and its
  negation); "byte" moves one raw byte of the tensor by ±1 (the original study's protocol).
  Every move is written back to bytes and the block re-dequantized with the exact dequantizer,
  so the perturbation is the one llama.cpp would compute from those bytes.
* Sampling is stratified: `samples_per_matrix` units per matrix (attn_q, attn_k, attn_v,
  attn_output, ffn_gate, ffn_up, ffn_down), drawn without replacement by
  numpy's default_rng([seed, layer, matrix index, stream]), so a layer's samples do not depend on
  which other layers are run.
* Estimators: "exact" evaluates every sample on its own (both directions); "probe" draws, for each
  of K probes, N fresh units of a matrix and moves them together with random signs
  s ∈ {±1}^N, both ±s, and divides the bidirectional average by N: an unbiased estimate, to
  second order, of the mean per-unit value (cross terms s_j s_k H_jk vanish in expectation;
  Hutchinson); the spread over the K independent probes gives its standard error. With
  `probe_scope="layer"` (the default) one probe moves the N units of *each* of the layer's 7
  matrices together (7N units) and estimates the layer score directly, 7× cheaper per probe;
  "matrix" probes each matrix on its own and gives the per-matrix breakdown.
* Layer score ("score"): the mean over the layer's 7 matrices (an MoE layer's 8: attention, the
  router ffn_gate_inp and the stacked ffn_{gate,up,down}_exps) of the per-matrix mean value
  (equal weight per matrix, since sampling is stratified), se by propagation. Everything else
  (per-matrix means, ΔNLL versions, first-order magnitudes, weight-count-weighted totals,
  noise floor, skips) is detail.

Evaluation recomputes only the layers from the perturbed one onward, from the cached hidden
states entering it, with B perturbations in one batch: `Transformer.linear_hook` adds δ·x[..., j]
to output column o of batch element b for each changed weight W[o, j] of that element, so the
weights themselves are never copied.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from qpsa.errors import QpsaError
from qpsa.progress import Advance, no_progress
from qpsa.scores.base import EvalTokens, LayerScores
from qpsa.scores.qpsa.evaluate import Evaluator
from qpsa.scores.qpsa.moves import plan_unit
from qpsa.scores.qpsa.settings import QpsaSettings
from qpsa.scores.qpsa.summary import evaluate_plan, layer_summary, matrix_summary, measure_floor

# ---- the whole run ----------------------------------------------------------------------------


@contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def unit_key(layer: int, matrix: str) -> str:
    return f"{layer}/{matrix}"


def score_unit_text(settings: QpsaSettings) -> str:
    what = {"weight": "weight's code moved ±1 step", "block": "block's codes moved ±1 with random signs",
            "byte": "raw byte moved ±1"}[settings.unit]
    how = f"{settings.estimator} estimator" + (f", {settings.probe_scope}-scope probes" if settings.estimator == "probe" else "")
    return (f"Q-PSA: mean ½(ΔPPL(+)+ΔPPL(−)) per {what}, averaged over the layer's {len(settings.matrices)} matrices "
            f"({how})")


@dataclass
class QpsaRun:
    """What `score_qpsa` returns: the scores plus the base and the accounting."""

    scores: LayerScores
    base_nll: float
    base_ppl: float
    computed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)


def score_qpsa(
    loaded,
    tokens: EvalTokens,
    settings: QpsaSettings,
    layers: list[int] | None = None,
    checkpoint=None,
    advance: Advance = no_progress,
    log: Callable[[str], None] | None = None,
    noise_floor: bool = True,
    executor=None,
) -> QpsaRun:
    """Q-PSA layer scores. `loaded.model` must be in `settings.dtype`.

    checkpoint: a `qpsa.scores.checkpoint.Checkpoint` already checked against this run; its
    finished units are taken as they are, every newly finished unit is added and saved at once.
    advance(status): called after each matrix. log(line): one-line notes (resume, floor).
    noise_floor=False skips measuring the floor (benchmarks; below-floor fractions are then None).
    executor: where the (layer, matrix) units run (`qpsa.parallel`; default this process); each unit
    draws its samples from its own seeds, so the numbers do not depend on where or in which order.
    """
    start = time.perf_counter()
    model, file = loaded.model, loaded.file
    L = loaded.config.n_layer
    settings = dataclasses.replace(settings, matrices=loaded.config.matrices)  # MoE: router, experts; phi3: fused
    layers = list(range(L)) if layers is None else list(layers)
    if model.dtype != settings.dtype:
        raise QpsaError(f"the model is in {model.dtype} but the settings ask for {settings.resolved_precision}")
    log = log or (lambda line: None)
    done: dict[str, dict] = dict(checkpoint.units) if checkpoint is not None else {}
    seconds_before = checkpoint.seconds_before if checkpoint is not None else 0.0  # spent by interrupted runs
    with deterministic():
        ev = Evaluator(model, tokens.tokens, settings.batch_size)
        if checkpoint is not None and checkpoint.base_nll is not None and checkpoint.base_nll != ev.base_mean:
            log(f"warning: the base NLL differs from the checkpoint's by {ev.base_mean - checkpoint.base_nll:.3g} "
                "(another torch or thread count?); the checkpoint's base is used")
        base_mean = checkpoint.base_nll if checkpoint is not None and checkpoint.base_nll is not None else ev.base_mean
        base_ppl = math.exp(base_mean)
        if checkpoint is not None:
            checkpoint.base_nll = base_mean
        floor = checkpoint.noise_floor if checkpoint is not None else None
        if floor is None and noise_floor:
            floor = measure_floor(ev, file, settings)
            if floor["floor"] is not None:
                log(f"noise floor: {floor['floor']:.3g} ΔPPL per {settings.unit} ({floor['floor_kind']}); "
                    f"δ=0 batch max |ΔNLL| {floor['zero_perturbation_max_abs_dnll']:.3g}")
            if checkpoint is not None:
                checkpoint.noise_floor = floor
                checkpoint.save()
        computed, resumed = [], []
        todo: dict[str, tuple[int, str]] = {}
        for i in layers:
            for m in settings.units_of_layer:
                key = unit_key(i, m)
                if key in done:
                    resumed.append(key)
                else:
                    todo[key] = (i, m)
        counts = [ev.n_directions, ev.n_layer_passes]  # the floor's, then every unit's wherever it ran

        def finished(key: str, unit_result) -> None:
            raw, n_directions, layer_passes = unit_result
            done[key] = raw
            computed.append(key)
            counts[0] += n_directions
            counts[1] += layer_passes
            if checkpoint is not None:
                checkpoint.units[key] = raw
                checkpoint.save()
            s = matrix_summary(raw, base_ppl, settings.estimator, None)
            i, m = todo[key]
            advance(f"layer {i} {m}: {s['mean']:.3g}")

        if executor is None:
            from qpsa.parallel import LocalExecutor

            executor = LocalExecutor(loaded)
        executor.run(qpsa_job(loaded, tokens, settings, ev), todo, finished)
        position = {key: k for k, key in enumerate(todo)}
        computed.sort(key=position.__getitem__)
    seconds = time.perf_counter() - start
    scores = build_scores(done, layers, L, settings, base_ppl, base_mean, floor)
    run = scores.details["run"]
    run.update({"computed_units": computed, "resumed_units": resumed,
                "computed_layers": sorted({int(k.split("/")[0]) for k in computed}),
                "resumed_layers": [i for i in layers if all(unit_key(i, m) in resumed for m in settings.units_of_layer)],
                "n_directions": counts[0], "layer_passes": counts[1],
                "execution": executor.describe(),
                "threads": torch.get_num_threads(), "seconds": seconds})
    scores.seconds = seconds + seconds_before
    return QpsaRun(scores, base_mean, base_ppl, computed, resumed)


def qpsa_job(loaded, tokens: EvalTokens, settings: QpsaSettings, ev: Evaluator | None = None):
    """The `qpsa.parallel.Job` of Q-PSA units: (layer, matrix) -> the raw result `evaluate_plan` gives."""
    from qpsa.parallel import Job

    state = None if ev is None else (loaded, ev, settings)
    return Job("qpsa.scores.qpsa.run:setup_evaluator", "qpsa.scores.qpsa.run:evaluate_unit",
               {"tokens": tokens.tokens, "settings": settings}, str(settings.dtype).removeprefix("torch."),
               load=loaded.model.load_options, local_state=state)


def setup_evaluator(loaded, args: dict):
    """A worker's state for `evaluate_unit`: the batched evaluator over the tokens."""
    settings = args["settings"]
    with deterministic():
        return loaded, Evaluator(loaded.model, args["tokens"], settings.batch_size), settings


def evaluate_unit(state, unit: tuple[int, str]) -> tuple[dict, int, float]:
    """One (layer, matrix) unit: its raw result, and the directions and layer passes it cost."""
    loaded, ev, settings = state
    n0, p0 = ev.n_directions, ev.n_layer_passes
    with deterministic():
        raw = evaluate_plan(ev, plan_unit(loaded.file, settings, *unit))
    return raw, ev.n_directions - n0, ev.n_layer_passes - p0


def qpsa_layer_scores(loaded, tokens: EvalTokens, settings: QpsaSettings, advance: Advance = no_progress,
                      layers: list[int] | None = None, noise_floor: bool = True, executor=None) -> LayerScores:
    """Q-PSA as a registered score method (`qpsa.scores.registry`): the layer scores of `score_qpsa`."""
    return score_qpsa(loaded, tokens, settings, layers=layers, advance=advance, noise_floor=noise_floor,
                      executor=executor).scores

_SCORE_TEXT = {
    "matrix": "score = mean over the layer's matrices (7; an MoE layer's 8: attention, router, the 3 stacked expert "
              "tensors) of the per-matrix mean Q-PSA value ½(ΔPPL(+)+ΔPPL(−)) per "
              "unit moved; uncertainty = its standard error (propagated). Details: per_matrix means (ΔPPL and ΔNLL), "
              "first-order ½|ΔNLL(+)−ΔNLL(−)|, and total_nll = Σ n_units·mean ΔNLL (the predicted NLL change if every "
              "unit of the layer moved one step with random signs, to second order).",
    "layer": "score = mean Q-PSA value ½(ΔPPL(+)+ΔPPL(−)) per unit moved, from layer-scope probes that each move N "
             "units of every one of the layer's matrices together (so the matrices weigh equally); uncertainty = "
             "the standard error over the probes. Details: the ΔNLL version and the first-order magnitude; no "
             "per-matrix breakdown or total (use --probe-scope matrix).",
}


def build_scores(done: dict[str, dict], layers: list[int], n_layer: int, settings: QpsaSettings,
                 base_ppl: float, base_nll: float, floor: dict | None) -> LayerScores:
    """LayerScores from the raw per-matrix results (the same numbers whether or not a run was resumed)."""
    fl = None if floor is None or floor["floor"] is None else floor["floor"]
    per_matrix, per_layer, samples = {}, {}, {}
    units = settings.units_of_layer
    for i in layers:
        pm = {m: matrix_summary(done[unit_key(i, m)], base_ppl, settings.estimator, fl) for m in units}
        per_layer[str(i)] = layer_summary(pm)
        if not settings.layer_probes:
            per_matrix[str(i)] = pm
        samples[str(i)] = {m: {k: v for k, v in done[unit_key(i, m)].items() if k not in ("seconds", "layer", "matrix")}
                           for m in units}
    scores: list[float | None] = [None] * n_layer
    unc: list[float | None] = [None] * n_layer
    for i in layers:
        s, se = per_layer[str(i)]["score"], per_layer[str(i)]["se"]
        scores[i] = s if math.isfinite(s) else None
        unc[i] = se if se is not None and math.isfinite(se) else None
    n_samples = sum(per_layer[str(i)]["n_samples"] for i in layers)
    details = {
        "score": _SCORE_TEXT["layer" if settings.layer_probes else "matrix"],
        **settings.to_dict(), "probes": settings.probes if settings.estimator == "probe" else None,
        "matrices": list(settings.matrices), "layers": list(layers),
        "base": {"ppl": base_ppl, "nll": base_nll},
        "noise_floor": floor,
        "n_samples": n_samples,
        "n_skipped": sum(per_layer[str(i)]["n_skipped"] for i in layers),
        "n_redrawn": sum(per_layer[str(i)]["n_redrawn"] for i in layers),
        "n_pinned": sum(per_layer[str(i)]["n_pinned"] for i in layers),
        "below_floor": None if fl is None or n_samples == 0
        else sum(per_layer[str(i)]["n_below_floor"] for i in layers) / n_samples,
        "per_layer": per_layer, "per_matrix": per_matrix, "samples": samples,
        "run": {"seconds_per_unit": {k: done[k]["seconds"] for k in sorted(done)}},
    }
    return LayerScores("qpsa", scores, unc, score_unit_text(settings), 0.0, _finite_or_none(details))


def _finite_or_none(obj):
    """NaN/inf -> None throughout (strict JSON; a matrix with no sample has no mean)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def qpsa(loaded, tokens: EvalTokens, settings: QpsaSettings | None = None) -> LayerScores:
    """The registry signature, `method(loaded, tokens, settings) -> LayerScores` (no checkpoint)."""
    return score_qpsa(loaded, tokens, settings or QpsaSettings()).scores
