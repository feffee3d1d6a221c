"""Each weight's place in its quantization grid: raw GGML blocks <-> (integer codes, per-weight step).

    grid = grid_for(GGMLQuantizationType.Q4_K)
    codes, step = grid.decode(blocks)          # blocks uint8 (n_blocks, type_size)
    codes[0, 5] += 1                           # one quantization level up ...
    new_blocks = grid.encode(codes, blocks)    # ... scales and mins kept byte for byte
    # dequantize(new_blocks)[5] == dequantize(blocks)[5] + step[0, 5]

Weights within a block come in the order `gguf.quants.dequantize` returns them, so
`codes[b, i]` belongs to `dequantize_blocks(qtype, blocks)[b * block_size + i]`.
`step` is how much the dequantized value changes when the code goes up by 1; it can be
negative (Q3_K and Q6_K have signed sub-block scales, the d of Q4_0/Q5_0/Q8_0 can be
negative, and for float types code + 1 makes a negative value more negative).

Formats with a fixed zero point (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) use signed codes so that
value = step * code; formats with a stored offset use the stored unsigned number, with
value = step * code + offset. All the bit layouts follow gguf-py's gguf/quants.py.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf.quants import dequantize

from qpsa.errors import QpsaError

__all__ = ["GRIDS", "QuantGrid", "dequantize_blocks", "grid_for"]


def dequantize_blocks(qtype: GGMLQuantizationType, blocks: np.ndarray) -> np.ndarray:
    """The reference: gguf's own dequantizer. blocks uint8 (n_blocks, type_size) -> float32 (n_blocks*block_size,)."""
    return dequantize(blocks, qtype).reshape(-1).astype(np.float32, copy=False)


# --- bit packing shared by the formats ---------------------------------------------------


def _unpack(packed: np.ndarray, group_len: int, bits: int) -> np.ndarray:
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


def _pack(fields: np.ndarray, group_len: int, bits: int) -> np.ndarray:
    """Inverse of `_unpack`: uint8 fields (n, n_values), each < 2**bits -> uint8 (n, n_values * bits // 8)."""
    n = fields.shape[0]
    fields_per_byte = 8 // bits
    fields = fields.reshape(n, -1, fields_per_byte, group_len)  # (n, groups, fields_per_byte, group_len)
    packed = fields[:, :, 0, :].copy()  # (n, groups, group_len)
    for k in range(1, fields_per_byte):
        packed |= fields[:, :, k, :] << np.uint8(k * bits)
    return packed.reshape(n, -1)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) holding a little-endian float16 -> float32 (n, 1)."""
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32)


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K/Q5_K -> 6-bit sub-block scales and mins, each uint8 (n, 8).

    byte 0-3:  top 2 bits of scale 4-7 | scale 0-3 (6 bits)
    byte 4-7:  top 2 bits of min 4-7   | min 0-3 (6 bits)
    byte 8-11: low 4 bits of min 4-7   | low 4 bits of scale 4-7
    """
    n = scales.shape[0]
    scales = scales.reshape(n, 3, 4)
    s_bytes, m_bytes, low_bytes = scales[:, 0], scales[:, 1], scales[:, 2]  # each (n, 4)
    sc = np.concatenate([s_bytes & 0x3F, (low_bytes & 0x0F) | ((s_bytes >> 2) & 0x30)], axis=1)
    mins = np.concatenate([m_bytes & 0x3F, (low_bytes >> 4) | ((m_bytes >> 2) & 0x30)], axis=1)
    return sc, mins


def _sub_block_steps(d: np.ndarray, sc: np.ndarray, sub_block_len: int) -> np.ndarray:
    """step of every weight: d (n, 1) * sub-block scale sc (n, n_sub), repeated over each sub-block -> float32 (n, n_sub * sub_block_len)."""
    with np.errstate(invalid="ignore"):  # inf/nan d times a zero scale in a corrupt block: NaN step, no warning
        return np.repeat(d * sc.astype(np.float32), sub_block_len, axis=1)


# --- the grids ----------------------------------------------------------------------------


class QuantGrid:
    """Decode raw blocks into integer codes and per-weight steps, and write codes back."""

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


class Q4_0Grid(QuantGrid):
    """Q4_0, 32 weights in 18 bytes: d f16 (2) | qs (16).

    Weight i < 16 is the low nibble of qs[i], weight i >= 16 the high nibble of qs[i-16];
    nibble q in 0..15, code = q - 8 in -8..7.  value = d * code, step = d.
    """

    qtype = GGMLQuantizationType.Q4_0
    code_min, code_max = -8, 7

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 0:2])  # (n_blocks, 1)
        codes = _unpack(blocks[:, 2:18], group_len=16, bits=4).astype(np.int32) + self.code_min  # (n_blocks, 32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 2:18] = _pack(self._stored(codes), group_len=16, bits=4)
        return out


class Q4_1Grid(QuantGrid):
    """Q4_1, 32 weights in 20 bytes: d f16 (2) | m f16 (2) | qs (16).

    Nibbles as in Q4_0; code = nibble in 0..15.  value = d * code + m, step = d.
    """

    qtype = GGMLQuantizationType.Q4_1
    code_min, code_max = 0, 15

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 0:2])  # (n_blocks, 1)
        codes = _unpack(blocks[:, 4:20], group_len=16, bits=4).astype(np.int32)  # (n_blocks, 32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 4:20] = _pack(self._stored(codes), group_len=16, bits=4)
        return out


class Q5_0Grid(QuantGrid):
    """Q5_0, 32 weights in 22 bytes: d f16 (2) | qh (4) | qs (16).

    Low 4 bits as the Q4_0 nibbles in qs; bit 4 of weight i is bit i of qh read as a
    little-endian uint32 (bit i%8 of qh byte i//8). q in 0..31, code = q - 16 in -16..15.
    value = d * code, step = d.
    """

    qtype = GGMLQuantizationType.Q5_0
    code_min, code_max = -16, 15

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 0:2])  # (n_blocks, 1)
        high = _unpack(blocks[:, 2:6], group_len=1, bits=1)  # (n_blocks, 32)
        low = _unpack(blocks[:, 6:22], group_len=16, bits=4)  # (n_blocks, 32)
        codes = (low | (high << 4)).astype(np.int32) + self.code_min
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 32)
        out = blocks.copy()
        out[:, 2:6] = _pack(stored >> 4, group_len=1, bits=1)
        out[:, 6:22] = _pack(stored & 0x0F, group_len=16, bits=4)
        return out


class Q5_1Grid(QuantGrid):
    """Q5_1, 32 weights in 24 bytes: d f16 (2) | m f16 (2) | qh (4) | qs (16).

    Bits as in Q5_0; code = q in 0..31.  value = d * code + m, step = d.
    """

    qtype = GGMLQuantizationType.Q5_1
    code_min, code_max = 0, 31

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 0:2])  # (n_blocks, 1)
        high = _unpack(blocks[:, 4:8], group_len=1, bits=1)  # (n_blocks, 32)
        low = _unpack(blocks[:, 8:24], group_len=16, bits=4)  # (n_blocks, 32)
        codes = (low | (high << 4)).astype(np.int32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 32)
        out = blocks.copy()
        out[:, 4:8] = _pack(stored >> 4, group_len=1, bits=1)
        out[:, 8:24] = _pack(stored & 0x0F, group_len=16, bits=4)
        return out


class Q8_0Grid(QuantGrid):
    """Q8_0, 32 weights in 34 bytes: d f16 (2) | qs int8 (32).

    code = qs[i] as int8 in -128..127.  value = d * code, step = d.
    """

    qtype = GGMLQuantizationType.Q8_0
    code_min, code_max = -128, 127

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 0:2])  # (n_blocks, 1)
        codes = blocks[:, 2:34].view(np.int8).astype(np.int32)  # (n_blocks, 32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 2:34] = codes.astype(np.int8).view(np.uint8)
        return out


class Q2_KGrid(QuantGrid):
    """Q2_K, 256 weights in 84 bytes: scales (16) | qs (64) | d f16 (2) | dmin f16 (2).

    16 sub-blocks of 16 weights; scales[s] holds sc (low 4 bits) and min (high 4 bits) of
    sub-block s = i // 16. Weight i = 128*h + 32*k + j is bits 2k..2k+1 of qs[32*h + j];
    code = those 2 bits in 0..3.  value = d*sc * code - dmin*min, step = d*sc.
    """

    qtype = GGMLQuantizationType.Q2_K
    code_min, code_max = 0, 3

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 80:82])  # (n_blocks, 1)
        sc = blocks[:, 0:16] & 0x0F  # (n_blocks, 16)
        codes = _unpack(blocks[:, 16:80], group_len=32, bits=2).astype(np.int32)  # (n_blocks, 256)
        return codes, _sub_block_steps(d, sc, 16)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 16:80] = _pack(self._stored(codes), group_len=32, bits=2)
        return out


class Q3_KGrid(QuantGrid):
    """Q3_K, 256 weights in 110 bytes: hmask (32) | qs (64) | scales (12) | d f16 (2).

    Low 2 bits of weight i = 128*h + 32*k + j: bits 2k..2k+1 of qs[32*h + j] (as Q2_K);
    high bit of weight i = 32*b + j: bit b of hmask[j]. u = low | high << 2 in 0..7, and
    code = u - 4 in -4..3 (gguf: low - 4 when the hmask bit is 0, low when it is 1).
    16 sub-blocks of 16 weights with signed 6-bit scales sc = raw - 32 in -32..31; raw scale s
    has its low 4 bits in scales[s] (s < 8, low nibble) or scales[s-8] (high nibble), its
    high 2 bits at bits 2*(s//4) of scales[8 + s%4].
    value = d*sc * code, step = d*sc (negative when sc < 0).
    """

    qtype = GGMLQuantizationType.Q3_K
    code_min, code_max = -4, 3

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 108:110])  # (n_blocks, 1)
        scale_low = _unpack(blocks[:, 96:104], group_len=8, bits=4)  # (n_blocks, 16)
        scale_high = _unpack(blocks[:, 104:108], group_len=4, bits=2)  # (n_blocks, 16)
        sc = (scale_low | (scale_high << 4)).astype(np.int8) - np.int8(32)  # (n_blocks, 16), -32..31
        low = _unpack(blocks[:, 32:96], group_len=32, bits=2)  # (n_blocks, 256)
        high = _unpack(blocks[:, 0:32], group_len=32, bits=1)  # (n_blocks, 256)
        codes = (low | (high << 2)).astype(np.int32) + self.code_min
        return codes, _sub_block_steps(d, sc, 16)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 256)
        out = blocks.copy()
        out[:, 0:32] = _pack(stored >> 2, group_len=32, bits=1)
        out[:, 32:96] = _pack(stored & 0x03, group_len=32, bits=2)
        return out


class Q4_KGrid(QuantGrid):
    """Q4_K, 256 weights in 144 bytes: d f16 (2) | dmin f16 (2) | scales (12) | qs (128).

    Weight i = 64*c + 32*k + j is nibble k (0 low, 1 high) of qs[32*c + j]; code in 0..15.
    8 sub-blocks of 32 weights (s = i // 32) with 6-bit sc and min packed in the 12 scale bytes
    (see `_k_scales_mins`).  value = d*sc * code - dmin*min, step = d*sc.
    """

    qtype = GGMLQuantizationType.Q4_K
    code_min, code_max = 0, 15

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 0:2])  # (n_blocks, 1)
        sc, _ = _k_scales_mins(blocks[:, 4:16])  # (n_blocks, 8)
        codes = _unpack(blocks[:, 16:144], group_len=32, bits=4).astype(np.int32)  # (n_blocks, 256)
        return codes, _sub_block_steps(d, sc, 32)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 16:144] = _pack(self._stored(codes), group_len=32, bits=4)
        return out


class Q5_KGrid(QuantGrid):
    """Q5_K, 256 weights in 176 bytes: d f16 (2) | dmin f16 (2) | scales (12) | qh (32) | qs (128).

    Low 4 bits as the Q4_K nibbles in qs; bit 4 of weight i = 32*b + j is bit b of qh[j].
    code in 0..31; scales and mins as Q4_K.  value = d*sc * code - dmin*min, step = d*sc.
    """

    qtype = GGMLQuantizationType.Q5_K
    code_min, code_max = 0, 31

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 0:2])  # (n_blocks, 1)
        sc, _ = _k_scales_mins(blocks[:, 4:16])  # (n_blocks, 8)
        high = _unpack(blocks[:, 16:48], group_len=32, bits=1)  # (n_blocks, 256)
        low = _unpack(blocks[:, 48:176], group_len=32, bits=4)  # (n_blocks, 256)
        codes = (low | (high << 4)).astype(np.int32)
        return codes, _sub_block_steps(d, sc, 32)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 256)
        out = blocks.copy()
        out[:, 16:48] = _pack(stored >> 4, group_len=32, bits=1)
        out[:, 48:176] = _pack(stored & 0x0F, group_len=32, bits=4)
        return out


class Q6_KGrid(QuantGrid):
    """Q6_K, 256 weights in 210 bytes: ql (128) | qh (64) | scales int8 (16) | d f16 (2).

    Low 4 bits of weight i = 128*h + 64*k + j (j < 64): nibble k of ql[64*h + j];
    high 2 bits of weight i = 128*h + 32*k + j (j < 32): bits 2k..2k+1 of qh[32*h + j].
    q in 0..63, code = q - 32 in -32..31. 16 sub-blocks of 16 weights with signed int8 sc.
    value = d*sc * code, step = d*sc (negative when sc < 0).
    """

    qtype = GGMLQuantizationType.Q6_K
    code_min, code_max = -32, 31

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = _f16(blocks[:, 208:210])  # (n_blocks, 1)
        sc = blocks[:, 192:208].view(np.int8)  # (n_blocks, 16)
        low = _unpack(blocks[:, 0:128], group_len=64, bits=4)  # (n_blocks, 256)
        high = _unpack(blocks[:, 128:192], group_len=32, bits=2)  # (n_blocks, 256)
        codes = (low | (high << 4)).astype(np.int32) + self.code_min
        return codes, _sub_block_steps(d, sc, 16)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 256)
        out = blocks.copy()
        out[:, 0:128] = _pack(stored & 0x0F, group_len=64, bits=4)
        out[:, 128:192] = _pack(stored >> 4, group_len=32, bits=2)
        return out


class FloatGrid(QuantGrid):
    """A plain float format: a "block" is one element, its code is the element's raw bit pattern.

    Floats are sign-magnitude: code + 1 moves the magnitude up by one ulp, so for a negative value
    (sign bit set) code + 1 makes the value more negative, and step is negative. step is one unit
    in the last place in the element's own format, 2**(max(exponent, 1) - bias - mantissa_bits),
    with the element's sign; this is np.spacing of the value except at the largest finite value
    (where np.spacing is inf) and at -0.0 (where np.spacing is +tiny but code + 1 gives -tiny).
    Infinities and NaNs have step NaN. Codes span the full bit range.
    """

    exponent_bits: int
    mantissa_bits: int
    bits_dtype: type  # unsigned integer type of the element's bit pattern

    def __init__(self):
        super().__init__()
        self.code_min, self.code_max = 0, (1 << (8 * self.type_size)) - 1

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        bits = blocks.view(self.bits_dtype)  # (n_blocks, 1)
        exponent = ((bits >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)).astype(np.int32)
        negative = (bits >> (self.exponent_bits + self.mantissa_bits)) != 0
        bias = (1 << (self.exponent_bits - 1)) - 1
        ulp = np.ldexp(np.float32(1), np.maximum(exponent, 1) - bias - self.mantissa_bits).astype(np.float32)
        step = np.where(negative, -ulp, ulp)
        step[exponent == (1 << self.exponent_bits) - 1] = np.nan
        return bits.astype(self.code_dtype), step

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        return np.ascontiguousarray(codes.astype(self.bits_dtype)).view(np.uint8).reshape(blocks.shape)


class F32Grid(FloatGrid):
    """F32: 4 bytes, 8 exponent bits, 23 mantissa bits. Codes 0..2**32-1 held in int64."""

    qtype = GGMLQuantizationType.F32
    exponent_bits, mantissa_bits, bits_dtype = 8, 23, np.uint32
    code_dtype = np.int64


class F16Grid(FloatGrid):
    """F16: 2 bytes, 5 exponent bits, 10 mantissa bits. Codes 0..65535."""

    qtype = GGMLQuantizationType.F16
    exponent_bits, mantissa_bits, bits_dtype = 5, 10, np.uint16


class BF16Grid(FloatGrid):
    """BF16: 2 bytes, 8 exponent bits, 7 mantissa bits (the top half of an F32). Codes 0..65535."""

    qtype = GGMLQuantizationType.BF16
    exponent_bits, mantissa_bits, bits_dtype = 8, 7, np.uint16


GRIDS: dict[GGMLQuantizationType, QuantGrid] = {
    grid.qtype: grid
    for grid in (
        Q4_0Grid(), Q4_1Grid(), Q5_0Grid(), Q5_1Grid(), Q8_0Grid(),
        Q2_KGrid(), Q3_KGrid(), Q4_KGrid(), Q5_KGrid(), Q6_KGrid(),
        F32Grid(), F16Grid(), BF16Grid(),
    )
}
assert QK_K == 256  # the K-quant layouts above are written for 256-weight super-blocks


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
