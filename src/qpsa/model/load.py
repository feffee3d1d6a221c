"""GGUF file -> (Transformer, Tokenizer), with every weight still reachable in its quantization grid.

    loaded = load_model("smollm2-135m")
    loaded.model(tokens)                          # logits
    loaded.file.tensors["blk.0.attn_q.weight"]    # the quantized record behind a weight
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qpsa.errors import QpsaError
from qpsa.gguf.read import GGUFFile, open_gguf
from qpsa.gguf.validate import check_tensor_values
from qpsa.model.budget import MemoryPlan, plan_memory
from qpsa.model.config import ModelConfig, config_from_metadata
from qpsa.model.device import dtype_name
from qpsa.model.memory import keep_freed_memory
from qpsa.model.tokenizer import Tokenizer, load_tokenizer
from qpsa.model.transformer import Transformer
from qpsa.model.weights import WeightStore
from qpsa.sources.catalog import resolve_model

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str  # what the user asked for (short name or path)
    file: GGUFFile
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    load_seconds: float
    requantized: list | None = None  # TensorChoice per tensor when the weights were requantized in memory
    memory: MemoryPlan | None = None  # what the load decided: whole float model, or layers on demand

    @property
    def device(self) -> torch.device:
        return self.model.device

    def compute(self) -> dict:
        """Where and how the model computes, as every output names it: device, dtype, weights mode."""
        out = {"device": str(self.model.device), "dtype": dtype_name(self.model.dtype)}
        if self.memory is not None:
            out["weights"] = "resident" if self.memory.resident else "on demand"
            if not self.memory.resident:
                out["cache_budget_bytes"] = int(self.memory.cache_budget)
        return out

    @property
    def path(self) -> Path:
        return self.file.path

    def describe(self) -> dict:
        """The model as every output names it: the name asked for, file path and sha256, architecture, layers."""
        return {"name": self.name, "path": str(self.path), "sha256": self.file.sha256,
                "architecture": self.config.arch, "n_layer": self.config.n_layer, **self.compute()}


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, tokenizer: bool = True, check_tensors: bool = True,
    device: torch.device | str = "cpu", max_memory: int | None = None, batch: int = 4, ctx: int = 512,
    grad: bool = False, whole: str | None = None,
) -> LoadedModel:
    """Validate, read and map a model. `check_tensors` scans float tensors and every
    quantized block's scales for NaN/Inf first (a fraction of a second on the bundled models), so
    a damaged file is named, with the tensor and block, before any long computation.
    The weights stay the file's quantized bytes; `budget.plan_memory` decides, from `max_memory`
    (bytes; default what `device` has free) and the activations of `batch` windows of `ctx`
    tokens (with autograd if `grad`; `whole`: the name of a computation that needs all weights in
    float at once), whether the whole model is dequantized at once (resident,
    the fast path) or layer by layer as the forward reaches them; QpsaError if neither fits.
    Loading also sets the allocator to reuse freed activation memory (see `memory.py`)."""
    start = time.perf_counter()
    keep_freed_memory()
    gguf_file = open_gguf(resolve_model(name_or_path))
    if check_tensors:
        check_tensor_values(gguf_file.path, gguf_file.layout)
    tensors = gguf_file.tensors
    vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else None
    config = config_from_metadata(gguf_file.metadata, vocab_size=vocab)
    _check_tensors(gguf_file, config)
    device = torch.device(device)
    store = WeightStore(tensors, dtype=dtype, device=device, budget=0.0)
    if config.context_length:  # a longer --ctx is refused with the windows, after the load
        ctx = min(ctx, config.context_length)
    plan = plan_memory(config, store, device, max_memory, batch=batch, ctx=ctx, grad=grad, whole=whole)
    if plan.resident:
        store.make_resident()
    else:
        store.budget = plan.cache_budget
        log.info("weights on demand: %.0f MB of %.0f MB may stay dequantized", plan.cache_budget / 2**20,
                 plan.float_model / 2**20)
    model = Transformer(config, store)
    model.load_options = {"device": str(device), "max_memory": max_memory, "batch": batch, "ctx": ctx,
                          "grad": grad, "whole": whole}
    tok = load_tokenizer(gguf_file.metadata, gguf_file.sha256) if tokenizer else None
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise QpsaError(
            f"{gguf_file.path}: tokenizer has {tok.vocab_size} tokens but token_embd has {config.vocab_size} rows"
        )
    seconds = time.perf_counter() - start
    log.info("loaded %s in %.2f s", gguf_file.path, seconds)
    return LoadedModel(name_or_path, gguf_file, config, model, tok, seconds, memory=plan)


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward needs, with its shape in numpy order (rows, row length; experts'
    tensors (expert, rows, row length))."""
    c = config
    q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    shapes = {"token_embd.weight": (c.vocab_size, c.n_embd), "output_norm.weight": (c.n_embd,)}
    for i in range(c.n_layer):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (c.n_embd,)
        if c.fused_qkv:
            shapes[p + "attn_qkv.weight"] = (q + 2 * kv, c.n_embd)
        else:
            shapes |= {p + "attn_q.weight": (q, c.n_embd), p + "attn_k.weight": (kv, c.n_embd),
                       p + "attn_v.weight": (kv, c.n_embd)}
        if c.qkv_bias:
            shapes |= {p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
        shapes |= {p + "attn_output.weight": (c.n_embd, q), p + "ffn_norm.weight": (c.n_embd,)}
        if c.n_expert:  # the router and the experts' matrices stacked (expert, rows, row length)
            E, F = c.n_expert, c.n_ff_exp
            shapes |= {
                p + "ffn_gate_inp.weight": (E, c.n_embd),
                p + "ffn_gate_exps.weight": (E, F, c.n_embd),
                p + "ffn_up_exps.weight": (E, F, c.n_embd),
                p + "ffn_down_exps.weight": (E, c.n_embd, F),
            }
        elif c.fused_gate_up:
            shapes |= {p + "ffn_up.weight": (2 * c.n_ff, c.n_embd), p + "ffn_down.weight": (c.n_embd, c.n_ff)}
        else:
            shapes |= {p + "ffn_gate.weight": (c.n_ff, c.n_embd), p + "ffn_up.weight": (c.n_ff, c.n_embd),
                       p + "ffn_down.weight": (c.n_embd, c.n_ff)}
        if c.qk_norm:
            shapes |= {p + "attn_q_norm.weight": (c.head_dim,), p + "attn_k_norm.weight": (c.head_dim,)}
        if c.post_norms:
            shapes |= {p + "post_attention_norm.weight": (c.n_embd,), p + "post_ffw_norm.weight": (c.n_embd,)}
    return shapes


def optional_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensors the forward uses where the file has them: a separate output head (else token_embd
    is reused); for llama, Llama 3.x's rope frequency factors; for phi3, longrope's frequency
    factors for windows up to the original context and past it (Phi-3 "4k" files have none)."""
    shapes = {"output.weight": (config.vocab_size, config.n_embd)}
    if config.arch == "llama":
        shapes["rope_freqs.weight"] = (config.rope_dim // 2,)
    if config.arch == "phi3":
        shapes |= {f"rope_factors_{s}.weight": (config.rope_dim // 2,) for s in ("short", "long")}
    return shapes


def _check_tensors(gguf_file: GGUFFile, config: ModelConfig) -> None:
    """Every needed tensor present with its shape, and no tensor the forward would not use."""
    have = gguf_file.tensors
    expected = expected_tensors(config)
    for name, shape in expected.items():
        if name not in have:
            raise QpsaError(f"{gguf_file.path}: tensor {name} is missing (a {config.arch} model needs it)")
        if tuple(have[name].shape) != shape:
            raise QpsaError(f"{gguf_file.path}: tensor {name} has shape {have[name].shape}, expected {shape}")
    optional = optional_tensors(config)
    for name in have:
        if name in expected:
            continue
        if name not in optional:
            raise QpsaError(f"{gguf_file.path}: tensor {name} is not used by q-psa's {config.arch} forward; "
                            "refusing rather than ignoring it")
        if tuple(have[name].shape) != optional[name]:
            raise QpsaError(f"{gguf_file.path}: tensor {name} has shape {have[name].shape}, expected {optional[name]}")
