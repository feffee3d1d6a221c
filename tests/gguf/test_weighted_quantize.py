"""qpsa.gguf.quants.quantize with importance weights: byte for byte against ggml_quantize_chunk(..., imatrix)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from test_quantize import DATA_KINDS, EDGE_KINDS, make_data

from qpsa.errors import QpsaError
from qpsa.gguf.quants import QUANTIZE_TYPES, quantize

# in order of use; Q8_0 (and the float types) ignore the weights, as ggml does
WEIGHTED_TYPES = [T.Q4_K, T.Q6_K, T.Q5_K, T.Q4_0, T.Q3_K, T.Q2_K, T.Q5_0, T.Q4_1, T.Q5_1, T.Q8_0]
WEIGHT_KINDS = ["lognormal", "uniform", "all zero", "some zero", "one nonzero", "1e-30..1e30", "constant"]


def make_weights(kind: str, rng: np.random.Generator, n: int = 1024) -> np.ndarray:
    """float32 (n,) importance weights of one kind: in_sum2 / count is positive, spread over decades."""
    if kind == "lognormal":  # what an imatrix looks like: mean squares of activations
        w = np.exp(rng.normal(0, 2, n))
    elif kind == "uniform":
        w = rng.random(n)
    elif kind == "all zero":
        w = np.zeros(n)
    elif kind == "some zero":  # columns no token activated
        w = rng.random(n) * (rng.random(n) < 0.7)
    elif kind == "one nonzero":  # per block, every weight but one zero
        w = np.zeros(n)
        w[::32] = 1.0
    elif kind == "1e-30..1e30":
        w = 10.0 ** rng.uniform(-30, 30, n)
    else:
        w = np.full(n, 0.37)
    return np.asarray(w, dtype=np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(20250101)


def assert_identical(x, qtype, w):
    from qpsa.reference.llamacpp import ggml_quantize

    type_size = GGML_QUANT_SIZES[qtype][1]
    ours, theirs = quantize(x, qtype, w).reshape(-1, type_size), ggml_quantize(x, qtype, w).reshape(-1, type_size)
    same = (ours == theirs).all(axis=1)
    assert same.all(), f"{qtype.name}: {same.mean():.4%} of {same.size} blocks identical; first differs: {np.argmin(same)}"


@pytest.mark.parametrize("kind", DATA_KINDS + EDGE_KINDS)
@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda t: t.name)
def test_identical_to_ggml_on_every_data_kind(qtype, kind, rng, llama_cpp):
    """Every input kind of test_quantize.py (zeros, constants, ties, float16 subnormal and infinite scales)."""
    assert_identical(make_data(kind, rng, rows=8), qtype, make_weights("lognormal", rng))


@pytest.mark.parametrize("weight_kind", WEIGHT_KINDS)
@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda t: t.name)
def test_identical_to_ggml_on_every_weight_kind(qtype, weight_kind, rng, llama_cpp):
    """Zero weights (all, some, all but one per block), a 60-decade range, constant: ggml's bytes still."""
    x = np.concatenate([make_data(k, rng, rows=4) for k in ("gauss", "outliers", "zero blocks", "huge")])
    assert_identical(x, qtype, make_weights(weight_kind, rng))


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda t: t.name)
def test_rows_of_other_lengths_and_a_zero_row(qtype, rng, llama_cpp):
    """Legacy types take sigma2 over the whole row: rows of 1 and of 7 super-blocks, one row all zero."""
    for n in (256, 7 * 256):
        x = rng.standard_normal((5, n)).astype(np.float32)
        x[2] = 0
        assert_identical(x, qtype, make_weights("lognormal", rng, n))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_weights_change_the_result_and_lower_the_weighted_error(qtype, rng):
    """The weighted quantizer is not the plain one, and it trades error where the weights are small for
    error where they are large: the weighted squared error is lower than the plain quantizer's."""
    import gguf

    x = make_data("gauss", rng, rows=64)
    w = make_weights("lognormal", rng)
    plain, weighted = quantize(x, qtype), quantize(x, qtype, w)
    assert not np.array_equal(plain, weighted)

    def weighted_error(blocks):
        back = gguf.quants.dequantize(blocks.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype).reshape(x.shape)
        return float(np.sum(w.astype(np.float64) * (back.astype(np.float64) - x) ** 2))

    assert weighted_error(weighted) < weighted_error(plain)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0], ids=lambda t: t.name)
def test_types_that_ignore_weights(qtype, rng):
    x = make_data("gauss", rng)
    assert np.array_equal(quantize(x, qtype, make_weights("lognormal", rng)), quantize(x, qtype))


def test_every_quantize_type_accepts_weights(rng):
    x = make_data("gauss", rng, rows=2)
    for qtype in QUANTIZE_TYPES:
        assert quantize(x, qtype, make_weights("uniform", rng)).shape == quantize(x, qtype).shape


@pytest.mark.parametrize("weights, message", [
    (np.ones(512, np.float32), r"1024 numbers.*\(512,\)"),
    (np.ones((2, 1024), np.float32), r"1024 numbers.*\(2, 1024\)"),
    (np.full(1024, -1.0, np.float32), "-1.0 at column 0 is negative"),
    (np.concatenate([np.ones(1000), [np.nan], np.ones(23)]), "nan at column 1000"),
    (np.array(["a"] * 1024), "1024 numbers"),
])
def test_bad_weights_raise_one_line(weights, message, rng):
    with pytest.raises(QpsaError, match=message) as err:
        quantize(make_data("gauss", rng, rows=2), T.Q4_K, weights)
    assert "\n" not in str(err.value)
