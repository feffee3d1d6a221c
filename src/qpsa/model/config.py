"""Model hyperparameters, read from GGUF metadata (never from the file's name).

One `ModelConfig` describes every supported architecture; the per-architecture differences are
plain fields (rope style, norms after attention/FFN, q/k norms, activation, embedding scale,
sliding-window layout, soft-capping, fused tensors), so the transformer has one code path.

Nothing is ignored: every key under `{arch}.` must be one q-psa reads (`READ_KEYS`, and the
architecture's own in `ARCH_KEYS`) or one that cannot change the forward (`HARMLESS_KEYS`, or
`DEFAULT_ONLY_KEYS` at their no-op value); any other key stops the load with its name. What each
architecture computes follows llama.cpp's `src/models/<arch>.cpp` (release b11434).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qpsa.errors import QpsaError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen3moe")

# Keys every architecture reads into its config.
READ_KEYS = frozenset({
    "block_count", "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
    "attention.key_length", "attention.value_length", "attention.layer_norm_rms_epsilon", "rope.freq_base",
    "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.attn_factor",
})
# Keys that do not change the forward, with why.
HARMLESS_KEYS = {
    "context_length": "the training context; the forward does not read it",
    "vocab_size": "the vocabulary size: token_embd's rows are used",
    "rope.scaling.finetuned": "a note on training; llama.cpp does not compute with it",
    "tensor_data_layout": "how an old converter arranged the tensors it wrote; llama.cpp does not read it",
    "rope.scaling.original_context_length": "read by YaRN and longrope only (longrope reads it, YaRN is refused)",
}
# Keys harmless only at the value given (the forward without the feature); another value stops the load.
DEFAULT_ONLY_KEYS = {"expert_count": 0, "expert_used_count": 0, "attention.causal": True}
# Each architecture's own keys, read into its config.
ARCH_KEYS = {
    "llama": frozenset({"attention.sliding_window"}),
    "qwen2": frozenset(),
    "qwen3": frozenset(),
    "gemma2": frozenset({"attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window",
                         "attention.sliding_window_pattern", "rope.freq_base_swa"}),
    "gemma3": frozenset({"final_logit_softcapping", "attention.sliding_window", "attention.sliding_window_pattern",
                         "rope.freq_base_swa"}),
    "phi3": frozenset({"attention.sliding_window"}),
    # llama.cpp's qwen3moe: the expert counts and width; the routing keys are read to refuse any
    # routing but its own (`_moe_fields`)
    "qwen3moe": frozenset({"expert_count", "expert_used_count", "expert_feed_forward_length", "expert_group_count",
                           "expert_shared_count", "expert_gating_func", "expert_weights_norm", "expert_weights_scale"}),
}
ROPE_SCALING_TYPES = {"llama": ("none", "linear"), "qwen2": ("none", "linear"), "qwen3": ("none", "linear"),
                      "gemma2": ("none", "linear"), "gemma3": ("none", "linear"), "phi3": ("none", "linear", "longrope"),
                      "qwen3moe": ("none", "linear")}

# A layer's matrices as GGUF files name them (blk.{i}.{name}.weight): a model's own are
# `ModelConfig.matrices`. ALL_MATRICES is every name any architecture's layer has; each one's index
# seeds Q-PSA's sample streams, so names are only ever appended (the dense seven first).
DENSE_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
EXPERT_MATRICES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # an MoE layer's stacked experts
ALL_MATRICES = (*DENSE_MATRICES, "ffn_gate_inp", *EXPERT_MATRICES, "attn_qkv")


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
    rope_base_local: float | None = None  # gemma's sliding-window layers use their own base
    rope_attn_factor: float = 1.0  # multiplies rope's cos and sin (q·k by its square): rope.scaling.attn_factor
    rope_original_context: int = 0  # longrope: windows up to it use rope_factors_short, longer ones rope_factors_long
    sliding_window: int | None = None  # a token sees keys at distance < sliding_window (on SWA layers)
    swa_layers: tuple[bool, ...] = ()  # per layer: True where attention is sliding-window
    attn_scale: float = 0.0  # multiplies q·k; 0 means 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # gemma2: q·k·scale -> tanh(·/cap)·cap before the softmax
    embed_scale: float = 1.0  # gemma multiplies token embeddings by sqrt(n_embd)
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each head's q and k (gemma3, qwen3)
    post_norms: bool = False  # RMSNorm on the attention and FFN outputs before the residual add (gemma2/3)
    qkv_bias: bool = False  # q, k and v have biases (qwen2)
    fused_qkv: bool = False  # the file stores attn_qkv.weight, q|k|v rows (phi3)
    fused_gate_up: bool = False  # the file's ffn_up.weight holds gate|up rows, 2·n_ff (phi3)
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

    @property
    def matrices(self) -> tuple[str, ...]:
        """The matmul weights of a layer as the file names them (`blk.N.{name}.weight`): an MoE
        layer's router and stacked experts in place of the FFN, phi3's fused attn_qkv and gate|up ffn_up."""
        qkv = ("attn_qkv",) if self.fused_qkv else ("attn_q", "attn_k", "attn_v")
        if self.n_expert:
            return (*qkv, "attn_output", "ffn_gate_inp", *EXPERT_MATRICES)
        gate_up = ("ffn_up",) if self.fused_gate_up else ("ffn_gate", "ffn_up")  # phi3: ffn_up holds gate|up
        return (*qkv, "attn_output", *gate_up, "ffn_down")

    @property
    def fused_matrices(self) -> tuple[str, ...]:
        """The tensors a layer's forward multiplies by (`Transformer` names; the matrices are views of
        them, or they are the file's own as phi3's attn_qkv)."""
        if self.n_expert:
            return ("attn_qkv", "attn_output", "ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps")
        return ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")


def config_from_metadata(metadata: dict, vocab_size: int | None = None) -> ModelConfig:
    """Build the config from GGUF metadata keys (`{arch}.block_count`, …)."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise QpsaError(
            f"unsupported architecture {arch!r}; q-psa supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    check_keys(metadata, arch)

    def key(name, default=None, required=True):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None and required:
            raise QpsaError(f"GGUF metadata lacks {arch}.{name}, which a {arch} model needs")
        return value

    n_layer = int(key("block_count"))
    n_embd = int(key("embedding_length"))
    n_head = _per_layer_constant(key("attention.head_count"), arch, "attention.head_count")
    n_head_kv = _per_layer_constant(key("attention.head_count_kv", n_head), arch, "attention.head_count_kv")
    if n_layer < 1 or n_embd < 1 or n_head < 1 or n_head_kv < 1 or n_head % n_head_kv:
        raise QpsaError(
            f"{arch}: inconsistent sizes (layers {n_layer}, width {n_embd}, heads {n_head}/{n_head_kv})"
        )
    head_dim = int(key("attention.key_length", n_embd // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise QpsaError(f"{arch}: key_length != value_length is not supported")
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
        rope_attn_factor=float(key("rope.scaling.attn_factor", 1.0, required=False)),
    )
    if not 0 < common["rope_dim"] <= head_dim or common["rope_dim"] % 2:
        raise QpsaError(f"{arch}.rope.dimension_count = {common['rope_dim']} does not fit heads of {head_dim}")
    # llama.cpp: the type defaults to "linear"; "none" never scales; a factor f divides positions by f
    scaling = key("rope.scaling.type", "linear", required=False)
    if scaling not in ROPE_SCALING_TYPES[arch]:
        raise QpsaError(f"{arch}.rope.scaling.type = {scaling!r} is not implemented in q-psa "
                        f"(a {arch} model here takes {', '.join(ROPE_SCALING_TYPES[arch])})")
    factor = float(key("rope.scaling.factor", 0.0, required=False) or 0.0)
    common["rope_scale"] = factor if scaling == "linear" and factor else 1.0

    if arch in ("llama", "qwen2", "qwen3"):
        window = int(key("attention.sliding_window", 0, required=False) or 0)
        return ModelConfig(
            **common,
            rope_interleaved=arch == "llama",
            # Mistral's window: every layer (llama.cpp's llama graph has none; equal below the window)
            sliding_window=window or None,
            swa_layers=(True,) * n_layer if window else (),
            qk_norm=arch == "qwen3",
            qkv_bias=arch == "qwen2",
        )
    if arch == "qwen3moe":  # qwen3's attention (per-head q/k RMS norms, neox rope), routed experts (qpsa.model.moe)
        return ModelConfig(**common, rope_interleaved=False, qk_norm=True, **_moe_fields(key, arch, common["n_ff"]))
    if arch == "phi3":
        # llama.cpp b11434 turns Phi-3's sliding window off ("Phi SWA is currently disabled"): so does q-psa
        return ModelConfig(
            **common,
            rope_interleaved=False,
            rope_original_context=int(key("rope.scaling.original_context_length", common["context_length"],
                                          required=False)),
            fused_qkv=True,
            fused_gate_up=True,
        )
    # gemma2, gemma3: GeGLU, norms after attention and FFN, embeddings scaled by sqrt(C),
    # sliding-window attention on a period of layers (gemma2: even layers, window 4096 by default;
    # gemma3: 5 of every 6, only where the file sets a window) with its own rope base.
    window = key("attention.sliding_window", 4096 if arch == "gemma2" else None, required=False)
    pattern = key("attention.sliding_window_pattern", None, required=False)
    if isinstance(pattern, list):
        swa = tuple(bool(p) for p in pattern)
        if len(swa) != n_layer:
            raise QpsaError(f"{arch}: sliding_window_pattern has {len(swa)} entries for {n_layer} layers")
    else:
        period = int(pattern) if pattern is not None else (2 if arch == "gemma2" else 6)
        swa = tuple(period == 0 or il % period < period - 1 for il in range(n_layer))
    local_base = float(key("rope.freq_base_swa", common["rope_base"] if arch == "gemma2" else 10000.0, required=False))
    # q·k scale as llama.cpp computes it: 1/sqrt(n_embd/n_head) for the 27B models (46 and 62 layers),
    # 1/sqrt(head_dim) otherwise (the file carries no query_pre_attn_scalar)
    big = n_layer == (46 if arch == "gemma2" else 62)
    return ModelConfig(
        **common,
        rope_interleaved=False,
        rope_base_local=local_base,
        sliding_window=int(window) if window else None,
        swa_layers=swa if window else (),
        attn_scale=1.0 / math.sqrt(n_embd / n_head if big else head_dim),
        attn_softcap=float(key("attn_logit_softcapping", 50.0, required=False)) if arch == "gemma2" else 0.0,
        embed_scale=math.sqrt(n_embd),
        activation="gelu_tanh",
        qk_norm=arch == "gemma3",
        post_norms=True,
        final_logit_softcap=float(key("final_logit_softcapping", 30.0 if arch == "gemma2" else 0.0, required=False)
                                  or 0.0),
    )


def check_keys(metadata: dict, arch: str) -> None:
    """QpsaError naming the first key under `{arch}.` that q-psa neither reads nor knows to be harmless."""
    known = READ_KEYS | ARCH_KEYS[arch]
    prefix = f"{arch}."
    for name, value in metadata.items():
        if not name.startswith(prefix):
            continue
        k = name[len(prefix):]
        if k in known or k in HARMLESS_KEYS:
            continue
        if k in DEFAULT_ONLY_KEYS:
            if value == DEFAULT_ONLY_KEYS[k]:
                continue
            raise QpsaError(f"{name} = {value!r}: q-psa does not implement it for {arch} (only {DEFAULT_ONLY_KEYS[k]!r})")
        raise QpsaError(f"{name}: q-psa does not know this {arch} metadata key, which may change the forward; "
                        "refusing rather than ignoring it")


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
