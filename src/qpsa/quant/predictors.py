"""Cheap predictors of quantization damage, judged against the measured swap KLD.

The ground truth is `sensitivity`'s measurement: one group (a tensor, or a layer) requantized
alone to a type, its mean KL(base ‖ variant) per scored token over the measured windows. Each
predictor below ranks the same groups from cheaper quantities. E = Q(W) − W is the group's
quantization error at the target type (the exact values `sensitivity` writes into the model,
imatrix-weighted where the session has an importance matrix); n is the number of scored tokens.

* `weight_norm`    Σ W²: the size of the weights (no forward at all).
* `error`          Σ E²: the plain quantization error.
* `imatrix_error`  Σ_j a_j Σ_i E_ij², a_j the mean squared input activation of column j over the
                   windows (llama.cpp's importance matrix, collected on the measured windows): the
                   output error energy E[‖E x‖²] with the activations' cross terms dropped. One forward.
* `grad_first`     ⟨G, E⟩ / n, G = ∂(Σ NLL)/∂W with the text's own next tokens: the first-order
                   change of the mean NLL (signed); `grad_first_sq` is its square.
* `fisher_diag`    ½ Σ_w ⟨G_w², E²⟩ / n: the diagonal empirical Fisher (squared gradients of each
                   window, true labels) weighting the squared error.
* `fisher_kl`      ½ mean_{w,r} ⟨G̃_{w,r}, E⟩² / S: G̃ the gradient of Σ log p(ỹ) with every scored
                   token's label ỹ drawn from the model's own next-token distribution (r = 1…R draws
                   per window w of S scored tokens). Since KL(base ‖ base + ΔW) = ½ ΔWᵀ F ΔW + O(ΔW³)
                   with F the Fisher, and E_ỹ[(∇ log p(ỹ)·ΔW)²] = ΔWᵀ F ΔW (draws at different
                   positions are independent, their cross terms vanish in expectation), this is an
                   unbiased estimate of the second-order KLD, in the measurement's own unit (nats per
                   token), full matrix F and all cross terms within a group included. Its standard
                   error comes from the spread of the W·R squared projections.
* `fisher_kl_diag` ½ Σ_{w,r} ⟨G̃_{w,r}², E²⟩ / (W·R·S): the same drawn-label Fisher, its diagonal
                   only (cross terms between weights dropped) — far less noisy than the projection,
                   which is one scalar per draw, because it averages over every weight.
* `qpsa_curvature` Q-PSA's grid curvature times the error: per weight matrix, probes of N weights
                   moved ±1 grid step with random signs give the mean per-weight ½(ΔNLL(+)+ΔNLL(−)),
                   divided by the mean squared move that is a per-weight curvature c (½ diag H on
                   average); the prediction is c · Σ E². Only the matrices of the layers
                   (Q-PSA does not move the embedding or the head).

Costs are counted twice. In forward equivalents: the passes over the measured windows each input
needs, counted in FLOPs (`forward_flops`; a backward pass as two forwards), against the
measurement's own (its reference pass, then per group the layers from its first changed one and
the output head) — a ratio that other load on the machine cannot skew. And in wall seconds,
measured in the same run, requantization included: the requantization that makes E is needed by
the measurement too, so it is in both.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.progress import SILENT, Progress
from qpsa.quant.sensitivity import QuantGroup, group_variant

log = logging.getLogger(__name__)

PREDICTORS = ("weight_norm", "error", "imatrix_error", "grad_first", "grad_first_sq", "fisher_diag", "fisher_kl",
              "fisher_kl_diag", "qpsa_curvature")
NEEDS = {"imatrix_error": "imatrix", "grad_first": "gradients", "grad_first_sq": "gradients",
         "fisher_diag": "gradients", "fisher_kl": "draws", "fisher_kl_diag": "draws", "qpsa_curvature": "qpsa"}
DEFAULT_DRAWS = 2  # label draws per window for fisher_kl
QPSA_PROBES, QPSA_N = 2, 64  # Q-PSA probes per matrix and weights moved per probe (predictor setting)
# a layer's matrices (phi3's attn_qkv is a file tensor of its own: Q-PSA moves it, its gradient is its own)
_MATRIX = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def check_model(loaded) -> None:
    """QpsaError for a model the predictors do not cover: mixture-of-experts layers (their stacked
    expert tensors have no per-expert gradient slices or imatrix weighting here yet)."""
    if loaded.config.n_expert:
        raise QpsaError(f"the predictors do not support mixture-of-experts models ({loaded.config.arch}) yet; "
                        "measure with `q-psa sensitivity`, or `q-psa plan` without --estimator")


def check_predictor(name: str) -> str:
    if name not in PREDICTORS:
        raise QpsaError(f"unknown predictor {name!r}; choose from: {', '.join(PREDICTORS)}")
    return name


@dataclass
class Prediction:
    """One predictor's value per group for one target type, with its standard error where it has one."""

    predictor: str
    qtype: str
    values: dict[str, float]  # group -> prediction
    se: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"predictor": self.predictor, "type": self.qtype, "values": self.values, "se": self.se}


class Predictors:
    """The inputs every predictor needs, computed once per model and windows and shared by every type:
    gradients (true labels and drawn labels), the importance matrix, Q-PSA curvatures. Each input is
    computed on first use and its cost recorded (seconds, and forward equivalents)."""

    def __init__(self, loaded, windows, forward_seconds: float, imatrix=None, draws: int = DEFAULT_DRAWS,
                 seed: int = 0, progress: Progress = SILENT):
        if draws < 1:
            raise QpsaError(f"--draws must be at least 1 (got {draws})")
        check_model(loaded)
        self.loaded, self.windows, self.imatrix = loaded, windows, imatrix
        self.forward_seconds = forward_seconds  # one reference pass over `windows`
        self.draws, self.seed, self.progress = draws, seed, progress
        self.cost: dict[str, float] = {}  # input -> seconds
        self.passes: dict[str, float] = {}  # input -> forward passes over `windows` it costs (counted in FLOPs)
        self._errors: dict[str, dict[str, torch.Tensor]] = {}  # type -> tensor -> E
        self._grad = None
        self._activations = None
        self._curvature = None

    # ---- inputs ---------------------------------------------------------------------------------

    def errors(self, groups: list[QuantGroup], qtype) -> dict[str, torch.Tensor]:
        """E = Q(W) − W per tensor of `groups` at qtype (absent where the tensor keeps its bytes)."""
        if qtype.name not in self._errors:
            start = time.perf_counter()
            weights = self.loaded.model.weights
            errors = {}
            with self.progress.task(f"quantization errors at {qtype.name}", len(groups)) as advance:
                for g in groups:
                    values, _ = group_variant(self.loaded, g, qtype, self.imatrix)
                    for name, v in values.items():
                        errors[name] = v.to(weights[name].dtype) - weights[name].detach()
                    advance()
            self._errors[qtype.name] = errors
            self.cost[f"requantize {qtype.name}"] = time.perf_counter() - start
        return self._errors[qtype.name]

    def gradients(self, error_sets: dict[str, dict[str, torch.Tensor]]) -> dict:
        """One forward and 1 + R backward passes per window: Σ_w G_w and Σ_w G_w² per tensor (true
        labels), and ⟨G̃_{w,r}, E⟩ of every tensor of every error set (drawn labels)."""
        if self._grad is not None and set(error_sets) <= set(self._grad["dots"]):
            return self._grad
        start = time.perf_counter()
        model = self.loaded.model
        names = sorted({n for errors in error_sets.values() for n in errors})
        if not names:  # no tensor changes at these types: nothing to project
            return {"sum": {}, "sq": {}, "dots": {t: {} for t in error_sets}}
        slices = _param_slices(model, names)
        params = {p: model.weights[p] for p, _, _ in slices.values()}
        was = {p: t.requires_grad for p, t in params.items()}
        tokens, s0 = self.windows.tokens, self.windows.score_from
        n, T = tokens.shape
        positions = torch.arange(T, device=model.device)
        gen = torch.Generator().manual_seed(self.seed)
        g_sum = {nm: torch.zeros_like(model.weights[nm]) for nm in names}
        g_sq = {nm: torch.zeros_like(model.weights[nm]) for nm in names}
        drawn_sq = {nm: torch.zeros_like(model.weights[nm]) for nm in names}
        clock = {"forward": 0.0, "true": 0.0, "drawn": 0.0}
        dots = {t: {nm: [] for nm in errs} for t, errs in error_sets.items()}
        pnames = list(params)

        def grads(loss, retain: bool) -> dict[str, torch.Tensor]:
            g = dict(zip(pnames, torch.autograd.grad(loss, [params[p] for p in pnames], retain_graph=retain)))
            return {nm: g[p][row : row + rows] for nm, (p, row, rows) in slices.items()}

        try:
            for t in params.values():
                t.requires_grad_(True)
            with self.progress.task("gradients (true and drawn labels)", n) as advance:
                for w in range(n):
                    with torch.inference_mode(False), torch.enable_grad():
                        t0 = time.perf_counter()
                        ids = tokens[w : w + 1]
                        h = model.run_layers(model.embed(ids), range(model.config.n_layer), positions)
                        logp = torch.log_softmax(model.logits(h[:, s0:-1])[0].float(), dim=-1)  # (S, V)
                        target = ids[0, s0 + 1 :, None].to(logp.device)
                        t1 = time.perf_counter()
                        g = grads(-logp.gather(-1, target).sum(), retain=True)
                        for nm in names:
                            g_sum[nm] += g[nm]
                            g_sq[nm] += g[nm].square()
                        del g
                        t2 = time.perf_counter()
                        probs = logp.detach().exp()
                        for r in range(self.draws):
                            # drawn on the CPU: the same labels whatever the device (S, 1)
                            drawn = torch.multinomial(probs.cpu(), 1, generator=gen).to(logp.device)
                            g = grads(logp.gather(-1, drawn).sum(), retain=r < self.draws - 1)
                            for nm in names:
                                drawn_sq[nm] += g[nm].square()
                            for t, errs in error_sets.items():
                                for nm, e in errs.items():
                                    dots[t][nm].append(float((g[nm] * e).sum(dtype=torch.float64)))
                            del g
                        for k, v in zip(clock, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                            clock[k] += v
                    advance()
        finally:
            for p, t in params.items():
                t.requires_grad_(was[p])
        self._grad = {"sum": g_sum, "sq": g_sq, "drawn_sq": drawn_sq,
                      "dots": {t: {nm: np.asarray(v) for nm, v in d.items()} for t, d in dots.items()}}
        # the true-label predictors need the forward and one backward, the drawn-label ones the
        # forward and R backwards (a backward pass costs about two forward passes)
        self.cost["gradients"] = clock["forward"] + clock["true"]
        self.cost["draws"] = clock["forward"] + clock["drawn"]
        self.passes["gradients"] = 3.0
        self.passes["draws"] = 1.0 + 2 * self.draws
        log.debug("gradient passes took %.1f s", time.perf_counter() - start)
        return self._grad

    def activations(self) -> dict[str, torch.Tensor]:
        """Mean squared input activation per column of every layer matrix (the imatrix, on the windows)."""
        if self._activations is None:
            from qpsa.quant.imatrix import compute_imatrix

            start = time.perf_counter()
            with self.progress.task("importance matrix", self.windows.tokens.shape[0]) as advance:
                im = compute_imatrix(self.loaded.model, self.windows.tokens, "predictors", advance)
            self._activations = {nm: torch.from_numpy(np.asarray(im.mean(nm), dtype=np.float32).reshape(-1))
                                 for nm in im.names}
            self.cost["imatrix"] = time.perf_counter() - start
            self.passes["imatrix"] = 1.0
        return self._activations

    def curvatures(self, names: list[str]) -> dict[str, float]:
        """Q-PSA's per-weight curvature of each layer matrix among `names` (module docstring)."""
        if self._curvature is None:
            from qpsa.scores.qpsa.evaluate import Evaluator
            from qpsa.scores.qpsa.moves import plan_matrix
            from qpsa.scores.qpsa.settings import QpsaSettings
            from qpsa.scores.qpsa.summary import evaluate_plan, sample_values

            start = time.perf_counter()
            settings = QpsaSettings(samples_per_matrix=QPSA_N, estimator="probe", probe_scope="matrix",
                                    probes=QPSA_PROBES, seed=self.seed)
            matrices = [nm for nm in names if _MATRIX.match(nm)]
            ev = Evaluator(self.loaded.model, self.windows.tokens[:1], settings.batch_size)
            out = {}
            with self.progress.task("Q-PSA curvature probes", len(matrices)) as advance:
                for nm in matrices:
                    layer, matrix = _MATRIX.match(nm).groups()
                    plan = plan_matrix(self.loaded.file, settings, int(layer), matrix)
                    raw = evaluate_plan(ev, plan)
                    per_unit = sample_values(raw, ev.base_ppl, "probe")["value_nll"]
                    moved = np.concatenate([m.delta for m in plan.directions[0::2]]) if plan.directions else np.empty(0)
                    out[nm] = float(per_unit.mean() / np.mean(moved**2)) if len(moved) and len(per_unit) else math.nan
                    advance()
            self._curvature = out
            self.cost["qpsa"] = time.perf_counter() - start
            # each direction re-ran the layers from its own on, and the head on every token, over one window
            cfg, T = self.loaded.config, self.windows.tokens.shape[1]
            layer, head = _layer_and_head_flops(cfg, T, T - 1)
            layer_s, head_s = _layer_and_head_flops(cfg, T, T - 1 - self.windows.score_from)
            whole = self.windows.tokens.shape[0] * (cfg.n_layer * layer_s + head_s)
            self.passes["qpsa"] = (ev.n_layer_passes * cfg.n_layer * layer + ev.n_directions * head) / whole
        return self._curvature

    # ---- predictions ------------------------------------------------------------------------------

    def predict(self, name: str, groups: list[QuantGroup], qtype, error_sets=None) -> Prediction:
        """`name`'s value for every group at qtype. `error_sets` (type -> errors) lets one gradient
        pass serve several types."""
        check_predictor(name)
        errors = self.errors(groups, qtype)
        weights = self.loaded.model.weights
        S = self.windows.tokens.shape[1] - 1 - self.windows.score_from  # scored tokens per window
        n_scored = self.windows.tokens.shape[0] * S
        values, se = {}, {}
        need = NEEDS.get(name)
        grad = self.gradients(error_sets or {qtype.name: errors}) if need in ("gradients", "draws") else None
        act = self.activations() if need == "imatrix" else None
        curv = self.curvatures([n for g in groups for n in g.tensors]) if need == "qpsa" else None
        for g in groups:
            changed = [n for n in g.tensors if n in errors]
            if name == "weight_norm":
                values[g.name] = sum(float(weights[n].detach().double().square().sum()) for n in g.tensors)
                continue
            if not changed:  # the group keeps its bytes: no change, no damage
                values[g.name] = 0.0
                continue
            e = {n: errors[n] for n in changed}
            if name == "error":
                values[g.name] = sum(float(v.double().square().sum()) for v in e.values())
            elif name == "imatrix_error":
                parts = [float((v.double().square().sum(0) * act[n].double()).sum()) for n, v in e.items() if n in act]
                values[g.name] = sum(parts) if parts else math.nan
            elif name in ("grad_first", "grad_first_sq"):
                first = sum(float((grad["sum"][n] * v).sum(dtype=torch.float64)) for n, v in e.items()) / n_scored
                values[g.name] = first if name == "grad_first" else first**2
            elif name == "fisher_diag":
                values[g.name] = 0.5 * sum(float((grad["sq"][n] * v.square()).sum(dtype=torch.float64))
                                           for n, v in e.items()) / n_scored
            elif name == "fisher_kl":
                proj = sum(grad["dots"][qtype.name][n] for n in changed)  # (W·R,): ⟨G̃, E_group⟩ per draw
                sq = 0.5 * proj**2 / S
                values[g.name] = float(sq.mean())
                se[g.name] = float(sq.std(ddof=1) / math.sqrt(len(sq))) if len(sq) > 1 else math.nan
            elif name == "fisher_kl_diag":
                draws = self.windows.tokens.shape[0] * self.draws
                values[g.name] = 0.5 * sum(float((grad["drawn_sq"][n] * v.square()).sum(dtype=torch.float64))
                                           for n, v in e.items()) / (draws * S)
            elif name == "qpsa_curvature":
                parts = [curv[n] * float(v.double().square().sum()) for n, v in e.items() if n in curv]
                values[g.name] = sum(parts) if parts and len(parts) == len(e) else math.nan
        return Prediction(name, qtype.name, values, se)

    def cost_of(self, name: str, qtype, n_types: int = 1) -> tuple[float, float]:
        """(seconds, forward passes) the predictor cost at qtype: the type's requantization (seconds
        only) plus its share of the shared input it needs (the gradient pass serves `n_types` types)."""
        seconds = self.cost.get(f"requantize {qtype.name}", 0.0) if name != "weight_norm" else 0.0
        need = NEEDS.get(name)
        share = 1 / n_types if need in ("gradients", "draws") else 1.0
        if need:
            seconds += share * self.cost.get(need, 0.0)
        return seconds, share * self.passes.get(need, 0.0)


def _layer_and_head_flops(cfg, n_tokens: int, n_scored: int) -> tuple[float, float]:
    """(FLOPs of one layer, FLOPs of the output head) of a forward over n_tokens, n_scored of them scored."""
    from qpsa.model.transformer import forward_flops

    whole = forward_flops(cfg, n_tokens, n_scored)
    head = 2.0 * cfg.n_embd * cfg.vocab_size * n_scored
    return (whole - head) / cfg.n_layer, head


def measurement_passes(loaded, windows, groups: list[QuantGroup]) -> float:
    """Forward passes over `windows` (counted in FLOPs) that measuring every group costs: the
    reference pass, then per group the layers from its first changed one and the head."""
    cfg, T = loaded.config, windows.tokens.shape[1]
    layer, head = _layer_and_head_flops(cfg, T, T - 1 - windows.score_from)
    whole = cfg.n_layer * layer + head
    return 1 + sum(((cfg.n_layer - g.first_layer) * layer + head) / whole for g in groups)


def _param_slices(model, names: list[str]) -> dict[str, tuple[str, int, int]]:
    """tensor name -> (the parameter that holds it, first row, rows): layer matrices live in the fused
    q|k|v and gate|up weights."""
    out = {}
    for nm in names:
        m = _MATRIX.match(nm)
        rows = model.weights[nm].shape[0]
        if m:
            fused, row = model.fused_rows(int(m.group(1)), m.group(2))
            out[nm] = (f"blk.{m.group(1)}.{fused}.weight", row, rows)
        else:
            out[nm] = (nm, 0, rows)
    return out


# ---- how well a predictor ranks the measurement -----------------------------------------------------


def spearman(pred: dict[str, float], measured: dict[str, float], boot: int = 2000, seed: int = 0) -> dict:
    """Spearman ρ of predicted against measured KLD over the groups both have (finite), with a 95%
    percentile bootstrap interval over groups (resampled with replacement)."""
    from scipy.stats import rankdata

    keys = [k for k in measured if k in pred and math.isfinite(pred[k]) and math.isfinite(measured[k])]
    if len(keys) < 3:
        return {"rho": math.nan, "lo": math.nan, "hi": math.nan, "n": len(keys)}
    x = np.array([pred[k] for k in keys])
    y = np.array([measured[k] for k in keys])

    def rho(a, b):
        ra, rb = rankdata(a), rankdata(b)
        if ra.std() == 0 or rb.std() == 0:
            return math.nan
        return float(np.corrcoef(ra, rb)[0, 1])

    rng = np.random.default_rng(seed)
    samples = [rho(x[i], y[i]) for i in (rng.integers(0, len(keys), len(keys)) for _ in range(boot))]
    samples = np.array([s for s in samples if math.isfinite(s)])
    lo, hi = (np.percentile(samples, [2.5, 97.5]) if len(samples) else (math.nan, math.nan))
    return {"rho": rho(x, y), "lo": float(lo), "hi": float(hi), "n": len(keys)}


# ---- the comparison: every predictor against the measurement ----------------------------------------


@dataclass
class PredictorRow:
    qtype: str
    predictor: str
    rho: float
    lo: float
    hi: float
    n: int
    seconds: float  # wall time, requantization included
    forward_equivalents: float  # forward passes over the windows, counted in FLOPs (requantization excluded)
    cost_fraction: float  # forward_equivalents / the measurement's
    seconds_fraction: float  # seconds / the measurement's seconds (one run; other load on the machine skews it)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PredictorsResult:
    granularity: str
    rows: list[PredictorRow]
    measured: dict[str, dict[str, float]]  # type -> group -> measured KLD
    predictions: dict[str, dict[str, Prediction]]  # type -> predictor -> prediction
    measurement_seconds: dict[str, float]  # type -> reference pass + every group's re-run
    measurement_passes: float  # the same in forward passes, counted in FLOPs
    forward_seconds: float
    draws: int

    def best(self, qtype: str) -> PredictorRow | None:
        rows = [r for r in self.rows if r.qtype == qtype and math.isfinite(r.rho)]
        return max(rows, key=lambda r: r.rho, default=None)

    def to_dict(self) -> dict:
        return {"granularity": self.granularity, "draws": self.draws, "forward_seconds": self.forward_seconds,
                "measurement_seconds": self.measurement_seconds, "measurement_passes": self.measurement_passes, "rows": [r.to_dict() for r in self.rows],
                "measured": self.measured,
                "predictions": {t: {p: v.to_dict() for p, v in d.items()} for t, d in self.predictions.items()}}


def compare_predictors(session, qtypes: list, granularity: str, names: list[str], draws: int = DEFAULT_DRAWS,
                       resume: bool = False, measured_cb=lambda result: None, seed: int = 0) -> PredictorsResult:
    """Measure every group's swap KLD at each type (the ground truth, `session.sensitivity`,
    checkpointed) and every predictor in `names`; Spearman ρ with a bootstrap interval per type and
    predictor, and each predictor's cost beside the measurement's."""
    from qpsa.quant.sensitivity import quant_groups

    for n in names:
        check_predictor(n)
    check_model(session.loaded)
    groups = quant_groups(session.loaded, granularity)
    measured, seconds = {}, {}
    for qtype in qtypes:
        result = session.sensitivity(qtype, granularity, resume)
        measured_cb(result)
        measured[qtype.name] = {r.group.name: r.stats.kld for r in result.rows}
        seconds[qtype.name] = (session.reference_seconds or 0.0) + sum(r.seconds for r in result.rows)
    forward = session.reference_seconds
    if forward is None:  # every row came from a checkpoint: time one pass now
        start = time.perf_counter()
        from qpsa.quant.sensitivity import Reference

        Reference(session.loaded.model, session.windows)
        forward = time.perf_counter() - start
    measure_passes = measurement_passes(session.loaded, session.windows, groups)
    pred = Predictors(session.loaded, session.windows, forward, session.imatrix, draws, seed, session.progress)
    error_sets = {t.name: pred.errors(groups, t) for t in qtypes}
    rows, predictions = [], {}
    for qtype in qtypes:
        predictions[qtype.name] = {}
        for name in names:
            p = pred.predict(name, groups, qtype, error_sets)
            predictions[qtype.name][name] = p
            s = spearman(p.values, measured[qtype.name])
            # a first-order predictor is judged by its magnitude (its sign says better or worse, not how much)
            if name == "grad_first":
                s = spearman({k: abs(v) for k, v in p.values.items()}, measured[qtype.name])
            cost, passes = pred.cost_of(name, qtype, len(qtypes))
            rows.append(PredictorRow(qtype.name, name, s["rho"], s["lo"], s["hi"], s["n"], cost, passes,
                                     passes / measure_passes, cost / seconds[qtype.name]))
    return PredictorsResult(granularity, rows, measured, predictions, seconds, measure_passes, forward, draws)
