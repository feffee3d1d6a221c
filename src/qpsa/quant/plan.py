"""`q-psa plan`: a type per layer (or tensor) under a size budget, chosen from measured KL divergence.

1. Measure: every group (layer, or tensor, plus the embedding/head) requantized alone to every
   candidate type, on the measured span (qpsa.quant.sensitivity). Keeping a group as it is, is an
   option too (KLD 0, its present size).
2. Choose: minimize the summed mean KLD of the chosen options with the summed size within the
   budget (qpsa.quant.sensitivity.choose_mixture: exact for this additive model, by dynamic
   programming; greedy by ΔKLD per bit saved is what it improves on, since greedy can strand
   budget where a group's options are not convex).
3. Check: the whole plan, requantized in memory, against the unmodified model on the held-out
   span (the windows after the measured ones): its actual KLD and PPL beside the predicted sum,
   beside the uniform types (one type for every weight matrix, llama-quantize's head rule and
   fallbacks) of the nearest sizes above and below the plan, and beside llama-quantize's presets
   (PRESET_NAMES: Q2_K … Q6_K, its mixtures) whose size is within the candidates' range, and
   always the nearest above and below the budget.
4. Never worse: if a preset or uniform type that fits the budget measured a lower held-out KLD
   than the plan (the additive prediction missed), the result names it (`fallback`) and its
   types replace the plan's in the recipe and the written file.

The budget is in bits per weight over every tensor of the file (what llama.cpp prints as BPW):
8 × tensor bytes / all weights, tensors that are never quantized (norms) included at their size;
or a preset's exact size on the model (`target_preset`). With an importance matrix
(`session.imatrix`), every requantization — candidates, plan, uniform types, presets — is
weighted by it, as llama-quantize --imatrix does.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType

from qpsa.errors import QpsaError
from qpsa.progress import SILENT, Progress
from qpsa.quant.requantize import TensorChoice, choose_types, is_quantizable, preset_named, qtype_named, requantized_tensors
from qpsa.quant.sensitivity import Option, Reference, VariantStats, choose_mixture, group_size, quant_groups

Q = GGMLQuantizationType
log = logging.getLogger(__name__)


@dataclass
class Measured:
    """A whole model's types checked on the held-out span."""

    label: str
    bits_per_weight: float
    n_bytes: int
    stats: VariantStats
    predicted_kld: float | None = None  # the sum of the chosen groups' measured KLDs
    predicted_kld_se: float | None = None

    def to_dict(self) -> dict:
        return {"label": self.label, "bits_per_weight": self.bits_per_weight, "bytes": self.n_bytes,
                "predicted_kld": self.predicted_kld, "predicted_kld_se": self.predicted_kld_se, **self.stats.to_dict()}


@dataclass
class PlanResult:
    model_name: str
    source_path: Path
    target_bpw: float
    granularity: str
    types: list[str]
    groups: list[dict]  # per group: name, chosen type, bytes, predicted KLD ± se, options
    choices: list[TensorChoice]  # per tensor, for requantize
    plan: Measured
    uniform: list[Measured] = field(default_factory=list)
    presets: list[Measured] = field(default_factory=list)  # llama-quantize's mixtures, label = the preset
    seconds: float = 0.0
    target_preset: str | None = None  # the budget is this preset's exact size on the model
    budget_bytes: int = 0  # all tensors' bytes allowed
    fallback: dict | None = None  # {"label", "kld", "plan_kld"} where a preset or uniform type beat the plan
    imatrix: dict | None = None  # {"path", "sha256"} of the importance matrix every candidate was weighted by
    estimator: dict | None = None  # with --estimator: the predictor, options measured of all, rounds, seconds
    _gguf_file: object = None
    _imatrix: object = None
    _base: str | None = None  # the preset whose rules the recipe starts from (the fallback's, if a preset)
    expert_usage: dict | None = None  # an MoE model's router usage on the measured windows
    execution: dict | None = None  # where the candidates were measured (qpsa.parallel): backend, workers, units

    def to_dict(self) -> dict:
        return {"target_bpw": self.target_bpw, "target_preset": self.target_preset, "budget_bytes": self.budget_bytes,
                "granularity": self.granularity, "types": self.types, "imatrix": self.imatrix,
                "plan": self.plan.to_dict(), "uniform": [u.to_dict() for u in self.uniform],
                "presets": [p.to_dict() for p in self.presets], "frontier": self.frontier(),
                "fallback": self.fallback, "estimator": self.estimator, "groups": self.groups,
                **({"expert_usage": self.expert_usage} if self.expert_usage is not None else {}),
                "tensor_types": {c.name: c.target.name for c in self.choices if c.target != c.source},
                "llama_quantize": self.llama_quantize_args(), "seconds": self.seconds, "execution": self.execution}

    def frontier(self) -> list[str]:
        """Labels of the presets and uniform types on the Pareto frontier of (size, held-out KLD):
        none of the others is both no larger and lower in KLD. Smallest first."""
        out, best = [], float("inf")
        for m in sorted(self.presets + self.uniform, key=lambda m: (m.n_bytes, m.stats.kld)):
            if m.stats.kld < best:
                out.append(m.label)
                best = m.stats.kld
        return out

    def llama_quantize_args(self) -> list[str]:
        """Arguments for llama-quantize reproducing the plan (or its fallback): the most common
        planned type as the preset (the fallback preset itself, if one), and one --tensor-type for
        every tensor whose planned type differs from what that preset's own rules would give it
        (llama-quantize applies them to every tensor not named); --imatrix where the plan used one."""
        base = self._base or _base_type(self.choices)
        by_preset = {} if base == "copy" else {
            c.name: c.target for c in choose_types(self._gguf_file, base, imatrix=self._imatrix)}
        args = ["--allow-requantize"]
        if self.imatrix is not None:
            args += ["--imatrix", self.imatrix["path"]]
        for c in self.choices:
            if c.target != by_preset.get(c.name, c.source):
                args += ["--tensor-type", f"^{re.escape(c.name)}$={c.target.name.lower()}"]
        return args + [str(self.source_path), "OUT.gguf", base]

    def write(self, out: Path, output: str | None, progress: Progress = SILENT) -> list[str]:
        from qpsa.fsutil import write_atomic
        from qpsa.quant.requantize import write_requantized

        out.mkdir(parents=True, exist_ok=True)
        files = []
        path = out / "plan.json"
        write_atomic(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        files.append(str(path))
        recipe = out / "recipe.txt"
        args = self.llama_quantize_args()
        lines = [f"# q-psa plan: {self.model_name} at {self.target_bpw:.4f} bits/weight ({self.granularity} granularity"
                 + (f", the size of {self.target_preset}" if self.target_preset else "") + ")",
                 *([(f"# FALLBACK: {self.fallback['label']} measured a lower held-out KLD than the plan "
                     f"({self.fallback['kld']:.4g} vs {self.fallback['plan_kld']:.4g}); this recipe is "
                     f"{self.fallback['label']}")] if self.fallback else []),
                 (f"# with the preset {args[-1].upper()}: one REGEX=TYPE per tensor whose planned type differs from "
                  "the preset's, for llama-quantize --tensor-type or q-psa requantize --tensor-type")]
        for regex, _, qtype in (args[i + 1].rpartition("=") for i, a in enumerate(args) if a == "--tensor-type"):
            lines.append(f"{regex}={qtype.upper()}")
        lines += ["", "# llama-quantize " + " ".join(_shell_quote(a) for a in args)]
        write_atomic(recipe, "\n".join(lines) + "\n")
        files.append(str(recipe))
        if output:
            with progress.task("writing the planned GGUF", len(self.choices)) as advance:
                write_requantized(self._gguf_file, self.choices, output, advance, imatrix=self._imatrix,
                                  cached=True)
            files.append(str(output))
        return files


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _base_type(choices) -> str:
    from collections import Counter

    counts = Counter(c.target.name for c in choices if c.target != c.source)
    return (counts.most_common(1)[0][0] if counts else "COPY").lower()


# llama-quantize's presets the held-out check measures (those q-psa writes with K-quant bases)
PRESET_NAMES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


def preset_size(gguf_file, name: str, imatrix=None) -> tuple[int, float]:
    """(bytes of all tensors, bits per weight) of the model requantized by llama-quantize's preset
    `name` (with `imatrix`, whose rules it changes for some presets)."""
    choices = choose_types(gguf_file, name, imatrix=imatrix)
    n_bytes = sum(c.n_bytes for c in choices)
    return n_bytes, 8 * n_bytes / sum(c.n_elements for c in choices)


def make_plan(session, qtypes: list[GGMLQuantizationType], target_bpw: float | None, granularity: str, resume: bool,
              measured: Callable[[object], None] = lambda result: None,
              target_preset: str | None = None, estimator: str | None = None, draws: int = 2) -> PlanResult:
    """The budget is `target_bpw`, or with `target_preset` (a llama-quantize preset name) that
    preset's exact size on this model. `measured(result)` is called with each candidate type's
    SensitivityResult as it is finished (the CLI writes its JSON, CSV and plot). Every
    requantization is weighted by `session.imatrix` where there is one. With an `estimator` (a
    predictor of `qpsa.quant.predictors`), only the options that can matter are measured
    (`_estimate_and_measure`); the plan is still checked by measurement on the held-out span."""
    start = time.perf_counter()
    loaded = session.loaded
    gguf_file = loaded.file
    imatrix = session.imatrix
    groups = quant_groups(loaded, granularity)
    if granularity == "expert":
        raise QpsaError("plan needs one type per tensor, and an expert is a slice of its layer's expert tensors: "
                        "use --granularity experts (each layer's experts together) for a mixture-of-experts model")
    n_weights = sum(t.n_elements for t in gguf_file.tensors.values())
    grouped = {n for g in groups for n in g.tensors}
    fixed = sum(t.raw.nbytes for n, t in gguf_file.tensors.items() if n not in grouped)
    preset_choices = {name: choose_types(gguf_file, name, imatrix=imatrix) for name in PRESET_NAMES}
    if target_preset is not None:
        target_preset = preset_named(target_preset).name
        if target_preset not in preset_choices:
            preset_choices[target_preset] = choose_types(gguf_file, target_preset, imatrix=imatrix)
        total_budget = sum(c.n_bytes for c in preset_choices[target_preset])
        target_bpw = 8 * total_budget / n_weights
    else:
        total_budget = int(target_bpw * n_weights / 8)

    options: dict[str, list[Option]] = {}
    types_of: dict[tuple[str, str], dict] = {}
    for g in groups:
        keep = sum(gguf_file.tensors[n].raw.nbytes for n in g.tensors)
        options[g.name] = [Option("keep", keep, 0.0, 0.0)]
        types_of[(g.name, "keep")] = {n: gguf_file.tensors[n].qtype.name for n in g.tensors}
    estimated = None
    if estimator is None:
        for qtype in qtypes:
            result = session.sensitivity(qtype, granularity, resume)
            measured(result)
            for row in result.rows:
                options[row.group.name].append(Option(qtype.name, row.bytes, row.stats.kld, row.stats.kld_se))
                types_of[(row.group.name, qtype.name)] = row.types
    else:
        for qtype in qtypes:
            for g in groups:
                size = group_size(loaded, g, qtype)
                options[g.name].append(Option(qtype.name, size["bytes"], math.nan, math.nan, measured=False))
                types_of[(g.name, qtype.name)] = size["types"]

    lo = fixed + sum(min(o.bytes for o in opts) for opts in options.values())
    hi = fixed + sum(max(o.bytes for o in opts) for opts in options.values())
    lo_bpw, hi_bpw = 8 * lo / n_weights, 8 * hi / n_weights
    if not lo <= total_budget <= hi:
        what = f"--target-preset {target_preset} ({target_bpw:.3f} bits per weight)" if target_preset else \
            f"--target-bpw {target_bpw}"
        raise QpsaError(f"{what} is outside what these types can reach for this model: "
                        f"{lo_bpw:.3f} to {hi_bpw:.3f} bits per weight")
    if estimator is not None:
        estimated = _estimate_and_measure(session, groups, qtypes, granularity, resume, options, total_budget - fixed,
                                          estimator, draws)
    chosen, predicted = choose_mixture(options, total_budget - fixed)

    tensor_types: dict[str, str] = {}
    group_rows = []
    for g in groups:
        o = chosen[g.name]
        tensor_types.update(types_of[(g.name, o.qtype)])
        group_rows.append({"group": g.name, "type": o.qtype, "bytes": o.bytes, "predicted_kld": o.kld,
                           "predicted_kld_se": o.kld_se,
                           "options": [{"type": x.qtype, "bytes": x.bytes, "kld": x.kld, "kld_se": x.kld_se,
                                        "measured": x.measured} for x in options[g.name]]})
    choices = _exact_choices(gguf_file, tensor_types)

    # check on the held-out span
    with session.progress.task("held-out reference pass", session.held_out.tokens.shape[0]) as advance:
        held = Reference(loaded.model, session.held_out, advance)
    plan_measured = _measure(held, loaded, choices, "plan", imatrix)
    plan_measured.predicted_kld = predicted
    plan_measured.predicted_kld_se = sum(o.kld_se**2 for o in chosen.values()) ** 0.5
    plan_bytes = sum(c.n_bytes for c in choices)
    sizes = [(sum(c.n_bytes for c in uc), f"uniform {qtype.name}", uc)
             for qtype in qtypes for uc in [choose_types(gguf_file, qtype, fallback=True, imatrix=imatrix)]]
    # every preset and uniform type that fits the budget (the fallback's candidates), the presets within
    # the candidates' range, and the nearest of each above the budget and around the plan's size
    preset_sizes = sorted(((sum(c.n_bytes for c in pc), name, pc) for name, pc in preset_choices.items()),
                          key=lambda r: r[0])
    picked = [r for r in preset_sizes if lo <= r[0] <= hi or r[0] <= total_budget or r in _nearest(preset_sizes, total_budget)]
    picked += [r for r in sizes if r[0] <= total_budget or r in _nearest(sizes, plan_bytes) + _nearest(sizes, total_budget)]
    checked = {label: (_measure(held, loaded, c, label, imatrix), c) for _, label, c in picked}
    uniform = [m for m, _ in checked.values() if m.label.startswith("uniform ")]
    presets = [m for m, _ in checked.values() if not m.label.startswith("uniform ")]

    result = PlanResult(loaded.name, gguf_file.path, target_bpw, granularity, [t.name for t in qtypes], group_rows,
                        choices, plan_measured, uniform, presets, time.perf_counter() - start, target_preset,
                        total_budget, None, None if imatrix is None else session.header()["imatrix"], estimated,
                        gguf_file, imatrix)
    # never worse than what llama-quantize gives at the same or a smaller size
    fitting = [m for m in presets + uniform if m.n_bytes <= total_budget]
    best = min(fitting, key=lambda m: m.stats.kld, default=None)
    if best is not None and best.stats.kld < plan_measured.stats.kld:
        log.warning("%s measured a lower held-out KLD than the plan (%.4g vs %.4g): falling back to it",
                    best.label, best.stats.kld, plan_measured.stats.kld)
        result.fallback = {"label": best.label, "kld": best.stats.kld, "kld_se": best.stats.kld_se,
                           "plan_kld": plan_measured.stats.kld, "bytes": best.n_bytes}
        result.choices = checked[best.label][1]
        result._base = best.label.lower() if best in presets else None
    result.expert_usage = session.reference().expert_usage
    result.seconds = time.perf_counter() - start
    return result


MAX_ROUNDS = 6  # estimator: rounds of measuring the options the choice rests on


def _estimate_and_measure(session, groups, qtypes, granularity: str, resume: bool, options: dict[str, list[Option]],
                          budget: int, estimator: str, draws: int) -> dict:
    """Fill `options` with the estimator's predictions, then measure only what the choice rests on.

    Each round chooses with the current numbers (measured where measured; predicted ones scaled by
    the median ratio measured/predicted of the options measured so far), then measures, in every
    group, the chosen option and its neighbours in size (the options the dynamic programme trades
    it against). It stops when a round's choice and its neighbours are all measured."""
    import numpy as np

    from qpsa.quant.predictors import Predictors, check_model, check_predictor

    check_predictor(estimator)
    check_model(session.loaded)
    start = time.perf_counter()
    ref = session.reference()
    pred = Predictors(session.loaded, session.windows, session.reference_seconds or math.nan, session.imatrix, draws,
                      progress=session.progress)
    error_sets = {t.name: pred.errors(groups, t) for t in qtypes}
    guess = {t.name: pred.predict(estimator, groups, t, error_sets) for t in qtypes}
    del ref
    predict_seconds = time.perf_counter() - start
    done: set[tuple[str, str]] = set()
    scale, rounds = 1.0, 0
    # options the predictor has no value for (e.g. Q-PSA on the embedding) are measured from the start
    want: dict[str, set[str]] = {}
    for g, opts in options.items():
        for o in opts:
            if o.qtype != "keep" and not math.isfinite(guess[o.qtype].values.get(g, math.nan)):
                want.setdefault(o.qtype, set()).add(g)
    for rounds in range(1, MAX_ROUNDS + 1):
        for qname, names in want.items():
            result = session.sensitivity(qtype_named(qname), granularity, resume, only=names)
            for row in result.rows:
                done.add((row.group.name, qname))
                opts = options[row.group.name]
                k = next(i for i, x in enumerate(opts) if x.qtype == qname)
                opts[k] = Option(qname, row.bytes, row.stats.kld, row.stats.kld_se, measured=True)
        ratios = [o.kld / guess[o.qtype].values[g] for g, opts in options.items() for o in opts
                  if o.measured and o.qtype != "keep" and guess[o.qtype].values.get(g, 0) > 0 and o.kld > 0]
        scale = float(np.median(ratios)) if ratios else 1.0
        for g, opts in options.items():
            for k, o in enumerate(opts):
                if not o.measured:
                    p = guess[o.qtype]
                    opts[k] = Option(o.qtype, o.bytes, scale * abs(p.values[g]), scale * p.se.get(g, math.nan),
                                     measured=False)
        chosen, _ = choose_mixture(options, budget)
        want = {}
        for g, o in chosen.items():
            by_size = sorted(options[g], key=lambda x: x.bytes)
            k = next(i for i, x in enumerate(by_size) if x is o)
            for x in by_size[max(k - 1, 0) : k + 2]:
                if not x.measured:
                    want.setdefault(x.qtype, set()).add(g)
        if not want:
            break
    total = sum(len(opts) - 1 for opts in options.values())
    return {"predictor": estimator, "draws": draws, "measured": len(done), "options": total, "rounds": rounds,
            "scale": scale, "predict_seconds": predict_seconds, "seconds": time.perf_counter() - start,
            "predictor_cost": {k: v for k, v in pred.cost.items()}}


def _nearest(sized: list[tuple], n_bytes: int) -> list[tuple]:
    """Of (bytes, …) entries, the smallest at least `n_bytes` and the largest below it."""
    above = [s for s in sized if s[0] >= n_bytes]
    below = [s for s in sized if s[0] < n_bytes]
    return ([min(above, key=lambda s: s[0])] if above else []) + ([max(below, key=lambda s: s[0])] if below else [])


def _exact_choices(gguf_file, tensor_types: dict[str, str]) -> list[TensorChoice]:
    """Every tensor of the file with the planned type (others as they are)."""
    choices = []
    for name, t in gguf_file.tensors.items():
        target = qtype_named(tensor_types[name]) if name in tensor_types else t.qtype
        why = "plan" if target != t.qtype else ("not quantized" if not is_quantizable(name, t.shape) else "kept")
        choices.append(TensorChoice(name, t.shape, t.qtype, target, why))
    return choices


def _measure(ref: Reference, loaded, choices: list[TensorChoice], label: str, imatrix=None) -> Measured:
    """The model with every tensor in its chosen type (weighted by `imatrix` where it has an entry),
    against the unmodified one on `ref`'s windows."""
    import numpy as np

    from qpsa.gguf.quants import dequantize

    changed = [c for c in choices if c.target != c.source]
    values = {}
    for name, qtype, shape, raw in requantized_tensors(loaded.file, changed, imatrix=imatrix, cached=True):
        values[name] = dequantize(np.asarray(raw), qtype, shape)
    stats = ref.measure(values, 0)
    n_bytes = sum(c.n_bytes for c in choices)
    n_weights = sum(c.n_elements for c in choices)
    return Measured(label, 8 * n_bytes / n_weights, n_bytes, stats)
