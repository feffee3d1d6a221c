"""Baseline layer-importance methods: what Q-PSA is compared against.

Every method is `method(loaded, tokens, settings, advance) -> LayerScores`, registered by
name in `qpsa.scores.registry`; a higher score means a more important layer. Exact definitions, and what the
uncertainties mean, are in docs/scores.md:

* `layer_ablation`   ΔPPL when the layer is skipped (the residual stream passes through unchanged)
* `weight_norm`      Frobenius norm of the layer's weight matrices together
* `random`           a seeded random permutation (the floor every method must beat)
* `block_influence`  ShortGPT's BI = 1 − mean cos(h_in, h_out) (Men et al. 2024)
* `angular_distance` mean arccos(cos(h_i, h_{i+n}))/π (Gromov et al. 2024)
* `fisher`           Σ over the layer's weights of (∂NLL/∂w · grid step)², from one gradient

The methods that read hidden states share one `LayerStates` (one forward pass), cached for the
last (model, tokens) pair by `layer_states`. `advance(steps=n)` reports work units as they
complete; `work_units(name, config, n_tokens)` is the total, so a caller can draw a progress bar
whose ETA is right (units are roughly one layer's forward over the tokens).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.model.config import DENSE_MATRICES, ModelConfig
from qpsa.model.load import LoadedModel
from qpsa.progress import SILENT, Advance, Progress, no_progress
from qpsa.scores.base import EvalTokens, LayerScores, LayerStates, ScoreSettings, ppl_of, token_nll
from qpsa.scores.registry import find_method, method_names
from qpsa.stats import mean_se

if TYPE_CHECKING:
    from qpsa.scores.results import ScoreRun

# The seven weight matrices of a dense layer in most architectures, as named in GGUF files
# (blk.{i}.{name}.weight); a model's own are ModelConfig.matrices (phi3 has four: attn_qkv, attn_output,
# ffn_up = gate|up, ffn_down; an MoE layer the router and its stacked experts for the FFN), and the fused
# tensors its forward multiplies by ModelConfig.fused_matrices (the per-name entries are views of them).
MATRICES = DENSE_MATRICES
FISHER_GROUPS = 8  # contiguous token groups for the fisher jackknife
ABLATION_BATCH_BYTES = 1 << 30  # activation memory one batch of layer ablations may use
# Most ablations run side by side in one batch. On a 2-core CPU a layer costs 25 ms per element at
# B = 1…4 and 33 ms at B = 30 on SmolLM2-135M with 500 tokens (larger batches fall out of cache).
ABLATION_MAX_BATCH = 4


# ---- shared hidden states ---------------------------------------------------------------------

_cache: dict = {}


def layer_states(loaded: LoadedModel, tokens: EvalTokens, advance: Advance = no_progress) -> LayerStates:
    """The hidden states entering every layer on `tokens`, computed once per (model, tokens).

    Only the last pair is kept (the states of a 500-token window are tens of MB). The key includes
    every weight tensor's identity and in-place version counter, so states computed before a weight
    was changed (in place or by replacing the tensor) are never returned. `advance` gets one step
    per layer when the states are computed, nothing when they come from the cache."""
    model, ids = loaded.model, tokens.tokens
    weights = model.weights.fingerprint()
    ref = _cache.get("model")
    if (ref is not None and ref() is model and _cache["weights"] == weights
            and _cache["tokens"].shape == ids.shape and torch.equal(_cache["tokens"], ids)):
        return _cache["states"]
    _cache.clear()
    states = LayerStates(model, ids, advance)
    _cache.update(model=weakref.ref(model), weights=weights, tokens=ids.clone(), states=states)
    return states


def clear_cache() -> None:
    _cache.clear()


# ---- cost model for progress bars ---------------------------------------------------------------


def _layer_macs(config: ModelConfig, n_tokens: int) -> float:
    c = config
    per_token = c.n_embd * (c.n_head + 2 * c.n_head_kv) * c.head_dim + c.n_head * c.head_dim * c.n_embd
    per_token += 3 * c.n_embd * c.active_ff + c.n_embd * c.n_expert
    per_token += 2 * c.n_head * c.head_dim * n_tokens / 2  # causal attention, on average
    return per_token * n_tokens


def head_units(config: ModelConfig, n_tokens: int) -> int:
    """The output head's cost in layer-forward units, from multiply-add counts (7 on SmolLM2-135M,
    28 on Gemma 3 270M at 500 tokens)."""
    head = config.n_embd * config.vocab_size * n_tokens
    return max(1, round(head / _layer_macs(config, n_tokens)))


def work_units(name: str, config: ModelConfig, n_tokens: int) -> int:
    """Total progress units `name` reports (not counting the shared forward of `layer_states`)."""
    L, head = config.n_layer, head_units(config, n_tokens)
    if name == "layer_ablation":
        return L * (L - 1) // 2 + L * head
    if name == "fisher":
        return sum(_fisher_units(config, n_tokens)) + L
    find_method(name, "baseline")
    return L


# ---- the methods --------------------------------------------------------------------------------


def layer_ablation(loaded: LoadedModel, tokens: EvalTokens, settings: ScoreSettings,
                   advance: Advance = no_progress, executor=None,
                   on_unit: Callable[[str, torch.Tensor], None] | None = None,
                   done: dict[str, torch.Tensor] | None = None) -> LayerScores:
    """score_i = PPL(all layers but i) − PPL(all layers), on the scored tokens.

    Skipping layer i feeds the cached states[i] straight into layer i+1. The ablations run as a
    staggered batch: walking k = a … L−1, the batch first goes through layer k, then the ablation
    of layer k joins it (as states[k], skipping k). Each ablation so costs exactly the L−1−i layers
    after it plus one output head, and the layer matmuls see B·T rows at once.

    One batch of layers a … b−1 is one unit (`ablation_units`), run by `executor` (`qpsa.parallel`;
    default this process): the batches are the same wherever they run, so the numbers are too.
    `done` holds units already finished (by key, from a checkpoint); `on_unit(key, nll)` sees each
    new one as it finishes.
    """
    from qpsa.parallel import Job, LocalExecutor

    start = time.perf_counter()
    model, cfg = loaded.model, loaded.config
    L, T = cfg.n_layer, tokens.tokens.shape[1]
    states = layer_states(loaded, tokens)
    base = states.base_nll.double()  # (N,)
    n = base.numel()
    units, chunk = ablation_units(cfg, T)
    nll = torch.empty(L, n, dtype=torch.float64)
    finished = dict(done or {})

    def on_result(key: str, rows: torch.Tensor) -> None:
        finished[key] = rows
        if on_unit:
            on_unit(key, rows)
        a, b = units[key]
        advance(f"layers {a}-{b - 1}", steps=ablation_steps(cfg, T, a, b))

    for key, (a, b) in units.items():
        if key in finished:
            advance(steps=ablation_steps(cfg, T, a, b))
    job = Job("qpsa.scores.baselines:setup_ablation", "qpsa.scores.baselines:ablate_layers",
              {"tokens": tokens.tokens}, str(model.dtype).removeprefix("torch."),
              load=model.load_options, local_state=(model, states))
    executor = executor or LocalExecutor(loaded)
    executor.run(job, {k: u for k, u in units.items() if k not in finished}, on_result)
    for key, (a, b) in units.items():
        nll[a:b] = finished[key]
    base_ppl = ppl_of(base)
    delta = nll - base  # (L, N) paired per-token differences
    dnll = delta.mean(dim=1)
    _, se_dnll = mean_se(delta, dim=1)
    ppl = [ppl_of(nll[i]) for i in range(L)]
    scores = [p - base_ppl for p in ppl]
    # delta method: ΔPPL = PPL_base·(exp(ΔNLL) − 1), d/dΔNLL = PPL_base·exp(ΔNLL) = PPL_ablated
    unc = [ppl[i] * float(se_dnll[i]) for i in range(L)]
    details = {"base_ppl": base_ppl, "ppl": ppl, "delta_nll": dnll.tolist(), "se_delta_nll": se_dnll.tolist(),
               "batch": chunk, "execution": executor.describe()}
    return LayerScores("layer_ablation", scores, unc, "ΔPPL when the layer is skipped",
                       time.perf_counter() - start, details)


def ablation_units(cfg: ModelConfig, n_tokens: int) -> tuple[dict[str, tuple[int, int]], int]:
    """The ablation batches, {"a-b": (a, b + 1)} for layers a … b, and the batch size."""
    L = cfg.n_layer
    per_element = n_tokens * 4 * (6 * cfg.n_embd + (cfg.n_head + 2 * cfg.n_head_kv) * cfg.head_dim + 4 * cfg.active_ff)
    chunk = max(1, min(L, ABLATION_MAX_BATCH, ABLATION_BATCH_BYTES // per_element))
    return {f"{a}-{min(L, a + chunk) - 1}": (a, min(L, a + chunk)) for a in range(0, L, chunk)}, chunk


def ablation_steps(cfg: ModelConfig, n_tokens: int, a: int, b: int) -> int:
    """Progress units of the batch a … b−1: the layers it runs, one per element, and its heads."""
    return sum(min(k, b) - a for k in range(a + 1, cfg.n_layer)) + (b - a) * head_units(cfg, n_tokens)


def setup_ablation(loaded: LoadedModel, args: dict):
    """A worker's state for `ablate_layers`: the model and the hidden states entering every layer."""
    return loaded.model, LayerStates(loaded.model, args["tokens"])


def ablate_layers(state, unit: tuple[int, int]) -> torch.Tensor:
    """One unit of layer ablation: the token NLLs (b − a, N) float64 with each of layers a … b−1 skipped."""
    model, states = state
    a, b = unit
    L = model.config.n_layer
    with torch.inference_mode():
        h = None
        for k in range(a, L):
            if h is not None:
                h = model.block(k, h, states.positions)
            if k < b:  # the ablation of layer k enters layer k+1 with the state that entered k
                h = states.states[k] if h is None else torch.cat([h, states.states[k]])
        # on the CPU: the result may travel back from a Ray worker
        return torch.stack([token_nll(model, h[j : j + 1], states.tokens)[0].double() for j in range(b - a)]).cpu()


def weight_norm(loaded: LoadedModel, tokens: EvalTokens, settings: ScoreSettings,
                advance: Advance = no_progress) -> LayerScores:
    """score_i = sqrt(Σ over the dequantized matrices of Σ w²): one Frobenius norm of them all (an MoE
    layer's: the router and every expert)."""
    start = time.perf_counter()
    matrices = loaded.config.matrices
    scores, per_matrix = [], {m: [] for m in matrices}
    for i in range(loaded.config.n_layer):
        total = 0.0
        w = loaded.model.weights.layer(i)  # the forward's access: on a large model, nothing is kept
        for m in matrices:
            sq = float(w[f"blk.{i}.{m}.weight"].double().square().sum())
            per_matrix[m].append(math.sqrt(sq))
            total += sq
        scores.append(math.sqrt(total))
        advance(steps=1)
    return LayerScores("weight_norm", scores, [None] * len(scores),
                       f"Frobenius norm of the {len(matrices)} dequantized weight matrices together",
                       time.perf_counter() - start, {"per_matrix": per_matrix})


def random_scores(loaded: LoadedModel, tokens: EvalTokens, settings: ScoreSettings,
                  advance: Advance = no_progress) -> LayerScores:
    """score_i = perm[i] for perm = numpy.random.default_rng(seed).permutation(L)."""
    start = time.perf_counter()
    L = loaded.config.n_layer
    perm = np.random.default_rng(settings.seed).permutation(L)
    advance(steps=L)
    return LayerScores("random", [float(x) for x in perm], [None] * L,
                       "random rank (0 = least important), numpy default_rng(seed).permutation",
                       time.perf_counter() - start, {"seed": settings.seed})


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    """(1, T, C) -> (T, C) float64 rows of unit length."""
    x = h[0].double()
    return x / x.norm(dim=-1, keepdim=True)


def block_influence(loaded: LoadedModel, tokens: EvalTokens, settings: ScoreSettings,
                    advance: Advance = no_progress) -> LayerScores:
    """BI_i = 1 − mean over the T positions of cos(states[i], states[i+1]) (ShortGPT)."""
    start = time.perf_counter()
    states = layer_states(loaded, tokens)
    scores, unc = [], []
    for i in range(loaded.config.n_layer):
        # 1 − cos(x, y) = ½‖x̂ − ŷ‖², exact for unit vectors and exactly 0 when x = y
        one_minus_cos = 0.5 * (_unit_rows(states.states[i]) - _unit_rows(states.states[i + 1])).square().sum(-1)
        scores.append(float(one_minus_cos.mean()))
        unc.append(mean_se(one_minus_cos)[1])
        advance(steps=1)
    return LayerScores("block_influence", scores, unc, "1 − mean cos(h_in, h_out) over tokens",
                       time.perf_counter() - start, {"positions": int(tokens.tokens.shape[1])})


def angular_distance(loaded: LoadedModel, tokens: EvalTokens, settings: ScoreSettings,
                     advance: Advance = no_progress) -> LayerScores:
    """d_i = mean over the T positions of arccos(cos(states[i], states[min(i+n, L)]))/π (Gromov et al.).

    Layers with i + n > L compare against the final state states[L] (a shorter span; `details.span`
    says how many layers each score spans)."""
    start = time.perf_counter()
    L, n = loaded.config.n_layer, settings.angular_n
    if not 1 <= n <= L:
        raise QpsaError(f"--n must be between 1 and the number of layers ({L}); got {n}")
    states = layer_states(loaded, tokens)
    scores, unc, span = [], [], []
    for i in range(L):
        j = min(i + n, L)
        x, y = _unit_rows(states.states[i]), _unit_rows(states.states[j])
        # the angle between unit vectors, 2·atan2(‖x̂−ŷ‖, ‖x̂+ŷ‖): accurate near 0, unlike arccos
        angle = 2 * torch.atan2((x - y).norm(dim=-1), (x + y).norm(dim=-1)) / math.pi
        scores.append(float(angle.mean()))
        unc.append(mean_se(angle)[1])
        span.append(j - i)
        advance(steps=1)
    return LayerScores("angular_distance", scores, unc, f"mean arccos(cos(h_i, h_i+{n}))/π over tokens",
                       time.perf_counter() - start, {"n": n, "span": span, "positions": int(tokens.tokens.shape[1])})


def _fisher_plan(n_tokens: int) -> tuple[int, list[int], list[int]]:
    """(K, group bounds over the N = T−1 scored tokens, prefix length of each gradient pass).

    The first pass is the full window (the gradient of all N tokens); then group k < K−1 needs
    only the first bounds[k+1] + 1 tokens (its NLLs depend on no later position); the last
    group's gradient is the full one minus the others and costs no pass."""
    n = n_tokens - 1
    K = max(1, min(FISHER_GROUPS, n))
    bounds = [round(k * n / K) for k in range(K + 1)]
    return K, bounds, [n_tokens] + [bounds[k + 1] + 1 for k in range(K - 1)]


def _fisher_units(config: ModelConfig, n_tokens: int) -> list[int]:
    """Progress units of each gradient pass (forward L + head, backward about 2L + head)."""
    per_pass = 3 * config.n_layer + 2 * head_units(config, n_tokens)
    return [max(1, round(per_pass * p / n_tokens)) for p in _fisher_plan(n_tokens)[2]]


def fisher(loaded: LoadedModel, tokens: EvalTokens, settings: ScoreSettings,
           advance: Advance = no_progress) -> LayerScores:
    """score_i = Σ over the layer's matrices (an MoE layer's router and every expert's), over every
    weight w, of (g_w · step_w)².

    g = ∂(Σ of the N scored tokens' NLL)/∂w at the model's weights, step_w the weight's
    quantization grid step (signed, squared away). Uncertainty: delete-one-group jackknife over
    FISHER_GROUPS contiguous token groups (see docs/scores.md)."""
    start = time.perf_counter()
    model, cfg = loaded.model, loaded.config
    L, ids = cfg.n_layer, tokens.tokens
    T = ids.shape[1]
    K, bounds, prefixes = _fisher_plan(T)
    units = _fisher_units(cfg, T)
    n = T - 1
    matrices = cfg.matrices
    names = [f"blk.{i}.{f}.weight" for i in range(L) for f in cfg.fused_matrices]
    params = [model.weights[nm] for nm in names]
    was = [p.requires_grad for p in params]

    def gradient(pass_index: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """∂(Σ nll[lo:hi])/∂(fused weights), from a forward over the first P tokens only."""
        P = prefixes[pass_index]
        with torch.inference_mode(False), torch.enable_grad():
            h = model.run_layers(model.embed(ids[:, :P]), range(L), torch.arange(P))
            loss = token_nll(model, h, ids[:, :P])[0, lo:hi].sum()
            g = torch.autograd.grad(loss, params)
        advance(steps=units[pass_index])
        return dict(zip(names, g))

    try:
        for p in params:
            p.requires_grad_(True)
        full = gradient(0, 0, n)
        # per matrix: the grid step s, u = g·s for the full gradient, and the running sum of the
        # groups' g·s (the last group's is then u minus that sum)
        mats = {}
        for i in range(L):
            for m in matrices:
                name = f"blk.{i}.{m}.weight"
                fused, row = model.fused_rows(i, m)
                rows = model.weights[name].shape[-2]  # an expert tensor's rows within each expert
                rec = loaded.file.tensors[name]
                _, s = rec.grid().decode(rec.blocks)
                s = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32).reshape(rec.shape))
                u = full[f"blk.{i}.{fused}.weight"].narrow(-2, row, rows) * s
                mats[(i, m)] = {"fused": f"blk.{i}.{fused}.weight", "row": row, "rows": rows, "step": s, "u": u,
                                "A": float(u.square().sum(dtype=torch.float64)), "B": [], "C": [],
                                "sum": torch.zeros_like(u)}
            advance(steps=1)
        del full
        for k in range(K):
            g = gradient(k + 1, bounds[k], bounds[k + 1]) if k < K - 1 else None
            for d in mats.values():
                if g is None:
                    v = d["u"] - d["sum"]
                else:
                    v = g[d["fused"]].narrow(-2, d["row"], d["rows"]) * d["step"]
                    d["sum"] += v
                d["B"].append(float((d["u"] * v).sum(dtype=torch.float64)))
                d["C"].append(float(v.square().sum(dtype=torch.float64)))
            del g
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)

    sizes = [bounds[k + 1] - bounds[k] for k in range(K)]
    scores, unc = [], []
    per_matrix = {m: [] for m in matrices}
    for i in range(L):
        for m in matrices:
            per_matrix[m].append(mats[(i, m)]["A"])
        scores.append(sum(mats[(i, m)]["A"] for m in matrices))
        if K < 2:
            unc.append(None)
            continue
        # jackknife of θ = Σ (ḡ·s)², ḡ the mean gradient per scored token, so S = N²·θ; leaving
        # group k out, Σ ((G − g_k)·s)² = A − 2·B_k + C_k over N − N_k tokens
        theta = np.array([sum(mats[(i, m)]["A"] - 2 * mats[(i, m)]["B"][k] + mats[(i, m)]["C"][k] for m in matrices)
                          / (n - sizes[k]) ** 2 for k in range(K)])
        unc.append(float(n**2 * math.sqrt((K - 1) / K * np.square(theta - theta.mean()).sum())))
    details = {"per_matrix": per_matrix, "groups": K, "group_tokens": sizes,
               "uncertainty": "delete-one-group jackknife over contiguous token groups",
               "gradient_of": "sum of the scored tokens' NLL"}
    return LayerScores("fisher", scores, unc, "Σ (∂NLL_total/∂w · grid step)² over the layer's weights (nats²)",
                       time.perf_counter() - start, details)


def _save_unit(checkpoint, key: str, rows: torch.Tensor) -> None:
    checkpoint.units[key] = rows.tolist()
    checkpoint.save()


def check_methods(names: list[str]) -> list[str]:
    """The names, deduplicated in order; QpsaError listing the known ones for an unknown name."""
    out = list(dict.fromkeys(find_method(name, "baseline").name for name in names))
    if not out:
        raise QpsaError(f"no methods given; known: {', '.join(method_names('baseline'))}")
    return out


def run_baselines(loaded: LoadedModel, tokens: EvalTokens, names: list[str], settings: ScoreSettings,
                  progress: Progress = SILENT, executor=None, checkpoint=None) -> ScoreRun:
    """Base perplexity and every method in `names` on the same tokens, as one ScoreRun; a progress
    task for the shared forward pass, and one per method. `executor` (`qpsa.parallel`) runs the
    layer ablation's batches; the other methods are one pass each and run here. `checkpoint` (an
    `AblationCheckpoint`, already checked against this run) keeps every finished ablation batch
    as it arrives, and its batches are not computed again."""
    from qpsa.scores.results import ScoreRun

    names = check_methods(names)
    if "angular_distance" in names and not 1 <= settings.angular_n <= loaded.config.n_layer:
        raise QpsaError(f"--n must be between 1 and the number of layers ({loaded.config.n_layer}); "
                        f"got {settings.angular_n}")
    start = time.perf_counter()
    T = tokens.tokens.shape[1]

    with progress.task("forward", loaded.config.n_layer) as advance:
        states = layer_states(loaded, tokens, advance)
    base = {"ppl": ppl_of(states.base_nll), "nll": float(states.base_nll.double().mean())}
    methods = {}
    for name in names:
        with progress.task(name, work_units(name, loaded.config, T)) as advance:
            extra = {}
            if name == "layer_ablation":
                extra = {"executor": executor}
                if checkpoint is not None:
                    extra["done"] = {k: torch.tensor(v, dtype=torch.float64) for k, v in checkpoint.units.items()}
                    extra["on_unit"] = partial(_save_unit, checkpoint)
            methods[name] = find_method(name).compute()(loaded, tokens, settings, advance, **extra)
    model = loaded.describe()
    run_settings = {"methods": names, "max_tokens": settings.max_tokens, "seed": settings.seed,
                    "angular_n": settings.angular_n, "fisher_groups": FISHER_GROUPS,
                    "dtype": str(loaded.model.dtype).removeprefix("torch.")}
    return ScoreRun("baseline", model, tokens.describe(), run_settings, base, methods,
                    seconds=time.perf_counter() - start)
