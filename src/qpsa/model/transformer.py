"""The decoder-only transformer, in PyTorch, over weights named as in the GGUF file.

Pure computation: no file or network I/O here (loading lives in `load.py`).

The forward pass runs an explicit list of layer indices, so removing a layer is deleting its index
and repeating one is writing it twice. Each piece (`embed`, `block`, `run_layers`, `logits`) is
public, so callers can cache the hidden state entering any layer and re-run only the layers after
it. Weights live in `Transformer.weights`, a `WeightStore` (`weights.py`): a mapping keyed by GGUF
tensor name (`blk.3.ffn_down.weight`) that dequantizes a layer when the forward reaches it (or
holds the whole model in float when it fits); q/k/v and gate/up are stored fused for speed, and the
per-name entries are views into the fused tensors, so writing into `weights[name]` changes what the
forward uses (the store keeps a layer handed out that way).

Shapes: B batch, T tokens, C channels (n_embd), H heads, K kv heads, D head dim, F ffn width,
V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qpsa.model.config import ModelConfig
from qpsa.model.kernel import kernel_act_mul_, kernel_attention, kernel_logsumexp_merge_, kernel_rms_norm
from qpsa.model.moe import moe_ffn
from qpsa.model.weights import WeightStore


class Transformer:
    def __init__(self, config: ModelConfig, weights: WeightStore | dict[str, torch.Tensor], dtype=torch.float32):
        """`weights`: a `WeightStore` (what `load_model` builds: quantized bytes, float tensors on
        demand), or float tensors by GGUF name, which become a store that holds them all."""
        self.config = config
        if not isinstance(weights, WeightStore):
            weights = WeightStore(weights, dtype=dtype)
        if config.fused_gate_up:  # phi3: the file's ffn_up is gate|up already; the forward reads it as ffn_gate_up
            weights.alias_gate_up()
        self.dtype = weights.dtype
        self.weights = weights
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # Optional `hook(layer, name, x, y) -> y`, called after each of a layer's matmuls with the
        # fused weight's name ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down"), its input
        # x (B, T, in) and output y (B, T, out). Scoring uses it to give each batch element its own
        # weight perturbation without copying the weights.
        self.linear_hook = None
        self.expert_hook = None  # the same for the experts' matmuls of an MoE layer (qpsa.model.moe)
        self.route_observer = None  # (layer, selected experts (B, T, k)) on every MoE layer
        # load_model's keyword arguments besides dtype (device, max_memory, ...): a Ray worker
        # (qpsa.parallel) loads its own copy of the model with them, so it computes as this one does
        self.load_options: dict = {}
        self._rope_freqs = self.weights.get("rope_freqs.weight")  # llama 3.x frequency factors

    @property
    def device(self) -> torch.device:
        return self.weights.device

    # ---- weights -------------------------------------------------------------------------

    @property
    def fused_names(self) -> set[str]:
        """The entries the store made (fused copies, phi3's ffn_gate_up alias), not tensors of the file
        (phi3's own attn_qkv is one of the file's)."""
        return {n for n in self.weights if self.weights.is_fused(n)}

    def layer_names(self, i: int) -> list[str]:
        """GGUF names of the tensors of layer i (views, not the fused copies)."""
        p, w = f"blk.{i}.", self.weights
        return [n for n in w if n.startswith(p) and not w.is_fused(n)]

    # ---- pieces of the forward -------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.weights.embedding(tokens)  # (B, T, C)
        if self.config.embed_scale != 1.0:
            h = h * self.config.embed_scale
        return h

    def block(self, i: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One transformer layer: (B, T, C) -> (B, T, C). `h` is never modified.

        Without autograd (`torch.no_grad`/`inference_mode`) the layer runs its fast path: the
        compiled kernels of `qpsa.model.kernel` for attention, RMS norm and act(gate)·up (where they
        cannot be built: blocked torch attention, `causal_attention`, and torch's ops), rope, SiLU/GELU, the gate×up product and the residual adds
        written in place into the layer's own fresh buffers. With autograd it runs the same
        arithmetic out of place through `scaled_dot_product_attention`; the two agree to float32
        rounding (tests/test_transformer.py)."""
        cfg, w, p = self.config, self.weights.layer(i), f"blk.{i}."
        B, T, _ = h.shape
        H, K, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        fast = not torch.is_grad_enabled()

        x = self._norm(h, w[p + "attn_norm.weight"])
        qkv = self._linear(i, "attn_qkv", x)  # (B, T, (H+2K)·D)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        v = v.view(B, T, K, D)
        local = bool(cfg.swa_layers) and cfg.swa_layers[i]
        cos, sin = self._rope(positions, local)
        if cfg.qk_norm:
            q = self._apply_rope(self._norm(q.view(B, T, H, D), w[p + "attn_q_norm.weight"]), cos, sin)
            k = self._apply_rope(self._norm(k.view(B, T, K, D), w[p + "attn_k_norm.weight"]), cos, sin)
        else:  # q and k rotated in one pass
            qk = self._apply_rope(qkv[..., : (H + K) * D].view(B, T, H + K, D), cos, sin)
            q, k = qk.split([H, K], dim=2)  # (B, T, H, D), (B, T, K, D)
        window = cfg.sliding_window if local and T > cfg.sliding_window else None
        att = None
        if cfg.attn_softcap:  # gemma2: capped scores, computed whole (no kernel or flash path caps them)
            att = softcap_attention(q, k, v, cfg.scale, cfg.attn_softcap, positions, window)
        elif fast:  # the compiled kernel where it builds, else blocked torch attention
            att = kernel_attention(q, k, v, cfg.scale, window or 0)  # (B, T, H·D)
            if att is None and window is None:
                att = causal_attention(q, k, v, cfg.scale)
        if att is None:
            mask = self._window_mask(positions) if window else None
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
                scale=cfg.scale, enable_gqa=H != K,
            )  # (B, H, T, D)
            att = att.transpose(1, 2).reshape(B, T, H * D)
        att = self._linear(i, "attn_output", att)  # (B, T, C)
        if cfg.post_norms:
            att = self._norm(att, w[p + "post_attention_norm.weight"])
        h = att.add_(h) if fast else h + att

        x = self._norm(h, w[p + "ffn_norm.weight"])
        if cfg.n_expert:  # routed experts (qwen3moe)
            out = moe_ffn(self, i, x)  # (B, T, C)
            return out.add_(h) if fast else h + out
        gate_up = self._linear(i, "ffn_gate_up", x)  # (B, T, 2F)
        gate, up = gate_up.chunk(2, dim=-1)  # (B, T, F) views
        if fast:  # in place: the down projection reads the gate half of the buffer
            act = kernel_act_mul_(gate_up, gelu=cfg.activation != "silu")
            if act is None:
                silu = cfg.activation == "silu"
                act = (F.silu(gate, inplace=True) if silu else torch.ops.aten.gelu_(gate, approximate="tanh")).mul_(up)
        else:
            act = (F.silu(gate) if cfg.activation == "silu" else F.gelu(gate, approximate="tanh")) * up
        out = self._linear(i, "ffn_down", act)  # (B, T, C)
        if cfg.post_norms:
            out = self._norm(out, w[p + "post_ffw_norm.weight"])
        return out.add_(h) if fast else h + out

    def run_layers(self, h: torch.Tensor, layers: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
        for i in layers:
            h = self.block(i, h, positions)
        return h

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and output head: (B, T, C) -> (B, T, V), written into `out` if given
        (reusing one buffer avoids re-faulting hundreds of MB per window on large vocabularies)."""
        x = self._norm(h, self.weights.matrix("output_norm.weight"))
        head = self.weights.matrix("output.weight")
        if out is None:
            out = F.linear(x, head)
        else:
            torch.matmul(x, head.t(), out=out)
        cap = self.config.final_logit_softcap
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    def head_nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL (float32) of each position, logsumexp(z) − z[target], from hidden states h (..., C)
        before the final norm and targets (...), without materializing the (..., V) logits z.

        The output head runs HEAD_CHUNK vocabulary rows at a time into one small buffer that stays
        in cache, and the chunks' logsumexps are combined as they come (logaddexp). On Gemma 3's
        262k vocabulary the full logits were 535 MB per two windows: writing them and reading them
        back three times for the logsumexp cost a third of the head's matmul time. A chunk's
        logsumexp is z_0 − log_softmax(z)_0, from torch's fused log_softmax kernel: half the time
        of amax/subtract/exp/sum, and 1.6× slower where exp underflows, where torch's plain
        vectorized exp is 5–10× slower. The subtraction loses at most |z_0 − lse|·2⁻²⁴
        (~1e-5 nats for logits spread over ±80). With the compiled kernels (`qpsa.model.kernel`)
        a chunk's max, exp and sum are instead one pass merged straight into the running
        logsumexp: a quarter of log_softmax's time, and exact to float32 rounding. z[target] is the
        dot product of the target's head row with the normed state. Under autograd this falls
        back to `logits` and `token_nll_`.
        """
        if torch.is_grad_enabled():
            return token_nll_(self.logits(h), targets)
        C = h.shape[-1]
        x = self._norm(h, self.weights.matrix("output_norm.weight")).reshape(-1, C)  # (R, C)
        targets = targets.reshape(-1).to(x.device)
        head = self.weights.head_rows("output.weight")  # (V, C), or its rows block by block from the file
        V, R = self.weights.shape("output.weight")[0], x.shape[0]
        cap = self.config.final_logit_softcap
        if isinstance(head, torch.Tensor):
            target = (x * head[targets]).sum(-1)  # (R,)
            blocks = [(0, head)]
        else:  # on demand: each target's logit from the block that holds its row
            target = torch.empty(R, dtype=x.dtype, device=x.device)
            blocks = head
        lse = torch.full((R,), -math.inf, dtype=x.dtype, device=x.device)  # over the chunks so far
        buffer = torch.empty(R * min(HEAD_CHUNK, V), dtype=x.dtype, device=x.device)
        for first, block in blocks:
            if blocks is head:
                inside = (targets >= first) & (targets < first + block.shape[0])
                target[inside] = (x[inside] * block[targets[inside] - first]).sum(-1)
            for start in range(0, block.shape[0], HEAD_CHUNK):
                rows = block[start : start + HEAD_CHUNK]
                z = torch.matmul(x, rows.t(), out=buffer[: R * rows.shape[0]].view(R, rows.shape[0]))
                if cap:
                    z.div_(cap).tanh_().mul_(cap)
                if not kernel_logsumexp_merge_(z, lse):  # the compiled kernel: max, exp, sum in one pass
                    lse = torch.logaddexp(lse, z[:, 0] - torch.log_softmax(z, dim=-1)[:, 0])
        if cap:
            target = torch.tanh(target / cap) * cap
        return lse.sub_(target).view(h.shape[:-1])

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
        positions = torch.arange(tokens.shape[1], device=self.device)
        h = self.run_layers(self.embed(tokens), layers, positions)
        return self.logits(h[:, logits_from:])

    __call__ = forward

    # ---- helpers ---------------------------------------------------------------------------

    def _linear(self, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
        p, w = f"blk.{i}.{name}.", self.weights.layer(i)
        y = F.linear(x, w[p + "weight"], w.get(p + "bias"))
        return y if self.linear_hook is None else self.linear_hook(i, name, x, y)

    def fused_rows(self, i: int, name: str) -> tuple[str, int]:
        """(fused weight name, first row) for a per-matrix name such as "attn_k" in layer i; rows are
        the second-to-last axis (an expert tensor's rows within each expert)."""
        for fused, parts in FUSED_PARTS:
            if name in parts:
                start = 0
                for part in parts[: parts.index(name)]:  # (phi3's ffn_up is all of gate|up: no ffn_gate)
                    before = f"blk.{i}.{part}.weight"
                    start += self.weights.shape(before)[-2] if before in self.weights else 0
                return fused, start
        return name, 0

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = kernel_rms_norm(x, weight, self.config.norm_eps)  # None under autograd, or without the kernel
        return F.rms_norm(x, weight.shape, weight, self.config.norm_eps) if out is None else out

    def _rope(self, positions: torch.Tensor, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        base = cfg.rope_base_local if local and cfg.rope_base_local else cfg.rope_base
        scale = 1.0 if local else cfg.rope_scale
        key = (int(positions[-1]) + 1, base, scale, local)
        if key not in self._rope_cache:
            n = cfg.rope_dim // 2
            inv_freq = base ** (-torch.arange(n, dtype=torch.float64) * 2 / cfg.rope_dim)  # (D/2,)
            factors = self._rope_freqs
            if cfg.rope_original_context:  # longrope: as llama.cpp, long factors past the original context
                factors = self.weights.get("rope_factors_long.weight" if key[0] > cfg.rope_original_context
                                           else "rope_factors_short.weight")
            if factors is not None and not local:
                inv_freq = inv_freq / factors.to("cpu", torch.float64)[:n]
            angles = torch.arange(key[0], dtype=torch.float64)[:, None] / scale * inv_freq  # (T, D/2)
            m = cfg.rope_attn_factor  # llama.cpp scales cos and sin by it (so q·k by its square)
            self._rope_cache[key] = ((angles.cos() * m).to(self.device, self.dtype),
                                     (angles.sin() * m).to(self.device, self.dtype))
        cos, sin = self._rope_cache[key]
        positions = positions.to(cos.device)
        return cos[positions], sin[positions]  # (T, D/2) each

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, D), any strides, with its first rope_dim channels of each head rotated: a
        new contiguous tensor. Without autograd the rotation is written straight into it."""
        r = self.config.rope_dim
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, r/2)

        def pairs(t):  # (first, second) element of each rotated pair
            if self.config.rope_interleaved:  # pairs (0,1), (2,3), … — llama.cpp's "norm" rope
                return t[..., 0:r:2], t[..., 1:r:2]
            return t[..., : r // 2], t[..., r // 2 : r]  # pairs (j, j + r/2) — "neox" rope

        def as_complex(t):  # interleaved pairs as complex numbers (B, T, N, r/2)
            return torch.view_as_complex(t[..., :r].unflatten(-1, (-1, 2)))

        if torch.is_grad_enabled():
            a, b = pairs(x)
            first, second = a * cos - b * sin, a * sin + b * cos
            if self.config.rope_interleaved:
                rot = torch.stack((first, second), dim=-1).flatten(-2)
            else:
                rot = torch.cat((first, second), dim=-1)
            return torch.cat((rot, x[..., r:]), dim=-1) if r < x.shape[-1] else rot
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if self.config.rope_interleaved and x.dtype in (torch.float32, torch.float64):  # one complex multiply: 7×
            # faster than four strided passes (torch has no bfloat16 complex numbers: those take the passes)
            torch.mul(as_complex(x), torch.complex(cos, sin), out=as_complex(out))
        else:
            (a, b), (first, second) = pairs(x), pairs(out)
            torch.mul(a, cos, out=first).addcmul_(b, sin, value=-1)
            torch.mul(a, sin, out=second).addcmul_(b, cos)
        if r < x.shape[-1]:
            out[..., r:] = x[..., r:]
        return out

    def _window_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Sliding-window causal mask (T, T), True where a query may attend: 0 <= q - k < window."""
        positions = positions.to(self.device)
        dist = positions[:, None] - positions[None, :]  # (T, T)
        return (dist >= 0) & (dist < self.config.sliding_window)


FUSED_PARTS = (("attn_qkv", ("attn_q", "attn_k", "attn_v")), ("ffn_gate_up", ("ffn_gate", "ffn_up")),
               ("ffn_gate_up_exps", ("ffn_gate_exps", "ffn_up_exps")))


ATTENTION_BLOCK = 32  # query positions per block in causal_attention
HEAD_CHUNK = 1024  # vocabulary rows per output-head matmul in Transformer.head_nll


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention without autograd: q (B, T, H, D), k and v (B, T, K, D), any
    strides -> (B, T, H·D), the layout the output projection takes.

    Query positions go ATTENTION_BLOCK at a time, each block against only the keys it can see
    (positions before its end), so about half of the full T×T scores are computed, as in a
    causal flash kernel. The G = H/K query heads that share a key/value head are stacked as the
    rows of one matmul, which makes the two matmuls per block 32·G rows tall. In a perplexity
    window on 2 CPU cores this is 1.3× (SmolLM2, D = 64, G = 3) and 1.7× (Gemma 3, D = 256,
    G = 4) as fast as torch's CPU flash kernel (`scaled_dot_product_attention`); see
    docs/benchmarks.md.
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    if q.device.type != "cpu":  # on a GPU, torch's fused (flash / memory-efficient) kernel
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             scale=scale, enable_gqa=H != K)
        return att.transpose(1, 2).reshape(B, T, H * D)
    G = H // K
    bs = ATTENTION_BLOCK
    q = (q * scale).view(B, T, K, G, D).transpose(1, 2).reshape(B, K, T * G, D)  # rows (t, g)
    k = k.transpose(1, 2).contiguous()  # (B, K, T, D)
    v = v.transpose(1, 2).contiguous()
    out = torch.empty_like(q)  # (B, K, T·G, D)
    future = torch.ones(bs, bs, dtype=torch.bool, device=q.device).triu(1)  # key after query
    bias = torch.zeros(bs, 1, bs, dtype=q.dtype, device=q.device).masked_fill_(future[:, None], -math.inf)
    bias = bias.expand(bs, G, bs).reshape(bs * G, bs)  # (rows, keys) of the diagonal block
    for start in range(0, T, bs):
        end = min(start + bs, T)
        rows = slice(start * G, end * G)
        scores = torch.matmul(q[:, :, rows], k[:, :, :end].transpose(-1, -2))  # (B, K, n·G, end)
        scores[..., start:end].add_(bias[: (end - start) * G, : end - start])
        torch.matmul(torch.softmax(scores, dim=-1), v[:, :, :end], out=out[:, :, rows])
    return out.view(B, K, T, G, D).transpose(1, 2).reshape(B, T, H * D)


def softcap_attention(q, k, v, scale: float, cap: float, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal attention with soft-capped scores, as llama.cpp computes Gemma 2's: s = q·k·scale,
    s ← tanh(s / cap)·cap, masked (and limited to `window` where given), softmax, times v.
    q (B, T, H, D), k and v (B, T, K, D) -> (B, T, H·D); works with and without autograd."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    qh = q.transpose(1, 2)  # (B, H, T, D)
    kh = k.transpose(1, 2).repeat_interleave(G, dim=1)  # (B, H, T, D)
    vh = v.transpose(1, 2).repeat_interleave(G, dim=1)
    scores = torch.tanh(torch.matmul(qh, kh.transpose(-1, -2)) * (scale / cap)) * cap  # (B, H, T, T)
    dist = positions[:, None] - positions[None, :]  # (T, T)
    visible = (dist >= 0) & (dist < window) if window else dist >= 0
    scores = scores.masked_fill(~visible, -math.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)  # (B, H, T, D)
    return out.transpose(1, 2).reshape(B, T, H * D)


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
    w = model.weights
    names = {n for n in w if not w.is_fused(n)}
    if getattr(w, "_tied", False):
        names.discard("output.weight")
    return sum(math.prod(w.shape(n)) for n in names)


def forward_flops(config: ModelConfig, n_tokens: int, n_scored: int) -> float:
    """Multiply-adds ×2 of one forward over n_tokens with the output head on n_scored positions.

    Counts the weight matmuls and causal attention (q·k and p·v over the T(T+1)/2 visible pairs,
    bounded by the sliding window); norms, rope and softmax are not counted.
    """
    c = config
    qkv = c.n_embd * (c.n_head + 2 * c.n_head_kv) * c.head_dim
    ffn = c.n_embd * (c.n_expert + 3 * c.n_ff_exp * c.n_expert_used) if c.n_expert else 3 * c.n_embd * c.n_ff
    per_token = qkv + c.n_head * c.head_dim * c.n_embd + ffn
    flops = 2.0 * c.n_layer * per_token * n_tokens
    for i in range(c.n_layer):
        window = c.sliding_window if c.swa_layers and c.swa_layers[i] else None
        pairs = sum(min(t + 1, window or math.inf) for t in range(n_tokens))
        flops += 2 * 2 * c.n_head * c.head_dim * pairs
    flops += 2.0 * c.n_embd * c.vocab_size * n_scored
    return flops
