"""Will it fit? The memory a run needs, against what there is, before anything large is allocated.

    plan = plan_memory(config, gguf_file, dtype, device, max_memory=None, batch=4, ctx=512)
    plan.resident            # the whole model in float (the fast path), or layers on demand
    plan.cache_budget        # bytes of dequantized layers kept (inf when resident)

What a run needs, beyond the file (memory-mapped: its pages are page cache, which the kernel can
drop and read again, so they are not counted):
- weights: the whole model in float at the chosen dtype (resident), or, on demand, the largest
  unit dequantized at once (a layer, or the output head / embedding table);
- activations: `activation_bytes` for the batch of windows the command runs at once;
- a reserve for torch, Python and the tokenizer (RESERVE).
`--max-memory` caps the total; without it the cap is what `available_memory` reports. If the whole
float model and the activations fit under the cap, every layer is dequantized once at load
(resident, as q-psa always did); otherwise layers are dequantized as they are used and the cache
keeps as many as fit in what is left. If not even the on-demand minimum fits, the run stops before
loading with one line: how much is needed, how much is available, and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qpsa.errors import QpsaError
from qpsa.model.config import ModelConfig
from qpsa.model.device import available_memory, dtype_name, format_size

RESERVE = 512 * 2**20  # torch, Python, the tokenizer and the allocator's slack
HEAD_CHUNK_ROWS = 1024  # as Transformer.head_nll


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    available: int  # bytes the cap allows (--max-memory, or what the machine has)
    available_from: str
    float_model: int  # bytes of the whole model in float
    largest_unit: int  # bytes of the largest unit dequantized at once
    activations: int
    resident: bool
    cache_budget: float  # bytes of dequantized units the cache may keep
    minimum: int = 0  # the least this run needs (one unit at a time, activations, reserve)

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "available_bytes": self.available,
                "available_from": self.available_from, "float_model_bytes": self.float_model,
                "largest_unit_bytes": self.largest_unit, "activation_bytes": self.activations,
                "weights": "resident" if self.resident else "on demand",
                "cache_budget_bytes": None if math.isinf(self.cache_budget) else int(self.cache_budget),
                "minimum_bytes": self.minimum}


def activation_bytes(config: ModelConfig, batch: int, ctx: int, dtype: torch.dtype, grad: bool = False) -> int:
    """Peak bytes of one forward over `batch` windows of `ctx` tokens: the residual stream and the
    layer's widest intermediates (q|k|v, gate|up, the attention output), the scored half's
    output-head chunk and the rope tables; with `grad`, every layer's saved intermediates."""
    c = config
    size = torch.tensor([], dtype=dtype).element_size()
    per_token = 4 * c.n_embd + (c.n_head + 2 * c.n_head_kv) * c.head_dim + 2 * c.n_ff + c.n_head * c.head_dim
    layer = batch * ctx * per_token * size
    if grad:
        layer *= c.n_layer
    head = batch * ctx * (HEAD_CHUNK_ROWS + c.n_embd) * size
    attention = batch * c.n_head * 96 * ctx * 4  # the compiled kernel's score rows
    return int(layer + head + attention)


def plan_memory(config: ModelConfig, store, device: torch.device, max_memory: int | None = None,
                batch: int = 4, ctx: int = 512, grad: bool = False, whole: str | None = None) -> MemoryPlan:
    """Decide resident or on demand for `store` (a WeightStore not yet filled); QpsaError if it cannot fit.
    `whole` names a computation that needs every weight in float at once (Fisher's gradients): then
    only resident will do."""
    dtype = store.dtype
    float_model = store.total_bytes()
    layer = store.layer_bytes()
    globals_ = [store.unit_bytes(u) for u in store._units if not isinstance(u, int)]
    largest = max([layer, *globals_])
    activations = activation_bytes(config, batch, ctx, dtype, grad)
    if max_memory is not None:
        available, where = max_memory, "--max-memory"
        if max_memory < layer:
            raise QpsaError(f"--max-memory {format_size(max_memory)} is below one layer of this model "
                            f"({format_size(layer)} in {dtype_name(dtype)}); give at least "
                            f"{format_size(largest + activations + (RESERVE if device.type == 'cpu' else 0))}")
    else:
        available, where = available_memory(device)
    reserve = RESERVE if device.type == "cpu" else 0
    small = sum(g for g in globals_ if g < largest)  # norms and the other global tensors, kept
    minimum = largest + small + activations + reserve
    plan = MemoryPlan(str(device), dtype_name(dtype), available, where, float_model, largest, activations,
                      resident=False, cache_budget=0.0, minimum=minimum)
    gradients = float_model if (whole is not None and grad) else 0
    if float_model + gradients + activations + reserve <= available:
        plan.resident, plan.cache_budget = True, math.inf
        return plan
    if whole is not None:
        need = float_model + gradients + activations + reserve  # with autograd: a gradient per weight
        raise QpsaError(
            f"not enough memory on {device} for {whole}, which needs the whole model in float at once: "
            f"{format_size(need)} needed, {format_size(available)} available ({where}); try "
            + ", ".join(f for f in ("a larger --max-memory" if max_memory is not None else None,
                                     "--dtype bfloat16" if dtype == torch.float32 else None,
                                     "--device cuda" if device.type == "cpu" and torch.cuda.is_available() else None,
                                     f"leaving out {whole}") if f))
    if minimum > available:
        fixes = ["--dtype bfloat16" if dtype == torch.float32 else None,
                 "--device cuda" if device.type == "cpu" and torch.cuda.is_available() else None,
                 "a smaller --ctx or batch"]
        if max_memory is not None:
            fixes.insert(0, "a larger --max-memory")
        raise QpsaError(
            f"not enough memory on {device}: this run needs {format_size(minimum)} ({format_size(largest)} for the "
            f"largest layer or tensor in {dtype_name(dtype)}, {format_size(activations)} for activations) but "
            f"{format_size(available)} is available ({where}); try {', '.join(f for f in fixes if f)}")
    plan.cache_budget = float(available - minimum)  # what the cache may keep beyond the unit in use
    return plan
