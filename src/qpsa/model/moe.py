"""Routed experts: the mixture-of-experts FFN of `qwen3moe`, as llama.cpp computes it.

Per token x (after ffn_norm), llama.cpp's `build_moe_ffn` with qwen3moe's arguments:

    p = softmax(W_router · x)                  router probabilities over the E experts
    S = top-k experts by p                     k = expert_used_count
    g_e = p_e / max(Σ_{e∈S} p_e, 2⁻¹⁴)          the k weights renormalized to sum 1
    y = Σ_{e∈S} g_e · W_down[e] · (silu(W_gate[e]·x) ⊙ (W_up[e]·x))

Weights, as in the GGUF file (numpy order): `ffn_gate_inp` (E, C), `ffn_gate_exps` and
`ffn_up_exps` (E, F, C), `ffn_down_exps` (E, C, F). Gate and up are stored fused as
`ffn_gate_up_exps` (E, 2F, C) and the per-name entries are views into it, as the dense FFN's are
(`qpsa.model.weights.WeightStore`), so writing into `weights["blk.3.ffn_up_exps.weight"][5]` changes expert 5.

The forward groups tokens by expert: one sort of the (token, slot) pairs by (sequence, expert),
then per group one gather and two matmuls over all its tokens; the weighted outputs go back to
(token, slot) order with one gather and each token's k slots are summed; no loop over tokens. Groups are per sequence of the batch because a matmul's rounding
depends on its row count (torch's CPU kernels give other float32 bits for 5 rows than for 8): so
each sequence's result is bit for bit the same whichever sequences share its batch, as the dense
layers' are (layer ablation and Q-PSA batch perturbed copies of one window and compare them with
the unbatched base). Two optional observers on the `Transformer`:

* `expert_hook(layer, name, expert, rows, x, y) -> y` after each expert matmul, name
  "ffn_gate_up_exps" or "ffn_down_exps", rows (n,) the flat B·T indices of the expert's tokens,
  x (n, in) and y (n, out) (Q-PSA uses it to give batch elements their own expert perturbation);
  the router's matmul goes through the dense `linear_hook` as "ffn_gate_inp".
* `route_observer(layer, selected)` with the chosen experts (B, T, k) (router usage statistics).

Shapes: B batch, T tokens, N = B·T, C channels, E experts, k experts per token, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTS_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the top-k sum to the smallest normal float16


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected experts, their weights), each (..., k), from router logits (..., E): softmax,
    top-k, renormalized to sum 1 (llama.cpp's order: the largest probability first)."""
    probs = torch.softmax(logits, dim=-1)
    weights, selected = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=WEIGHTS_SUM_MIN)
    return selected, weights


def moe_ffn(model, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer i's routed-expert FFN: x (B, T, C) after ffn_norm -> (B, T, C), a new tensor."""
    cfg, w, p = model.config, model.weights.layer(i), f"blk.{i}."
    B, T, C = x.shape
    k = cfg.n_expert_used
    logits = model._linear(i, "ffn_gate_inp", x)  # (B, T, E)
    selected, gates = route(logits, k)  # (B, T, k) each
    if model.route_observer is not None:
        model.route_observer(i, selected)
    E = cfg.n_expert
    xf = x.reshape(B * T, C)  # (N, C)
    sequence = torch.arange(B, device=x.device).repeat_interleave(T * k)  # (N·k,) of each (token, slot)
    group = (sequence * E + selected.reshape(-1))  # (N·k,) (sequence, expert) of each (token, slot)
    order = torch.argsort(group, stable=True)  # pairs grouped, tokens in order within a group
    counts = torch.bincount(group, minlength=B * E).tolist()
    token_of = order // k  # (N·k,) token row of each pair, in group order
    gate_of = gates.reshape(-1)[order]
    gate_up, down = w[p + "ffn_gate_up_exps.weight"], w[p + "ffn_down_exps.weight"]  # (E, 2F, C), (E, C, F)
    hook = model.expert_hook
    outs = []  # per group (n, C): the weighted expert outputs, in group order
    start = 0
    for index, n in enumerate(counts):
        if n == 0:
            continue
        e = index % E
        rows = token_of[start : start + n]  # (n,)
        g = gate_of[start : start + n, None]  # (n, 1)
        start += n
        xe = xf[rows]  # (n, C)
        h = F.linear(xe, gate_up[e])  # (n, 2F)
        if hook is not None:
            h = hook(i, "ffn_gate_up_exps", e, rows, xe, h)
        a, b = h.chunk(2, dim=-1)  # (n, F) each
        act = (F.silu(a) if cfg.activation == "silu" else F.gelu(a, approximate="tanh")) * b
        y = F.linear(act, down[e])  # (n, C)
        if hook is not None:
            y = hook(i, "ffn_down_exps", e, rows, act, y)
        outs.append(y * g)
    # back to (token, slot) order with one gather, then each token's k weighted outputs summed
    pairs = torch.cat(outs)[torch.argsort(order)]  # (N·k, C)
    return pairs.view(B, T, k, C).sum(dim=2)


class RouterUsage:
    """Installed as a model's `route_observer`, counts how often the router picks each expert:
    `counts` (L, E), one per (token, slot) choice."""

    def __init__(self, config):
        self.k = config.n_expert_used
        self.counts = torch.zeros(config.n_layer, config.n_expert, dtype=torch.int64)

    def __call__(self, i: int, selected: torch.Tensor) -> None:
        self.counts[i] += torch.bincount(selected.reshape(-1), minlength=self.counts.shape[1])

    def to_dict(self) -> dict:
        """{"tokens": tokens routed per layer, "k", "fraction": per layer, per expert, the fraction of
        the tokens routed to it (a layer's fractions sum to k), "top_share": per layer, the busiest
        expert's share of the layer's choices (1/E when the router spreads the tokens evenly)}."""
        per_layer = self.counts.sum(-1).double()  # k · tokens of each layer
        tokens = (per_layer / self.k).clamp(min=1)
        fraction = self.counts.double() / tokens[:, None]
        top = self.counts.amax(-1).double() / per_layer.clamp(min=1)
        return {"tokens": int(tokens.max()), "k": self.k, "fraction": fraction.tolist(), "top_share": top.tolist()}


def expert_usage(model, tokens: torch.Tensor) -> dict:
    """How the router spreads `tokens` (W, T) over the experts: one forward window by window
    (`RouterUsage.to_dict`)."""
    usage = RouterUsage(model.config)
    previous = model.route_observer
    model.route_observer = usage
    try:
        with torch.inference_mode():
            for w in range(tokens.shape[0]):
                model.run_layers(model.embed(tokens[w : w + 1]), range(model.config.n_layer),
                                 torch.arange(tokens.shape[1], device=model.device))
    finally:
        model.route_observer = previous
    return usage.to_dict()
