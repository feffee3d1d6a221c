"""What every quant type shares: the `QuantGrid` base class, bit packing, and ggml's float32 arithmetic.

The bit packing follows gguf-py's gguf/quants.py; the arithmetic helpers reproduce, in whole-array
numpy, the float32 operations of ggml-quants.c in ggml's order, so that the quantizers built on them
give ggml's bytes (see `qpsa.gguf.quants` for the rules).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml: a sub-block whose largest magnitude is below this is all zero


class QuantGrid:
    """One GGML type: its grid (blocks <-> integer codes and steps), its quantizer and its dequantizer.

    A subclass sets `qtype`, `code_min`, `code_max` and implements the four methods below; the block
    layout it reads and writes is in its docstring.
    """

    qtype: GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block
    code_min: int  # inclusive range of valid codes
    code_max: int
    code_dtype = np.int32

    def __init__(self):
        self.block_size, self.type_size = GGML_QUANT_SIZES[self.qtype]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(codes {self.code_min}..{self.code_max}, {self.block_size} weights in {self.type_size} bytes)"

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """blocks: uint8 (n_blocks, type_size) -> codes int32 (n_blocks, block_size), step float32 (n_blocks, block_size)."""
        raise NotImplementedError

    def encode(self, codes: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Write codes (n_blocks, block_size) into a copy of blocks, keeping scales/mins; returns new uint8 (n_blocks, type_size).

        Raises ValueError if a code is outside [code_min, code_max].
        """
        raise NotImplementedError

    def quantize_blocks(self, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """ggml's quantizer: finite float32 (n_blocks, block_size) -> uint8 (n_blocks, type_size).

        weights=None is ggml without importance matrix. Otherwise weights is float32 (n,), the importance of
        each column of a row (llama-quantize's in_sum2 / count), and x holds whole rows of n // block_size
        blocks each: ggml_quantize_chunk(..., imatrix=weights), whose legacy types look at the whole row.
        """
        raise NotImplementedError

    def dequantize_torch(self, b: torch.Tensor) -> torch.Tensor:
        """b: blocks, uint8 (n_blocks, type_size) -> float32 (n_blocks, block_size), bit for bit gguf-py's values."""
        raise NotImplementedError

    def dequantize_with_gguf(self, b: torch.Tensor) -> torch.Tensor:
        """`dequantize_torch` through gguf-py's numpy dequantizer: for types that have no torch one yet
        (on a GPU, the blocks make a round trip through the CPU)."""
        values = np.ascontiguousarray(gguf_dequantize(b.cpu().numpy(), self.qtype), dtype=np.float32)
        return torch.from_numpy(values).to(b.device)

    # helpers for the subclasses

    def _blocks(self, blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks)
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != self.type_size:
            raise ValueError(f"{self.qtype.name}: blocks must be uint8 (n_blocks, {self.type_size}), got {blocks.dtype} {blocks.shape}")
        return np.ascontiguousarray(blocks)

    def _codes(self, codes: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Check codes against blocks and the valid range; returns them as an integer array (n_blocks, block_size)."""
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise ValueError(f"{self.qtype.name}: codes must be integers, got {codes.dtype}")
        if codes.shape != (blocks.shape[0], self.block_size):
            raise ValueError(f"{self.qtype.name}: codes must have shape {(blocks.shape[0], self.block_size)}, got {codes.shape}")
        if codes.size:
            bad = (codes < self.code_min) | (codes > self.code_max)
            if bad.any():
                block, weight = np.argwhere(bad)[0]
                raise ValueError(
                    f"{self.qtype.name}: code {codes[block, weight]} at block {block}, weight {weight} "
                    f"is outside [{self.code_min}, {self.code_max}]"
                )
        return codes

    def _stored(self, codes: np.ndarray) -> np.ndarray:
        """Codes as the unsigned numbers the format stores (code - code_min), uint8."""
        return (codes - self.code_min).astype(np.uint8)

    def _block_weights(self, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The column weights (n,) laid over x's blocks (whole rows): float32 (n_blocks, block_size)."""
        per_row = weights.size // self.block_size
        tiles = weights.reshape(1, per_row, self.block_size)  # (1, blocks per row, block_size)
        return np.broadcast_to(tiles, (len(x) // per_row, per_row, self.block_size)).reshape(len(x), self.block_size)

    def _zero_blocks(self, n_blocks: int) -> np.ndarray:
        """uint8 (n_blocks, type_size) of zeros, for a quantizer to fill."""
        return np.zeros((n_blocks, self.type_size), dtype=np.uint8)


# --- bit packing ----------------------------------------------------------------------------


def unpack(packed: np.ndarray, group_len: int, bits: int) -> np.ndarray:
    """Split bytes into `bits`-wide fields, in gguf's order.

    packed: uint8 (n, n_bytes), read as groups of `group_len` consecutive bytes. Within a group,
    the lowest field of every byte comes first, then the next field of every byte, and so on:
    field k of byte j of group g is value number g*group_len*fields_per_byte + k*group_len + j.
    Returns uint8 (n, n_bytes * 8 // bits).
    """
    n = packed.shape[0]
    fields_per_byte = 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, fields_per_byte, 1)
    fields = (packed.reshape(n, -1, 1, group_len) >> shifts) & np.uint8((1 << bits) - 1)  # (n, groups, fields_per_byte, group_len)
    return fields.reshape(n, -1)


def pack(fields: np.ndarray, group_len: int, bits: int) -> np.ndarray:
    """Inverse of `unpack`: uint8 fields (n, n_values), each < 2**bits -> uint8 (n, n_values * bits // 8)."""
    n = fields.shape[0]
    fields_per_byte = 8 // bits
    fields = fields.reshape(n, -1, fields_per_byte, group_len)  # (n, groups, fields_per_byte, group_len)
    packed = fields[:, :, 0, :].copy()  # (n, groups, group_len)
    for k in range(1, fields_per_byte):
        packed |= fields[:, :, k, :] << np.uint8(k * bits)
    return packed.reshape(n, -1)


def read_f16(two_bytes: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) holding a little-endian float16 -> float32 (n, 1)."""
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32)


def read_f16_torch(b: torch.Tensor) -> torch.Tensor:
    """The same in torch: uint8 (n, 2) -> float32 (n, 1)."""
    return b.contiguous().view(torch.float16).float()


# --- float32 arithmetic as ggml's C does it -----------------------------------------------


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the integer off the mantissa bits.

    Rounds half to even for |v| < 2**22; beyond that (and for inf/NaN) it returns the same
    wrapped-around numbers that ggml's does, which its callers then clamp. float32 -> int32.
    """
    bits = (v.astype(F32, copy=False) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def c_int(v: np.ndarray) -> np.ndarray:
    """C's (int) of a float32 on x86: truncation toward zero, INT_MIN for NaN and out-of-range values."""
    ok = np.abs(v) < F32(2**31)  # False for NaN
    return np.where(ok, np.trunc(np.where(ok, v, F32(0))), F32(-(2**31))).astype(np.int32)


def roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.rint rounds them to even). float32 -> float32."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= F32(0.5)), v).astype(F32)  # a - whole is exact


def sum_in_order(terms: np.ndarray, from_first: bool = False) -> np.ndarray:
    """Sum over axis 0 one term at a time in float32, as the C loop `s += t[i]` does.

    C starts from s = 0 (so -0.0 terms sum to +0.0) unless it initializes s with the first term.
    terms (n, ...) -> (...).
    """
    total = terms[0].copy() if from_first else terms[0] + F32(0)
    for term in terms[1:]:
        total += term
    return total


def half(v: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest even, overflow to inf (ggml's GGML_FP32_TO_FP16)."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def half_bytes(h: np.ndarray) -> np.ndarray:
    """float16 (n,) -> its little-endian bytes, uint8 (n, 2)."""
    return np.ascontiguousarray(h, dtype="<f2").view(np.uint8).reshape(-1, 2)


def first_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """The signed value of largest magnitude along `axis`, the first one on ties, +0.0 if all are zero
    (ggml's `if (fabsf(v) > amax)` loop from amax = max = 0)."""
    peak = _take(x, np.abs(x).argmax(axis=axis), axis)
    return np.where(peak != 0, peak, F32(0))


def first_min(x: np.ndarray, axis: int) -> np.ndarray:
    """The minimum along `axis`, the first one on ties (which decides the sign of a zero), as `if (v < min)` keeps it."""
    return _take(x, x.argmin(axis=axis), axis)


def first_max(x: np.ndarray, axis: int) -> np.ndarray:
    return _take(x, x.argmax(axis=axis), axis)


def _take(x, idx, axis):
    return np.take_along_axis(x, np.expand_dims(idx, axis), axis=axis).squeeze(axis)


def running_max(v: np.ndarray) -> np.ndarray:
    """max(0, v...) along axis 1 as ggml's `if (v > m) m = v` from m = 0: +0.0 unless some v > 0; NaN never wins."""
    m = np.where(np.isnan(v), F32(0), v).max(axis=1)
    return np.where(m > 0, m, F32(0))
