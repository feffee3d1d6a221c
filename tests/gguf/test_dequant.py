"""qpsa.gguf.quants.dequantize equals the gguf package's dequantizer, bit for bit, on random blocks of every type."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from qpsa.gguf.quants import GRIDS, dequantize

SCALE_OFFSETS = {  # byte offsets of float16 scales, set to finite values so NaN never hides a mismatch
    Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
FLOAT_TYPES = [Q.F32, Q.F16, Q.BF16]
QUANT_TYPES = sorted((q for q in GRIDS if q not in FLOAT_TYPES), key=lambda q: q.name)  # every registered quant type


def random_blocks(qtype, n_blocks, rng):
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scales = rng.normal(0, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_fast_dequantize_equals_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    blocks = random_blocks(qtype, 257, rng)
    block_size = GGML_QUANT_SIZES[qtype][0]
    ours = dequantize(blocks.reshape(-1), qtype, (257 * block_size,))
    ref = torch.from_numpy(gguf_dequantize(blocks, qtype).reshape(-1).astype(np.float32))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda q: q.name)
def test_float_types_equal_gguf(qtype):
    rng = np.random.default_rng(0)
    values = rng.normal(size=64).astype(np.float32)
    raw = {Q.F32: values, Q.F16: values.astype(np.float16)}.get(qtype)
    if raw is None:  # BF16: the high half of each float32
        raw = (values.view(np.uint32) >> 16).astype(np.uint16)
    raw = raw.view(np.uint8)
    ours = dequantize(raw, qtype, (4, 16))
    ref = torch.from_numpy(gguf_dequantize(raw.reshape(4, -1), qtype).astype(np.float32))
    assert torch.equal(ours, ref)


def test_type_without_fast_path_falls_back_to_gguf():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(3, GGML_QUANT_SIZES[Q.Q2_K][1]), dtype=np.uint8)
    blocks[:, -4:-2] = np.array([0.01], dtype=np.float16).view(np.uint8)  # d
    blocks[:, -2:] = np.array([0.02], dtype=np.float16).view(np.uint8)  # dmin
    ours = dequantize(blocks.reshape(-1), Q.Q2_K, (3, 256))
    assert torch.equal(ours, torch.from_numpy(gguf_dequantize(blocks, Q.Q2_K).astype(np.float32)))


def test_type_without_a_class_falls_back_to_gguf():
    assert Q.IQ4_NL not in GRIDS
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, size=(3, GGML_QUANT_SIZES[Q.IQ4_NL][1]), dtype=np.uint8)
    blocks[:, :2] = np.array([0.01], dtype=np.float16).view(np.uint8)  # d
    ours = dequantize(blocks.reshape(-1), Q.IQ4_NL, (3, 32))
    assert torch.equal(ours, torch.from_numpy(gguf_dequantize(blocks, Q.IQ4_NL).astype(np.float32)))
