"""The decoder-only transformer, in PyTorch, over weights named as in the GGUF file.

Pure computation: no file or network I/O here (loading lives in `load.py`).

The forward pass runs an explicit list of layer indices, so removing a layer is deleting its index
and repeating one is writing it twice. Each piece (`embed`, `block`, `run_layers`, `logits`) is
public, so callers can cache the hidden state entering any layer and re-run only the layers after
it. Weights live in `Transformer.weights`, a dict keyed by GGUF tensor name
(`blk.3.ffn_down.weight`); q/k/v and gate/up are stored fused for speed, and the per-name entries
are views into the fused tensors, so writing into `weights[name]` changes what the forward uses.

Shapes: B batch, T tokens, C channels (n_embd), H heads, K kv heads, D head dim, F ffn width,
V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qpsa.model.config import ModelConfig


class Transformer:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype=torch.float32):
        self.config = config
        self.dtype = dtype
        self.weights: dict[str, torch.Tensor] = {}
        for name, tensor in weights.items():
            self.weights[name] = tensor.to(dtype)
        self._fuse()
        if "output.weight" not in self.weights:  # tied embeddings: the head reuses token_embd
            self.weights["output.weight"] = self.weights["token_embd.weight"]
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # Optional `hook(layer, name, x, y) -> y`, called after each of a layer's matmuls with the
        # fused weight's name ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down"), its input
        # x (B, T, in) and output y (B, T, out). Scoring uses it to give each batch element its own
        # weight perturbation without copying the weights.
        self.linear_hook = None
        self._rope_freqs = self.weights.get("rope_freqs.weight")

    # ---- weights -------------------------------------------------------------------------

    def _fuse(self):
        """Store q|k|v and gate|up as one matrix each; the named entries become views into them."""
        w = self.weights
        for i in range(self.config.n_layer):
            p = f"blk.{i}."
            for parts, fused in (
                (("attn_q.weight", "attn_k.weight", "attn_v.weight"), "attn_qkv.weight"),
                (("attn_q.bias", "attn_k.bias", "attn_v.bias"), "attn_qkv.bias"),
                (("ffn_gate.weight", "ffn_up.weight"), "ffn_gate_up.weight"),
            ):
                if not all(p + n in w for n in parts):
                    continue
                whole = torch.cat([w[p + n] for n in parts], dim=0).contiguous()
                w[p + fused] = whole
                start = 0
                for n in parts:
                    rows = w[p + n].shape[0]
                    w[p + n] = whole[start : start + rows]
                    start += rows

    def layer_names(self, i: int) -> list[str]:
        """GGUF names of the tensors of layer i (views, not the fused copies)."""
        p = f"blk.{i}."
        return [n for n in self.weights if n.startswith(p) and "_qkv." not in n and "_gate_up." not in n]

    # ---- pieces of the forward -------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens, self.weights["token_embd.weight"])  # (B, T, C)
        if self.config.embed_scale != 1.0:
            h = h * self.config.embed_scale
        return h

    def block(self, i: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One transformer layer: (B, T, C) -> (B, T, C)."""
        cfg, w, p = self.config, self.weights, f"blk.{i}."
        B, T, C = h.shape
        H, K, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim

        x = self._norm(h, w[p + "attn_norm.weight"])
        qkv = self._linear(i, "attn_qkv", x)  # (B, T, (H+2K)·D)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, T, H, D)
        k = k.view(B, T, K, D)
        v = v.view(B, T, K, D)
        if cfg.qk_norm:
            q = self._norm(q, w[p + "attn_q_norm.weight"])
            k = self._norm(k, w[p + "attn_k_norm.weight"])
        local = bool(cfg.swa_layers) and cfg.swa_layers[i]
        cos, sin = self._rope(positions, local)
        q = self._apply_rope(q, cos, sin).transpose(1, 2)  # (B, H, T, D)
        k = self._apply_rope(k, cos, sin).transpose(1, 2)  # (B, K, T, D)
        v = v.transpose(1, 2)  # (B, K, T, D)
        mask = self._window_mask(positions) if local else None
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=cfg.scale, enable_gqa=H != K
        )  # (B, H, T, D)
        att = self._linear(i, "attn_output", att.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)
        if cfg.post_norms:
            att = self._norm(att, w[p + "post_attention_norm.weight"])
        h = h + att

        x = self._norm(h, w[p + "ffn_norm.weight"])
        gate, up = self._linear(i, "ffn_gate_up", x).chunk(2, dim=-1)  # (B, T, F) each
        act = F.silu(gate) if cfg.activation == "silu" else F.gelu(gate, approximate="tanh")
        out = self._linear(i, "ffn_down", act * up)  # (B, T, C)
        if cfg.post_norms:
            out = self._norm(out, w[p + "post_ffw_norm.weight"])
        return h + out

    def run_layers(self, h: torch.Tensor, layers: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
        for i in layers:
            h = self.block(i, h, positions)
        return h

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and output head: (B, T, C) -> (B, T, V), written into `out` if given
        (reusing one buffer avoids re-faulting hundreds of MB per window on large vocabularies)."""
        x = self._norm(h, self.weights["output_norm.weight"])
        if out is None:
            out = F.linear(x, self.weights["output.weight"])
        else:
            torch.matmul(x, self.weights["output.weight"].t(), out=out)
        cap = self.config.final_logit_softcap
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    def forward(
        self, tokens: torch.Tensor, layers: Sequence[int] | None = None, logits_from: int = 0
    ) -> torch.Tensor:
        """Logits (B, T - logits_from, V) for tokens (B, T), through `layers` in the given order.

        `layers` defaults to all layers once, in order. Positions are 0..T-1; a repeated layer
        sees the hidden states its previous pass produced, at the same positions, and attends
        over keys/values it computes from them (no cache is shared between passes).
        `logits_from` skips the output head for the first positions (perplexity scores only the
        second half of each window, and on large vocabularies the head is most of the cost).
        """
        if layers is None:
            layers = range(self.config.n_layer)
        positions = torch.arange(tokens.shape[1])
        h = self.run_layers(self.embed(tokens), layers, positions)
        return self.logits(h[:, logits_from:])

    __call__ = forward

    # ---- helpers ---------------------------------------------------------------------------

    def _linear(self, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
        p = f"blk.{i}.{name}."
        y = F.linear(x, self.weights[p + "weight"], self.weights.get(p + "bias"))
        return y if self.linear_hook is None else self.linear_hook(i, name, x, y)

    def fused_rows(self, i: int, name: str) -> tuple[str, int]:
        """(fused weight name, first row) for a per-matrix name such as "attn_k" in layer i."""
        for fused, parts in (("attn_qkv", ("attn_q", "attn_k", "attn_v")), ("ffn_gate_up", ("ffn_gate", "ffn_up"))):
            if name in parts:
                start = 0
                for part in parts[: parts.index(name)]:
                    start += self.weights[f"blk.{i}.{part}.weight"].shape[0]
                return fused, start
        return name, 0

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, self.config.norm_eps)

    def _rope(self, positions: torch.Tensor, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        base = cfg.rope_base_local if local and cfg.rope_base_local else cfg.rope_base
        scale = 1.0 if local else cfg.rope_scale
        key = (int(positions[-1]) + 1, base, scale, local)
        if key not in self._rope_cache:
            n = cfg.rope_dim // 2
            inv_freq = base ** (-torch.arange(n, dtype=torch.float64) * 2 / cfg.rope_dim)  # (D/2,)
            if self._rope_freqs is not None and not local:  # llama 3.x frequency factors
                inv_freq = inv_freq / self._rope_freqs.to(torch.float64)[:n]
            angles = torch.arange(key[0], dtype=torch.float64)[:, None] / scale * inv_freq  # (T, D/2)
            self._rope_cache[key] = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))
        cos, sin = self._rope_cache[key]
        return cos[positions], sin[positions]  # (T, D/2) each

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first rope_dim channels of each head of x (B, T, H, D)."""
        rot, rest = x[..., : self.config.rope_dim], x[..., self.config.rope_dim :]
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
        if self.config.rope_interleaved:  # pairs (0,1), (2,3), … — llama.cpp's "norm" rope
            a, b = rot.unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, D/2) each
            rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        else:  # pairs (j, j + D/2) — "neox" rope
            a, b = rot.chunk(2, dim=-1)
            rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot

    def _window_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Sliding-window causal mask (T, T), True where a query may attend: 0 <= q - k < window."""
        dist = positions[:, None] - positions[None, :]  # (T, T)
        return (dist >= 0) & (dist < self.config.sliding_window)


def token_nll_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each position, logsumexp(z) − z[target], from logits z (..., V) and targets (...).

    The same arithmetic as `torch.logsumexp` (max, exp of the difference, sum, log), done in place:
    **`logits` is overwritten**. On a 262k vocabulary, logsumexp's temporary copy of the logits
    (267 MB for one window's scored half, page-faulted afresh each call) cost as much as a
    quarter of a perplexity window; in place it costs three passes over memory. Where autograd
    records `logits`, the out-of-place `torch.logsumexp` is used instead (same values).
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[..., None])[..., 0]
    target = logits.gather(-1, targets[..., None])[..., 0]
    top = logits.amax(dim=-1, keepdim=True)
    lse = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top[..., 0])
    return lse.sub_(target)


def param_count(model: Transformer) -> int:
    seen, total = set(), 0
    for name, t in model.weights.items():
        if "_qkv." in name or "_gate_up." in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel()
    return total


def forward_flops(config: ModelConfig, n_tokens: int, n_scored: int) -> float:
    """Multiply-adds ×2 of one forward over n_tokens with the output head on n_scored positions.

    Counts the weight matmuls and causal attention (q·k and p·v over the T(T+1)/2 visible pairs,
    bounded by the sliding window); norms, rope and softmax are not counted.
    """
    c = config
    qkv = c.n_embd * (c.n_head + 2 * c.n_head_kv) * c.head_dim
    per_token = qkv + c.n_head * c.head_dim * c.n_embd + 3 * c.n_embd * c.n_ff
    flops = 2.0 * c.n_layer * per_token * n_tokens
    for i in range(c.n_layer):
        window = c.sliding_window if c.swa_layers and c.swa_layers[i] else None
        pairs = sum(min(t + 1, window or math.inf) for t in range(n_tokens))
        flops += 2 * 2 * c.n_head * c.head_dim * pairs
    flops += 2.0 * c.n_embd * c.vocab_size * n_scored
    return flops
