"""GGML quant types, each in one class: its grid, its quantizer and its dequantizer.

    grid = grid_for(GGMLQuantizationType.Q4_K)
    codes, step = grid.decode(blocks)          # blocks uint8 (n_blocks, type_size)
    codes[0, 5] += 1                           # one quantization level up ...
    new_blocks = grid.encode(codes, blocks)    # ... scales and mins kept byte for byte
    # dequantize_blocks(Q4_K, new_blocks)[5] == dequantize_blocks(Q4_K, blocks)[5] + step[0, 5]

    blocks = quantize(values, GGMLQuantizationType.Q4_K)  # float32 (..., n) -> uint8 (..., n // 256 * 144)
    blocks = quantize(values, GGMLQuantizationType.Q4_K, weights)  # with an importance matrix: weights (n,)
    weights = dequantize(raw, GGMLQuantizationType.Q4_K, shape)  # raw bytes -> float32 torch.Tensor

One class per type, as gguf-py keeps a type in one class (`class Q4_K(__Quant, ...)`): the block
layout in its docstring, and four methods that all read that layout:

    decode(blocks) -> (codes, step)       the grid: integer code and step of every weight (numpy)
    encode(codes, blocks) -> blocks       codes written back, every scale and min byte kept
    quantize_blocks(x, weights) -> blocks ggml's quantizer, with or without importance matrix (numpy)
    dequantize_torch(b) -> values         the exact dequantizer (torch)

    common.py    the `QuantGrid` base class, bit packing, ggml's float32 arithmetic
    floats.py    F32, F16, BF16
    legacy.py    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-weight blocks)
    kquants.py   Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-weight super-blocks)
    searches.py  ggml's scale searches (make_qx_quants, make_q3_quants, make_qkx2/3_quants, make_qp_quants),
                 which the K-quants run, and the legacy types with an importance matrix
    searches.c   the same searches in C, bit for bit (compiled.py builds and loads it; numpy is the fallback)
    __init__.py  the registry `GRIDS` and the entry points

The per-family modules are tables of types, longer than the other modules: split a family only
if it grows. Shared steps within a family
(Q4_0/Q5_0's quantizer, Q4_K/Q5_K's scale bytes) are module functions next to the classes that
call them; whatever more than one family uses is in common.py. The base class keeps the name
`QuantGrid`: callers know a type by its grid (`grid_for`, `GGUFTensor.grid()`), and its quantizer
and dequantizer are the ways onto and off that grid. `GRIDS` holds one instance per type, keyed by
its `GGMLQuantizationType`.

**The grid.** Weights within a block come in the order gguf's dequantizer returns them, so
`codes[b, i]` belongs to `dequantize_blocks(qtype, blocks)[b * block_size + i]`. `step` is how much
the dequantized value changes when the code goes up by 1; it can be negative (Q3_K and Q6_K have
signed sub-block scales, the d of Q4_0/Q5_0/Q8_0 can be negative, and for float types code + 1
makes a negative value more negative). Formats with a fixed zero point (Q4_0, Q5_0, Q8_0, Q3_K,
Q6_K) use signed codes so that value = step * code; formats with a stored offset use the stored
unsigned number, with value = step * code + offset. The bit layouts follow gguf-py's gguf/quants.py.

**The quantizers** follow the reference quantizer that llama-quantize runs on a tensor without an
importance matrix (ggml_quantize_chunk -> quantize_<type>(..., quant_weights=NULL), which calls
quantize_row_<type>_ref in ggml-quants.c; Q8_0 always does), rewritten as whole-array numpy (each
family's module docstring says what each type does). The scale searches, where nearly all the time
went, also exist in C (searches.c, compiled on first use into q-psa's cache folder like the model's
kernels), with the K-quants' last step (codes from the stored scales) and the legacy types'
importance weights: each runs the C where the library builds and loads, else its numpy version
(QPSA_KERNEL=0 forces numpy). Both give the same bits; the compiled path makes the K-quants 5–11x
and the legacy types with an importance matrix 8–20x faster (docs/benchmarks.md). The arithmetic is float32 in ggml's order, so
the bytes are the same as ggml's: sums that C accumulates one term at a time are accumulated one
term at a time here (numpy's own sum pairs terms up and rounds differently); nearest_int is ggml's
add-1.5*2**23 trick (round half to even); C's float -> integer conversions are truncations that
give INT_MIN for NaN and out-of-range values, as on x86. Scales go to float16 with numpy's
round-to-nearest-even, as ggml's conversion does. test_quantize.py compares every type with
ggml's own quantizer byte for byte. Blocks are independent, so `quantize` hands a tensor to
`quantize_blocks` in chunks of 2**18 weights, which keeps the temporaries to tens of MB and mostly
in cache (2.5x faster than chunks of 2**20).

**With an importance matrix** (`weights`: one float32 per column of a row, llama-quantize's
in_sum2 / count of the matrix, or of one expert's slice) the quantizers follow what
ggml_quantize_chunk(..., imatrix) runs instead: quantize_<type> -> quantize_row_<type>_impl, another
search for most types (each family's module docstring says which), byte-identical to ggml as well
(test_weighted_quantize.py). Q8_0 and the float types ignore the weights, as ggml does. The legacy
types' weights depend on the mean square of the whole row, so `quantize` then hands
`quantize_blocks` whole rows (as many as fit in 2**18 weights, at least one).

**The dequantizers** do the same float32 arithmetic, in the same order, as gguf-py's numpy ones
(`gguf.quants.dequantize`, the reference, here `dequantize_blocks`), as whole-tensor torch
operations, so the values are identical (tests compare every tensor of both bundled models). gguf's
numpy code spends most of a model load on the largest tensors (9 s for Gemma 3's Q8_0 embedding).
Types without a class fall back to gguf's numpy code.

Adding a quant type
-------------------

1. Write one class in the module of its family (or a new module for a new family), subclassing
   `QuantGrid`: set `qtype` and the code range `code_min`, `code_max`; describe the block layout
   byte by byte in its docstring; implement `decode`, `encode`, `quantize_blocks` (ggml's
   quantize_row_<type>_ref, in ggml's float32 order, with the helpers in common.py; leave it out
   only for a type ggml quantizes only with an importance matrix) and `dequantize_torch` (or
   `dequantize_torch = QuantGrid.dequantize_with_gguf` until there is one).
2. Add one instance to `GRIDS` below. `grid_for`, `quantize` (QUANTIZE_TYPES: the types with a
   quantizer) and `dequantize` then find it.
3. test_quants.py fails until the class has all four methods (a type without a ggml quantizer goes
   in its NO_GGML_QUANTIZER), is registered, and reads and writes blocks of the sizes in
   `gguf.GGML_QUANT_SIZES`. Add the type to the type lists of test_quants.py (grid round trips),
   test_quantize.py (byte for byte against ggml) and test_dequant.py's SCALE_OFFSETS (bit for bit
   against gguf).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from qpsa.errors import QpsaError
from qpsa.gguf.quants.common import QuantGrid
from qpsa.gguf.quants.floats import BF16, F16, F32
from qpsa.gguf.quants.kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from qpsa.gguf.quants.legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

__all__ = ["GRIDS", "QUANTIZE_TYPES", "QuantGrid", "dequantize", "dequantize_blocks", "grid_for", "quantize"]

GRIDS: dict[GGMLQuantizationType, QuantGrid] = {
    grid.qtype: grid
    for grid in (
        F32(), F16(), BF16(),
        Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(),
        Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K(),
    )
}
# The types whose class has a quantizer: all of them, as ggml quantizes each without an importance matrix.
QUANTIZE_TYPES = tuple(q for q, grid in GRIDS.items() if type(grid).quantize_blocks is not QuantGrid.quantize_blocks)

_CHUNK_WEIGHTS = 1 << 18  # weights per pass: the K-quants hold ~30 float32 copies of a chunk; 1 MiB arrays stay in cache


def grid_for(qtype) -> QuantGrid:
    """The grid of a GGML type; QpsaError naming the type if q-psa has none for it."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise QpsaError(f"unknown GGML tensor type {qtype!r}") from None
    grid = GRIDS.get(qtype)
    if grid is None:
        supported = ", ".join(t.name for t in GRIDS)
        raise QpsaError(f"tensor type {qtype.name} is not supported (supported: {supported})")
    return grid


def quantize(values: np.ndarray, qtype, weights: np.ndarray | None = None) -> np.ndarray:
    """GGML blocks of `values` in `qtype`: float32 (..., n) -> uint8 (..., n // block_size * type_size).

    Rows run along the last axis; n must be a multiple of the type's block size (32; 256 for the
    K-quants; 1 for F32/F16/BF16). Other float dtypes are converted to float32 first. `weights`, if
    given, are the importance of each of the n columns (an importance matrix's in_sum2 / count for
    this matrix): float (n,), finite and not negative; ggml's quantizer with an importance matrix is
    used then. Raises QpsaError for an unsupported type, a row length that does not fit the blocks,
    a value that is NaN or infinite, or weights of another length or with a bad value.
    """
    qtype = _quantize_type(qtype)
    values = np.asarray(values)
    if values.dtype.kind not in "fiu":
        raise QpsaError(f"{qtype.name}: cannot quantize an array of {values.dtype}")
    values = values.astype(np.float32, copy=False)
    if values.ndim == 0:
        raise QpsaError(f"{qtype.name}: cannot quantize a scalar; give rows (..., n)")
    grid = GRIDS[qtype]
    block_size, type_size = grid.block_size, grid.type_size
    n = values.shape[-1]
    if n % block_size:
        raise QpsaError(f"{qtype.name}: row length {n} is not a multiple of the block size {block_size}")
    blocks_in = values.reshape(-1, block_size)  # (n_blocks, block_size)
    out = np.empty((blocks_in.shape[0], type_size), dtype=np.uint8)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    if weights is not None:
        weights = _check_weights(weights, n, qtype)
        step = max(1, _CHUNK_WEIGHTS // max(n, 1) * (n // block_size))  # whole rows per chunk
    with np.errstate(all="ignore"):  # inf/NaN in dead branches, fp16 overflow: ggml's results, no warnings
        for start in range(0, blocks_in.shape[0], step):
            chunk = np.ascontiguousarray(blocks_in[start : start + step])
            if not np.isfinite(chunk).all():
                bad = start * block_size + int(np.argmin(np.isfinite(chunk).reshape(-1)))
                raise QpsaError(f"{qtype.name}: cannot quantize a non-finite value ({values.reshape(-1)[bad]} at flat index {bad})")
            out[start : start + step] = grid.quantize_blocks(chunk, weights)
    return out.reshape(*values.shape[:-1], n // block_size * type_size)


def _check_weights(weights, n: int, qtype) -> np.ndarray:
    weights = np.asarray(weights)
    if weights.dtype.kind not in "fiu" or weights.shape != (n,):
        raise QpsaError(f"{qtype.name}: importance weights must be {n} numbers, one per column; got {weights.dtype} {weights.shape}")
    weights = weights.astype(np.float32)
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        bad = int(np.argmin(np.isfinite(weights) & (weights >= 0)))
        raise QpsaError(f"{qtype.name}: importance weight {weights[bad]} at column {bad} is negative or not finite")
    return np.ascontiguousarray(weights)


def _quantize_type(qtype) -> GGMLQuantizationType:
    supported = ", ".join(t.name for t in QUANTIZE_TYPES)
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise QpsaError(f"unknown GGML tensor type {qtype!r} (q-psa quantizes to: {supported})") from None
    if qtype not in QUANTIZE_TYPES:
        raise QpsaError(f"q-psa cannot quantize to {qtype.name} (it quantizes to: {supported})")
    return qtype


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from the raw bytes (uint8) of one tensor, bit for bit gguf's values."""
    grid = GRIDS.get(qtype)
    if grid is None:  # a type without a class: gguf's own dequantizer
        return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, qtype), dtype=np.float32).reshape(shape))
    blocks = torch.from_numpy(np.array(raw)).view(-1, grid.type_size)  # (n_blocks, type_size)
    return grid.dequantize_torch(blocks).reshape(shape)


def dequantize_blocks(qtype: GGMLQuantizationType, blocks: np.ndarray) -> np.ndarray:
    """The reference: gguf's own dequantizer. blocks uint8 (n_blocks, type_size) -> float32 (n_blocks*block_size,)."""
    return gguf_dequantize(blocks, qtype).reshape(-1).astype(np.float32, copy=False)
