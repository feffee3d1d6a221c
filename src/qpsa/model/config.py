"""Model hyperparameters, read from GGUF metadata (never from the file's name).

One `ModelConfig` describes every supported architecture; the per-architecture differences are
plain fields (rope style, norms after attention/FFN, q/k norms, activation, embedding scale,
sliding-window layout), so the transformer has one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qpsa.errors import QpsaError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3", "qwen3moe")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int  # C, width of the residual stream
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab_size: int  # V
    context_length: int
    norm_eps: float
    rope_base: float
    rope_dim: int  # number of leading channels of each head that are rotated
    rope_interleaved: bool  # llama.cpp's NORM rope (adjacent pairs) vs NEOX (first/second half)
    rope_scale: float = 1.0  # linear position scaling (positions are divided by it) on global layers
    rope_base_local: float | None = None  # gemma3's sliding-window layers use their own base
    sliding_window: int | None = None  # a token sees keys at distance < sliding_window (on SWA layers)
    swa_layers: tuple[bool, ...] = ()  # per layer: True where attention is sliding-window
    attn_scale: float = 0.0  # multiplies q·k; 0 means 1/sqrt(head_dim)
    embed_scale: float = 1.0  # gemma multiplies token embeddings by sqrt(n_embd)
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each head's q and k (gemma3)
    post_norms: bool = False  # RMSNorm on the attention and FFN outputs before the residual add (gemma3)
    final_logit_softcap: float = 0.0
    n_expert: int = 0  # routed experts per layer (qwen3moe); 0 for a dense FFN
    n_expert_used: int = 0  # experts each token is routed to (top-k)
    n_ff_exp: int = 0  # width of one expert's FFN
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    @property
    def active_ff(self) -> int:
        """FFN width one token goes through: n_ff, or an MoE layer's k experts' together."""
        return self.n_ff_exp * self.n_expert_used if self.n_expert else self.n_ff


def config_from_metadata(metadata: dict, vocab_size: int | None = None) -> ModelConfig:
    """Build the config from GGUF metadata keys (`{arch}.block_count`, …)."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise QpsaError(
            f"unsupported architecture {arch!r}; q-psa supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(name, default=None, required=True):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None and required:
            raise QpsaError(f"GGUF metadata lacks {arch}.{name}, which a {arch} model needs")
        return value

    n_layer = int(key("block_count"))
    n_embd = int(key("embedding_length"))
    n_head = _per_layer_constant(key("attention.head_count"), arch, "attention.head_count")
    n_head_kv = _per_layer_constant(key("attention.head_count_kv", n_head), arch, "attention.head_count_kv")
    head_dim = int(key("attention.key_length", n_embd // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise QpsaError(f"{arch}: key_length != value_length is not supported")
    if n_layer < 1 or n_embd < 1 or n_head < 1 or n_head_kv < 1 or n_head % n_head_kv:
        raise QpsaError(
            f"{arch}: inconsistent sizes (layers {n_layer}, width {n_embd}, heads {n_head}/{n_head_kv})"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = vocab_size or int(key("vocab_size", len(tokens) if tokens is not None else None))
    common = dict(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        # an MoE file's feed_forward_length is the unused dense width (llama.cpp does not need it)
        n_ff=_per_layer_constant(key("feed_forward_length", 0, required=arch != "qwen3moe"), arch,
                                 "feed_forward_length"),
        vocab_size=vocab,
        context_length=int(key("context_length", 2048, required=False)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_base=float(key("rope.freq_base", 10000.0, required=False)),
        rope_dim=int(key("rope.dimension_count", head_dim, required=False)),
    )
    scaling = key("rope.scaling.type", None, required=False)
    factor = float(key("rope.scaling.factor", 1.0, required=False) or 1.0)
    if scaling not in (None, "none", "linear") and factor != 1.0:
        raise QpsaError(f"{arch}: rope scaling {scaling!r} is not supported (only linear)")
    common["rope_scale"] = factor if scaling in (None, "linear") else 1.0

    if arch == "llama":
        return ModelConfig(**common, rope_interleaved=True)
    if arch == "qwen2":
        return ModelConfig(**common, rope_interleaved=False)
    if arch == "qwen3moe":  # per-head q/k RMS norms, neox rope, routed experts (qpsa.model.moe)
        return ModelConfig(**common, rope_interleaved=False, qk_norm=True, **_moe_fields(key, arch, common["n_ff"]))
    # gemma3: GeGLU, q/k norms, norms after attention and FFN, embeddings scaled by sqrt(C),
    # sliding-window attention on 5 of every 6 layers with its own rope base (llama.cpp's
    # defaults for gemma3; a `sliding_window_pattern` array in the file overrides them).
    window = key("attention.sliding_window", None, required=False)
    pattern = key("attention.sliding_window_pattern", None, required=False)
    if isinstance(pattern, list):
        swa = tuple(bool(p) for p in pattern)
        if len(swa) != n_layer:
            raise QpsaError(f"gemma3: sliding_window_pattern has {len(swa)} entries for {n_layer} layers")
    else:
        period = int(pattern) if pattern else 6
        swa = tuple(il % period < period - 1 for il in range(n_layer))
    return ModelConfig(
        **common,
        rope_interleaved=False,
        rope_base_local=10000.0,
        sliding_window=int(window) if window else None,
        swa_layers=swa if window else (),
        attn_scale=1.0 / math.sqrt(head_dim),
        embed_scale=math.sqrt(n_embd),
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        final_logit_softcap=float(key("final_logit_softcapping", 0.0, required=False) or 0.0),
    )


def _moe_fields(key, arch: str, n_ff: int) -> dict:
    """Expert counts and width, as llama.cpp's qwen3moe reads them. Its routing is fixed in its
    graph (softmax over the router's logits, top-k, the k weights renormalized to sum 1, no
    scaling, no expert groups): a file whose keys ask for anything else is refused by name."""
    n_expert = int(key("expert_count"))
    used = _per_layer_constant(key("expert_used_count"), arch, "expert_used_count")
    if not 0 < used <= n_expert:
        raise QpsaError(f"{arch}: expert_used_count {used} must be between 1 and expert_count {n_expert}")
    n_ff_exp = _per_layer_constant(key("expert_feed_forward_length", 0, required=False), arch,
                                   "expert_feed_forward_length") or n_ff // used
    if n_ff_exp < 1:
        raise QpsaError(f"GGUF metadata lacks {arch}.expert_feed_forward_length, which a {arch} model needs")
    unsupported = {
        "expert_group_count": (key("expert_group_count", 0, required=False) or 0) > 1,
        "expert_shared_count": (key("expert_shared_count", 0, required=False) or 0) > 0,
        "expert_gating_func": key("expert_gating_func", 1, required=False) not in (0, 1),  # 1 = softmax
        "expert_weights_norm": key("expert_weights_norm", True, required=False) is False,
        "expert_weights_scale": float(key("expert_weights_scale", 0.0, required=False) or 0.0) not in (0.0, 1.0),
    }
    for name, bad in unsupported.items():
        if bad:
            raise QpsaError(f"{arch}.{name} = {key(name)!r} is not supported: {arch} routes by softmax, top-k, "
                            "renormalized weights, no expert groups or shared experts (as llama.cpp does)")
    return {"n_expert": n_expert, "n_expert_used": used, "n_ff_exp": n_ff_exp}


def _per_layer_constant(value, arch: str, name: str) -> int:
    """Some files store per-layer arrays; q-psa needs them constant across layers."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise QpsaError(f"{arch}.{name} varies across layers; q-psa needs it constant")
        value = value[0]
    return int(value)
