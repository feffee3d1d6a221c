"""What quantizing each part of a model costs: KL divergence and perplexity against the unmodified model.

    ref = Reference(loaded.model, windows)                   # one pass of the unmodified model, cached
    groups = quant_groups(loaded, "layer")                   # layers (and the embedding / output head)
    stats = ref.measure(requantized_values(loaded, groups[3], Q.Q4_0), groups[3].first_layer)

`Reference` runs the unmodified model once over the windows (llama.cpp's perplexity protocol: the
second half of each window is scored) and keeps the hidden state entering every layer and the
log-probabilities of every scored position. A variant that changes only layer i's weights then
costs layers i … L−1 and the output head: its weights are written into the model in place, the
layers from i on are re-run from the cached state, and the originals are put back.

Per variant, over the scored tokens:

* KLD: KL(P_base ‖ P_variant) of the next-token distributions, Σ_v p_base·(ln p_base − ln p_variant),
  summed in float64 over log-probabilities computed in float64 and stored rounded to float32 (the
  base's are kept that way: 4 bytes per vocabulary entry and scored token). A model identical to
  the base gets exactly 0; the rounding leaves a noise floor of about 1e-9 nats per token on the
  mean, far below what requantizing even one tensor to Q8_0 causes (1e-5 and up on SmolLM2);
* ΔNLL: the paired difference of token NLLs, whose mean is ln PPL_variant − ln PPL_base, with the
  standard error of that mean (paired, so much smaller than either PPL's own ±);
* same top: % of positions whose most likely token is unchanged.

Every mean comes with its standard error over tokens (which treats tokens as independent, as
llama.cpp does; neighbouring tokens are correlated, so it understates the uncertainty somewhat).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qpsa.eval.perplexity import Windows
from qpsa.model.moe import RouterUsage
from qpsa.model.transformer import Transformer
from qpsa.progress import Advance, no_progress
from qpsa.quant.groups import GRANULARITIES, QuantGroup, quant_groups  # noqa: F401 (re-exported)
from qpsa.quant.requantize import FALLBACK, REQUANTIZED
from qpsa.stats import mean_se

Q = GGMLQuantizationType


def fitted_type(row: int, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """qtype, or llama-quantize's fallback where its blocks do not divide the row length."""
    if row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    new = FALLBACK.get(qtype, Q.F16)
    return new if row % GGML_QUANT_SIZES[new][0] == 0 else Q.F16


def group_variant(loaded, group: QuantGroup, qtype: GGMLQuantizationType,
                  imatrix=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The group's weights requantized to qtype (fallback types where rows do not fit; with an
    `imatrix`, weighted by it as llama-quantize --imatrix): new float32 values by tensor name, and
    {"bytes", "bytes_before", "types"} of the group (`group_size`)."""
    from qpsa.gguf.quants import dequantize

    values = {}
    for name in group.tensors:
        t = loaded.file.tensors[name]
        target = fitted_type(t.shape[-1], qtype)
        if target == t.qtype:
            continue  # the same bytes: unchanged values
        if group.expert is None:
            raw = REQUANTIZED.raw(loaded.file, name, target, imatrix)
            values[name] = dequantize(raw, target, t.shape)
        else:  # that expert's matrix requantized, with its own imatrix row where there is one
            whole = t.to_torch()
            raw = _expert_raw(name, whole[group.expert].numpy(), group.expert, target, imatrix)
            whole[group.expert] = dequantize(raw, target, t.shape[1:])
            values[name] = whole
    return values, group_size(loaded, group, qtype)


def group_size(loaded, group: QuantGroup, qtype: GGMLQuantizationType) -> dict:
    """{"bytes", "bytes_before", "types"} of the group requantized to qtype (fallbacks included)."""
    n_bytes, n_before, types = 0, 0, {}
    for name in group.tensors:
        t = loaded.file.tensors[name]
        target = fitted_type(t.shape[-1], qtype)
        block, size = GGML_QUANT_SIZES[target]
        share = t.shape[0] if group.expert is not None else 1  # one expert: its share of the stacked tensor
        n_bytes += t.n_elements // share // block * size
        n_before += t.raw.nbytes // share
        types[name] = target.name
    return {"bytes": n_bytes, "bytes_before": n_before, "types": types}


def _expert_raw(name: str, values: np.ndarray, expert: int, qtype, imatrix) -> np.ndarray:
    from qpsa.gguf.quants import quantize

    n = values.shape[-1]
    weights = None
    if imatrix is not None and name in imatrix.in_sum2:
        weights = imatrix.mean(name).reshape(-1, n)[expert]
    return quantize(values.reshape(-1, n), qtype, weights).reshape(-1)


@dataclass
class VariantStats:
    n_tokens: int
    kld: float  # mean KL(base ‖ variant), nats per token
    kld_se: float
    kld_p99: float
    kld_max: float
    dnll: float  # mean NLL_variant − NLL_base = ln(PPL_variant / PPL_base)
    dnll_se: float
    ppl: float
    ppl_base: float
    same_top: float  # fraction of positions with the same most likely token
    same_top_se: float

    @property
    def dppl(self) -> float:
        return self.ppl - self.ppl_base

    def to_dict(self) -> dict:
        return {**asdict(self), "dppl": self.dppl}


class Reference:
    """The unmodified model over `windows`: states entering every layer and scored log-probabilities."""

    def __init__(self, model: Transformer, windows: Windows, advance: Advance = no_progress):
        self.model = model
        self.windows = windows
        n, T = windows.tokens.shape
        self.positions = torch.arange(T)
        self.states: list[list[torch.Tensor]] = []  # [window][layer] (1, T, C)
        self.logp: list[torch.Tensor] = []  # [window] (S, V) float32 log-probabilities
        self.top: list[torch.Tensor] = []  # [window] (S,) argmax
        # an MoE model's router usage over the windows (every position, as the router sees them)
        usage = RouterUsage(model.config) if model.config.n_expert else None
        previous = model.route_observer
        if usage is not None:
            model.route_observer = usage
        nll = []
        try:
            with torch.inference_mode():
                for w in range(n):
                    h = model.embed(windows.tokens[w : w + 1])
                    states = [h]
                    for i in range(model.config.n_layer):
                        h = model.block(i, h, self.positions)
                        states.append(h)
                    self.states.append(states)
                    logp = self._log_probs(h)
                    self.logp.append(logp.float())
                    self.top.append(logp.argmax(-1))
                    nll.append(-logp.gather(-1, self._targets(w))[:, 0])
                    advance()
        finally:
            model.route_observer = previous
        self.expert_usage = None if usage is None else usage.to_dict()
        self.nll = torch.cat(nll).cpu().numpy()  # (n·S,) float64
        self.ppl = math.exp(float(self.nll.mean()))

    def _targets(self, w: int) -> torch.Tensor:
        return self.windows.tokens[w, self.windows.score_from + 1 :, None]  # (S, 1)

    def _log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """float64 log-softmax of the scored positions' logits, (S, V)."""
        logits = self.model.logits(h[:, self.windows.score_from : -1])[0]
        return torch.log_softmax(logits.double(), dim=-1)

    def measure(self, values: dict[str, torch.Tensor], first_layer: int) -> VariantStats:
        """Statistics of the model with `values` written over its weights (restored afterwards);
        only layers from `first_layer` on are re-run."""
        if not values:  # nothing changes: the base itself, exactly
            return self.identity()
        weights = self.model.weights
        saved = {name: weights[name].clone() for name in values}
        try:
            for name, v in values.items():
                weights[name].copy_(v)
            kld, nll, same = [], [], []
            with torch.inference_mode():
                for w, states in enumerate(self.states):
                    if first_layer == 0:
                        h = self.model.embed(self.windows.tokens[w : w + 1])
                    else:
                        h = states[first_layer]
                    h = self.model.run_layers(h, range(first_layer, self.model.config.n_layer), self.positions)
                    logp = self._log_probs(h)
                    base = self.logp[w].double()
                    stored = logp.float().double()  # rounded as the base was, so an identical model gives 0
                    kld.append((base.exp() * (base - stored)).sum(-1))
                    nll.append(-logp.gather(-1, self._targets(w))[:, 0])
                    same.append((logp.argmax(-1) == self.top[w]).double())
        finally:
            for name, v in saved.items():
                weights[name].copy_(v)
            weights.release(saved)  # restored to the file's values: on demand, the layers need not stay
        kld = torch.cat(kld).cpu().numpy()
        nll = torch.cat(nll).cpu().numpy()
        same = torch.cat(same).cpu().numpy()
        dnll, dnll_se = mean_se(nll - self.nll)
        kmean, kse = mean_se(kld)
        smean, sse = mean_se(same)
        return VariantStats(
            n_tokens=kld.size, kld=kmean, kld_se=kse, kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()),
            dnll=dnll, dnll_se=dnll_se, ppl=math.exp(float(nll.mean())), ppl_base=self.ppl, same_top=smean,
            same_top_se=sse,
        )


    def identity(self) -> VariantStats:
        n = self.nll.size
        return VariantStats(n_tokens=n, kld=0.0, kld_se=0.0, kld_p99=0.0, kld_max=0.0, dnll=0.0, dnll_se=0.0,
                            ppl=self.ppl, ppl_base=self.ppl, same_top=1.0, same_top_se=0.0)


@dataclass
class SensitivityRow:
    group: QuantGroup
    qtype: str
    bytes: int  # the group's tensor data at the new type
    bytes_before: int
    types: dict  # tensor -> type actually written (fallbacks included)
    stats: VariantStats
    seconds: float

    @property
    def bits_saved(self) -> int:
        return 8 * (self.bytes_before - self.bytes)

    def to_dict(self) -> dict:
        return {"group": self.group.to_dict(), "type": self.qtype, "bytes": self.bytes,
                "bytes_before": self.bytes_before, "types": self.types, **self.stats.to_dict(),
                "seconds": self.seconds}


@dataclass
class SensitivityResult:
    qtype: str
    granularity: str
    rows: list[SensitivityRow] = field(default_factory=list)
    ppl_base: float = 0.0
    n_tokens: int = 0
    seconds: float = 0.0
    expert_usage: dict | None = None  # an MoE model's router usage on the measured windows (RouterUsage.to_dict)
    execution: dict | None = None  # where the groups ran (qpsa.parallel): backend, workers, per-unit timings

    def to_dict(self) -> dict:
        d = {"type": self.qtype, "granularity": self.granularity, "ppl_base": self.ppl_base,
             "n_tokens": self.n_tokens, "seconds": self.seconds, "execution": self.execution,
             "rows": [r.to_dict() for r in self.rows]}
        if self.expert_usage is not None:
            d["expert_usage"] = self.expert_usage
        return d


def run_sensitivity(
    loaded, ref: Reference, qtype: GGMLQuantizationType, groups: list[QuantGroup],
    done: dict[str, SensitivityRow] | None = None, on_row: Callable[[SensitivityRow], None] | None = None,
    measured: dict | None = None, imatrix=None, executor=None,
) -> SensitivityResult:
    """Requantize each group alone to qtype and measure it against the reference; rows already in
    `done` (by group name, from a checkpoint) are taken as they are. `on_row` sees each new row as
    it is finished. `measured` (shared across calls) remembers statistics by the exact types a
    group's tensors got, so a type that falls back to one already measured (Q6_K -> Q8_0 on rows of
    576) costs nothing. With an `imatrix` (`qpsa.quant.imatrix.Imatrix`), every group is
    requantized with its weights. `executor` (`qpsa.parallel`; default: this process) runs the
    groups, one unit each; the rows come back in group order whatever order they finish in."""
    import time

    from qpsa.parallel import LocalExecutor

    start = time.perf_counter()
    result = SensitivityResult(qtype.name, "", ppl_base=ref.ppl, n_tokens=ref.nll.size,
                               expert_usage=getattr(ref, "expert_usage", None))
    rows: dict[str, SensitivityRow] = {}
    todo: dict[str, tuple[QuantGroup, GGMLQuantizationType]] = {}
    by_name = {g.name: g for g in groups}
    for group in groups:
        if done and group.name in done:
            rows[group.name] = done[group.name]
            continue
        key = _measured_key(loaded, group, qtype)
        if measured is not None and key in measured:
            stats, info = measured[key]
            rows[group.name] = row = SensitivityRow(group, qtype.name, info["bytes"], info["bytes_before"],
                                                    info["types"], stats, 0.0)
            if on_row:
                on_row(row)
            continue
        todo[f"{qtype.name}/{group.name}"] = (group, qtype)

    def finished(key: str, measured_group) -> None:
        stats, info, seconds = measured_group
        name = key.split("/", 1)[1]
        group = by_name[name]
        if measured is not None:
            measured[_measured_key(loaded, group, qtype)] = (stats, info)
        rows[name] = row = SensitivityRow(group, qtype.name, info["bytes"], info["bytes_before"], info["types"],
                                          stats, seconds)
        if on_row:
            on_row(row)

    (executor or LocalExecutor(loaded)).run(reference_job(loaded, ref, imatrix), todo, finished)
    result.rows = [rows[g.name] for g in groups]
    result.seconds = time.perf_counter() - start
    return result


def _measured_key(loaded, group: QuantGroup, qtype: GGMLQuantizationType) -> tuple:
    return group.name, tuple(fitted_type(loaded.file.tensors[n].shape[-1], qtype) for n in group.tensors)


def reference_job(loaded, ref: Reference, imatrix=None):
    """The `qpsa.parallel.Job` of measuring groups against `ref` (one per reference, so workers
    build their reference once for every type a plan measures)."""
    from qpsa.parallel import Job

    job = getattr(ref, "_job", None)
    if job is None:
        job = Job("qpsa.quant.sensitivity:setup_reference", "qpsa.quant.sensitivity:measure_group",
                  {"windows": ref.windows, "imatrix": imatrix}, str(ref.model.dtype).removeprefix("torch."),
                  load=loaded.model.load_options, local_state=(loaded, ref, imatrix))
        ref._job = job
    return job


def setup_reference(loaded, args: dict):
    """A worker's state for `measure_group`: the model, its reference pass, the imatrix."""
    return loaded, Reference(loaded.model, args["windows"]), args["imatrix"]


def measure_group(state, unit) -> tuple[VariantStats, dict, float]:
    """One unit of a sensitivity run: the group requantized to the type, measured against the reference."""
    import time

    loaded, ref, imatrix = state
    group, qtype = unit
    t = time.perf_counter()
    values, info = group_variant(loaded, group, qtype, imatrix)
    return ref.measure(values, group.first_layer), info, time.perf_counter() - t


def row_from_dict(d: dict) -> SensitivityRow:
    """A row as `SensitivityRow.to_dict` wrote it (checkpoints and `--sensitivities` files)."""
    fields = VariantStats.__dataclass_fields__
    stats = VariantStats(**{k: d[k] for k in fields})
    return SensitivityRow(QuantGroup(**d["group"]), d["type"], d["bytes"], d["bytes_before"], d["types"], stats,
                          d["seconds"])


# ---- mixed-precision plans ----------------------------------------------------------------------


@dataclass
class Option:
    qtype: str  # a type name, or "keep" for the tensors' present types
    bytes: int
    kld: float  # predicted mean KLD this choice adds
    kld_se: float
    measured: bool = True  # False where the KLD is a predictor's estimate (plan --estimator)


def choose_mixture(options: dict[str, list[Option]], budget: int, resolution: int = 4000) -> tuple[dict[str, Option], float]:
    """One option per group minimizing the summed KLD with summed bytes <= budget.

    Exact for the additive model at a size resolution of budget/`resolution` (sizes are rounded
    up, so the result always fits): a multiple-choice knapsack solved by dynamic programming over
    the budget. Returns (choice per group, predicted total KLD). Where every group's least-KLD
    option fits together (keeping a model whose own size is the budget), that is the answer, exactly:
    the rounding cannot push it out.
    """
    lowest = {g: min(opts, key=lambda o: (o.kld, o.bytes)) for g, opts in options.items()}
    if sum(o.bytes for o in lowest.values()) <= budget:
        return lowest, float(sum(o.kld for o in lowest.values()))
    unit = max(1, budget // resolution)
    cap = budget // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = []
    for group, opts in options.items():
        weights = [-(-o.bytes // unit) for o in opts]
        new = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -1, dtype=np.int16)
        for k, (o, w) in enumerate(zip(opts, weights)):
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + o.kld
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best = new
        picks.append((group, pick, weights))
    c = int(np.argmin(best))
    if not math.isfinite(best[c]):
        from qpsa.errors import QpsaError

        raise QpsaError("no choice of types fits the budget")
    total = float(best[c])
    chosen = {}
    for group, pick, weights in reversed(picks):
        k = int(pick[c])
        chosen[group] = options[group][k]
        c -= weights[k]
    return dict(reversed(list(chosen.items()))), total
