"""qpsa.gguf.quants.quantize: byte for byte against llama.cpp's C quantizers and gguf-py, error bounds through gguf's dequantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from helpers.bundled import bundled_path

from qpsa.errors import QpsaError
from qpsa.gguf.quants import QUANTIZE_TYPES, grid_for, quantize

FLOAT_TYPES = [T.F32, T.F16, T.BF16]
SIMPLE_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
K_TYPES = [T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K]  # fewest bits last
# RMSE / RMS of the data on Gaussian weights, each type's bound; measured: 0.0178, 0.0363, 0.0715, 0.151, 0.296
K_RMSE_BOUND = {T.Q6_K: 0.02, T.Q5_K: 0.04, T.Q4_K: 0.08, T.Q3_K: 0.17, T.Q2_K: 0.33}

DATA_KINDS = ["gauss", "outliers", "zero blocks", "constant blocks", "tiny", "huge"]
# further inputs that only the comparison with ggml checks: ties for every rounding, signed zeros, float16
# subnormal and overflowing scales (ggml's results there are poor, and must still be ggml's)
EDGE_KINDS = ["heavy tails", "halves", "float16 grid", "signed zeros", "sparse", "block scales 1e-10..1e3", "1e-7", "1e-39", "1e20", "3e37"]


def make_data(kind: str, rng: np.random.Generator, rows: int = 16, n: int = 1024) -> np.ndarray:
    """float32 (rows, n) test weights of one kind; blocks of 256 where a kind is per block."""
    g = rng.standard_normal((rows, n))
    blocks = g.reshape(rows, -1, 256)  # (rows, n // 256, 256) view
    if kind == "gauss":
        x = g
    elif kind == "outliers":  # 1% of the weights 50x larger
        x = g * np.where(rng.random(g.shape) < 0.01, 50.0, 1.0)
    elif kind == "zero blocks":  # every other 256-block all +0.0
        x = np.where((np.arange(blocks.shape[1]) % 2 == 0)[:, None], blocks, 0.0).reshape(rows, n)
    elif kind == "constant blocks":  # one value per 256-block, either sign
        x = np.repeat(blocks[:, :, :1], 256, axis=2).reshape(rows, n)
    elif kind == "tiny":
        x = g * 1e-3
    elif kind == "huge":
        x = g * 1e3
    elif kind == "heavy tails":  # Student's t with 2 degrees of freedom
        x = rng.standard_t(2, g.shape)
    elif kind == "halves":  # exact halves: ties in every rounding step
        x = rng.integers(-40, 40, g.shape) / 2
    elif kind == "float16 grid":
        x = g.astype(np.float16)
    elif kind == "signed zeros":  # mostly ±0.0, a few weights nonzero
        x = np.where(rng.random(g.shape) < 0.5, -0.0, 0.0) + g * (rng.random(g.shape) < 0.02)
    elif kind == "sparse":
        x = g * (rng.random(g.shape) < 0.05)
    elif kind == "block scales 1e-10..1e3":
        x = (g.reshape(rows, -1, 16) * 10.0 ** rng.uniform(-10, 3, (rows, n // 16, 1))).reshape(rows, n)
    else:  # a magnitude: "1e-7" (float16-subnormal scales), "1e-39" (float32 subnormal), "1e20", "3e37" (infinite scales, overflowing sums)
        x = g * float(kind)
    return np.asarray(x, dtype=np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


def blocks_of(data: np.ndarray, qtype) -> np.ndarray:
    return data.reshape(-1, GGML_QUANT_SIZES[qtype][1])


def dequantized(blocks: np.ndarray, qtype, shape) -> np.ndarray:
    return gguf.quants.dequantize(blocks, qtype).reshape(shape).astype(np.float32)


# --- the API ------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QUANTIZE_TYPES, ids=lambda t: t.name)
def test_shape_and_dtype(qtype, rng):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    out = quantize(x, qtype)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 512 // block_size * type_size)
    assert np.array_equal(quantize(x[1, 2], qtype), out[1, 2])  # 1-D rows, and rows are independent
    assert np.array_equal(quantize(x.astype(np.float64), int(qtype)), out)  # float64 in, type as int
    assert quantize(np.zeros((3, 0), np.float32), qtype).shape == (3, 0)


@pytest.mark.parametrize("qtype", QUANTIZE_TYPES[3:], ids=lambda t: t.name)
def test_row_length_not_a_multiple_of_the_block(qtype):
    block_size = GGML_QUANT_SIZES[qtype][0]
    n = block_size + 16
    with pytest.raises(QpsaError) as err:
        quantize(np.zeros((4, n), np.float32), qtype)
    message = str(err.value)
    assert "\n" not in message
    assert qtype.name in message and f"block size {block_size}" in message and f"row length {n}" in message


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.Q8_K, T.TQ1_0, 9999])
def test_unsupported_type(qtype):
    with pytest.raises(QpsaError, match=getattr(qtype, "name", str(qtype))) as err:
        quantize(np.zeros(256, np.float32), qtype)
    assert all(t.name in str(err.value) for t in QUANTIZE_TYPES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_non_finite_values_raise(qtype, bad):
    x = np.ones((2, 512), np.float32)
    x[1, 300] = bad
    with pytest.raises(QpsaError, match="non-finite.*812"):
        quantize(x, qtype)


def test_non_numeric_input_raises():
    with pytest.raises(QpsaError):
        quantize(np.array([["a"] * 32]), T.Q8_0)


# --- the references -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", DATA_KINDS + EDGE_KINDS)
@pytest.mark.parametrize("qtype", QUANTIZE_TYPES, ids=lambda t: t.name)
def test_identical_to_ggml(qtype, kind, rng, llama_cpp):
    """Every type, every input kind: the bytes of llama.cpp's ggml_quantize_chunk without importance matrix."""
    from qpsa.reference.llamacpp import ggml_quantize

    x = make_data(kind, rng)
    ours, theirs = blocks_of(quantize(x, qtype), qtype), blocks_of(ggml_quantize(x, qtype), qtype)
    same = (ours == theirs).all(axis=1)
    assert same.all(), f"{qtype.name} {kind}: {same.mean():.4%} of {same.size} blocks identical; first differs: {np.argmin(same)}"


@pytest.mark.parametrize("kind", ["gauss", "outliers", "zero blocks", "constant blocks", "tiny", "huge", "halves", "1e-7"])
@pytest.mark.parametrize("qtype", [T.F16, T.BF16, *SIMPLE_TYPES], ids=lambda t: t.name)
def test_identical_to_gguf_py(qtype, kind, rng):
    """gguf-py's numpy quantizers for the types it has. (They differ from ggml on -0.0 inputs, where this follows ggml.)"""
    x = make_data(kind, rng)
    theirs = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    assert np.array_equal(quantize(x, qtype), theirs)


# --- error bounds through gguf's dequantizer ------------------------------------------------


@pytest.mark.parametrize("kind", DATA_KINDS + ["1e-7"])
@pytest.mark.parametrize("qtype", SIMPLE_TYPES, ids=lambda t: t.name)
def test_simple_types_error_is_half_a_step(qtype, kind, rng):
    """|x - dequantized| <= step/2, up to the float16 rounding of the stored d (and m), weight by weight.

    The code is chosen with the float32 scale d, then d is stored as float16 d16 (|d - d16| <= h, half a
    float16 ulp), so the bound is (|d16| + h)/2 + |code|*h (+ h_m for the min of Q4_1/Q5_1). Q4_0/Q5_0 put
    the largest magnitude at code -8/-16; a value of the other sign that large is clamped to code 7/15
    and may be a whole step off: (|d16| + h) + |code|*h there.
    """
    grid = grid_for(qtype)
    x = make_data(kind, rng)
    blocks = blocks_of(quantize(x, qtype), qtype)
    codes, step = grid.decode(blocks)  # (n_blocks, 32)
    x = x.reshape(codes.shape).astype(np.float64)
    error = np.abs(x - dequantized(blocks, qtype, codes.shape))

    def half_ulp(h16):
        return np.spacing(np.abs(h16).astype(np.float16)).astype(np.float64) / 2

    h = half_ulp(step)
    steps = 0.5
    if qtype in (T.Q4_0, T.Q5_0):
        steps = np.where(codes == grid.code_max, 1.0, 0.5)
    bound = steps * (np.abs(step) + h) + np.abs(codes) * h
    if qtype in (T.Q4_1, T.Q5_1):
        bound += half_ulp(blocks[:, 2:4].copy().view(np.float16))  # m: (n_blocks, 1)
    bound += 1e-6 * np.abs(x)  # float32 rounding in quantizing and dequantizing
    assert (error <= bound).all(), f"{qtype.name} {kind}: worst error / bound {np.max(error / np.maximum(bound, 1e-300)):.3f}"
    if kind == "zero blocks":
        assert (error[np.all(x == 0, axis=1)] == 0).all()


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types(qtype, rng):
    x = np.concatenate([make_data(k, rng, rows=2) for k in ["gauss", "tiny", "huge", "1e-39", "signed zeros"]])
    out = quantize(x, qtype)
    if qtype == T.F32:
        assert np.array_equal(out.view(np.uint32), x.view(np.uint32))
    elif qtype == T.F16:
        assert np.array_equal(out.view(np.uint16), x.astype(np.float16).view(np.uint16))
    else:  # nearest bfloat16: within half an ulp of 8 significant bits, ties to even
        back = dequantized(out.reshape(-1, 2), qtype, x.shape).astype(np.float64)
        assert (np.abs(back - x) <= np.spacing(np.abs(x)) * 2**15 + 1e-300).all()
        assert np.array_equal(np.signbit(back), np.signbit(x))


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_k_quant_error_bounded_and_ordered(kind, rng):
    """RMSE / RMS of the data under each type's bound (twice it for non-Gaussian kinds), and fewer bits, more error."""
    x = make_data(kind, rng, rows=32)
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    rmse = {}
    for qtype in K_TYPES:
        back = dequantized(quantize(x, qtype), qtype, x.shape)
        rmse[qtype] = np.sqrt(np.mean((back.astype(np.float64) - x) ** 2)) / rms
        assert rmse[qtype] <= K_RMSE_BOUND[qtype] * (1 if kind == "gauss" else 2), (qtype.name, kind, rmse[qtype])
        if kind == "zero blocks":
            assert (back.reshape(-1, 256)[1::2] == 0).all()
        if kind == "constant blocks":  # every weight near its block's value; Q6_K's d = value / 4096 is a
            # float16 subnormal for |value| < 0.25, which costs it up to 1% here
            assert np.allclose(back, x, rtol=1e-2, atol=0), (qtype.name, np.max(np.abs(back - x) / np.abs(x)))
    if kind not in ("constant blocks",):  # a constant block is nearly exact in every type
        values = [rmse[t] for t in K_TYPES]
        assert values == sorted(values), {t.name: round(float(v), 4) for t, v in rmse.items()}


# --- quantizing dequantized values -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["gauss", "outliers", "zero blocks", "constant blocks", "huge"])
@pytest.mark.parametrize("qtype", FLOAT_TYPES + SIMPLE_TYPES, ids=lambda t: t.name)
def test_requantizing_is_idempotent(qtype, kind, rng):
    """quantize(dequantize(quantize(x))) == quantize(x) byte for byte: the dequantized values are on the grid, and
    the scale found from them is the stored one (while the float16 scale is a normal number: not for tiny data)."""
    x = make_data(kind, rng)
    once = quantize(x, qtype)
    assert np.array_equal(quantize(dequantized(blocks_of(once, qtype), qtype, x.shape), qtype), once)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_requantizing_k_quants_stays_close(qtype, rng):
    """K-quants are not idempotent: the scale search on already-quantized values may settle on other scales.

    Measured on Gaussian data: Q4_K and Q6_K reproduce the same values (bytes differ in 20% of Q6_K's blocks:
    another (d, scale) pair with the same products), Q2_K 99.7%, Q5_K 98%, Q3_K 90% of them. What holds for all:
    the second round trip moves the values by at most a third of the first round trip's error, and is no
    farther from the original data than 1.05x the first.
    """
    x = make_data("gauss", rng, rows=64)
    first = dequantized(quantize(x, qtype), qtype, x.shape).astype(np.float64)
    second = dequantized(quantize(first.astype(np.float32), qtype), qtype, x.shape).astype(np.float64)
    first_error = np.sqrt(np.mean((first - x) ** 2))
    assert np.sqrt(np.mean((second - first) ** 2)) <= first_error / 3
    assert np.sqrt(np.mean((second - x) ** 2)) <= 1.05 * first_error
    unchanged = np.mean(second == first)
    assert unchanged >= {T.Q6_K: 0.999, T.Q4_K: 0.999, T.Q2_K: 0.99, T.Q5_K: 0.95, T.Q3_K: 0.85}[qtype], unchanged


# --- the bundled real models ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_real_tensor_identical_to_ggml(model, llama_cpp):
    """blk.0.ffn_down.weight, dequantized, quantized to every type: ggml's bytes."""
    from qpsa.gguf.read import open_gguf
    from qpsa.reference.llamacpp import ggml_quantize

    tensor = open_gguf(bundled_path(model)).tensors["blk.0.ffn_down.weight"]
    x = tensor.to_torch().numpy()
    for qtype in QUANTIZE_TYPES:
        assert np.array_equal(quantize(x, qtype), ggml_quantize(x, qtype)), qtype.name


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_real_model_requantizes_to_the_file(model):
    """Every F32, Q8_0, Q4_1 and Q5_0 tensor of the bundled models, dequantized and quantized again to its own
    type, gives the file's bytes back. (Their K-quant tensors were made with an importance matrix.)"""
    from qpsa.gguf.read import open_gguf

    n_checked = 0
    for tensor in open_gguf(bundled_path(model)).tensors.values():
        if tensor.qtype in K_TYPES:
            continue
        again = quantize(tensor.to_torch().numpy(), tensor.qtype)
        assert np.array_equal(again.reshape(-1), tensor.raw.reshape(-1)), tensor.name
        n_checked += 1
    assert n_checked > 60
