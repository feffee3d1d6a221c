"""The compiled scale searches (qpsa/gguf/quants/searches.c) against their numpy versions, bit for bit,
and the numpy fallback where the library is switched off or cannot be built.

test_quantize.py and test_weighted_quantize.py compare `quantize` with ggml on the default path
(compiled where a compiler is); the tests here keep the numpy path equal to it and to ggml.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from test_quantize import DATA_KINDS, EDGE_KINDS, make_data
from test_weighted_quantize import make_weights

from qpsa.gguf.quants import QUANTIZE_TYPES, compiled, quantize, searches

HAVE_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
needs_library = pytest.mark.skipif(not HAVE_COMPILER, reason="needs a C compiler")

BLOCK_TYPES = [t for t in QUANTIZE_TYPES if t not in (T.F32, T.F16, T.BF16)]
GROUP_KINDS = ["gauss", "all zero", "constant", "negative", "near 1e-15", "1e-30..1e30", "ties", "one spike", "nan", "inf"]


def make_groups(kind: str, rng: np.random.Generator, n: int, groups: int = 37) -> np.ndarray:
    """float32 (n, groups): weight j of group s at [j, s], as the searches take them; 37 groups leave
    a partial block of vector lanes."""
    x = rng.standard_normal((n, groups))
    if kind == "all zero":
        x[:] = 0
        x[:, ::3] = -0.0
    elif kind == "constant":
        x[:] = rng.standard_normal(groups)
        x[:, ::2] = -np.abs(x[:, ::2])
    elif kind == "negative":
        x = -np.abs(x)
    elif kind == "near 1e-15":  # around GROUP_MAX_EPS, the all-zero threshold
        x *= 1e-15 * 10.0 ** rng.uniform(-1, 1, groups)
    elif kind == "1e-30..1e30":  # products and squares overflow and underflow
        x *= 10.0 ** rng.uniform(-30, 30, (n, groups))
    elif kind == "ties":  # every value on the half-integer grid of a few scales
        x = np.round(x * 4) / 2
    elif kind == "one spike":
        x *= 1e-3
        x[rng.integers(0, n, groups), np.arange(groups)] = 50.0
    elif kind == "nan":  # the searches over scales can meet NaN (ggml's loops skip or keep it)
        x[rng.random((n, groups)) < 0.1] = np.nan
    elif kind == "inf":
        x[rng.random((n, groups)) < 0.05] = np.inf
        x[rng.random((n, groups)) < 0.05] = -np.inf
    return np.asarray(x, dtype=np.float32)


def make_group_weights(kind: str, rng: np.random.Generator, shape) -> np.ndarray:
    w = np.exp(rng.normal(0, 2, shape))
    if kind == "zero":
        w[:] = 0
    elif kind == "some zero":
        w *= rng.random(shape) < 0.5
    return np.asarray(w, dtype=np.float32)


def assert_same_bits(numpy_out, compiled_out):
    """Every output of the compiled search has numpy's dtype, shape and bits (NaN included), group by group."""
    assert compiled_out is not None
    for ours, reference in zip(compiled_out, numpy_out, strict=True):
        assert ours.dtype == reference.dtype and ours.shape == reference.shape
        a, b = np.ascontiguousarray(ours), np.ascontiguousarray(reference)
        if a.dtype == np.float32:
            a, b = a.view(np.int32), b.view(np.int32)
        same = a == b if a.ndim == 1 else (a == b).all(axis=0)  # (S,)
        assert same.all(), f"groups {np.flatnonzero(~same)[:8]} differ: compiled {ours[..., ~same][..., :3]}, numpy {reference[..., ~same][..., :3]}"


@pytest.fixture
def rng():
    return np.random.default_rng(20250607)


@needs_library
@pytest.mark.parametrize("weights", ["lognormal", "zero", "some zero"])
@pytest.mark.parametrize("kind", GROUP_KINDS)
@pytest.mark.parametrize("n,nmax,rmin,rdelta,nstep,use_mad,qkx3", [
    (16, 3, -0.5, 0.1, 15, True, False),  # Q2_K
    (32, 15, -1.0, 0.1, 20, False, False),  # Q4_K
    (32, 31, -0.5, 0.1, 15, False, False),  # Q5_K
    (32, 15, -0.9, 0.05, 36, False, True),  # with an importance matrix
    (16, 3, -0.9, 0.05, 36, False, True),
])
def test_scale_min_search(kind, weights, n, nmax, rmin, rdelta, nstep, use_mad, qkx3, rng):
    x = make_groups(kind, rng, n)
    w = make_group_weights(weights, rng, x.shape)
    with np.errstate(all="ignore"):
        assert_same_bits(searches.scale_min_search_numpy(x, w, nmax, rmin, rdelta, nstep, use_mad, qkx3),
                         compiled.scale_min_search(x, w, nmax, rmin, rdelta, nstep, use_mad, qkx3))


@needs_library
@pytest.mark.parametrize("weights", [None, "lognormal", "zero", "some zero"])
@pytest.mark.parametrize("kind", GROUP_KINDS)
@pytest.mark.parametrize("n,nmax", [(16, 32), (32, 8), (32, 16), (16, 4), (8, 32)])
def test_scale_search(kind, weights, n, nmax, rng):
    x = make_groups(kind, rng, n)
    w = None if weights is None else make_group_weights(weights, rng, x.shape)
    with np.errstate(all="ignore"):
        assert_same_bits(searches.scale_search_numpy(x, nmax, w), compiled.scale_search(x, nmax, w))


@needs_library
@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_scale_refine(kind, rng):
    x = make_groups(kind, rng, 16)
    with np.errstate(all="ignore"):
        assert_same_bits(searches.scale_refine_numpy(x, 4), compiled.scale_refine(x, 4))


@needs_library
@pytest.mark.parametrize("weights", ["lognormal", "zero", "some zero"])
@pytest.mark.parametrize("kind", GROUP_KINDS + ["positive"])
@pytest.mark.parametrize("n,nmax", [(8, 63), (16, 15)])
def test_scale_fit(kind, weights, n, nmax, rng):
    x = make_groups("gauss" if kind == "positive" else kind, rng, n)
    if kind == "positive":  # what it fits: sub-block scales and mins
        x = np.abs(x)
    w = make_group_weights(weights, rng, x.shape)
    with np.errstate(all="ignore"):
        assert_same_bits(searches.scale_fit_numpy(x, w, nmax), compiled.scale_fit(x, w, nmax))


@needs_library
@pytest.mark.parametrize("kind", DATA_KINDS + EDGE_KINDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantize_compiled_equals_numpy(qtype, weighted, kind, rng, monkeypatch):
    """Every type, with and without importance weights: the same bytes with QPSA_KERNEL=0 (numpy) as compiled."""
    x = make_data(kind, rng, rows=4)
    w = make_weights("lognormal", rng) if weighted else None
    assert compiled.library() is not None
    fast = quantize(x, qtype, w)
    monkeypatch.setenv("QPSA_KERNEL", "0")
    assert compiled.library() is None
    assert (quantize(x, qtype, w) == fast).all()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q3_K, T.Q2_K, T.Q6_K, T.Q4_1, T.Q5_0], ids=lambda t: t.name)
def test_numpy_fallback_identical_to_ggml(qtype, rng, monkeypatch, llama_cpp):
    """The numpy path alone (QPSA_KERNEL=0), with and without importance weights, against ggml."""
    from qpsa.reference.llamacpp import ggml_quantize

    monkeypatch.setenv("QPSA_KERNEL", "0")
    x = make_data("gauss", rng, rows=4)
    type_size = GGML_QUANT_SIZES[qtype][1]
    for w in (None, make_weights("lognormal", rng)):
        assert (quantize(x, qtype, w).reshape(-1, type_size) == ggml_quantize(x, qtype, w).reshape(-1, type_size)).all()


def test_no_compiler_means_numpy(monkeypatch, tmp_path):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    compiled._load.cache_clear()
    try:
        assert compiled.library() is None
        x = make_groups("gauss", np.random.default_rng(0), 16)
        assert compiled.scale_refine(x, 4) is None
        scale, codes = searches.scale_refine(x, 4)  # the numpy version answers
        assert_same_bits(searches.scale_refine_numpy(x, 4), (scale, codes))
    finally:
        compiled._load.cache_clear()
    assert not list((tmp_path / "fresh").glob("kernels/*"))  # nothing half-written left behind


def test_groups_longer_than_the_library_takes_go_to_numpy(rng):
    x = make_groups("gauss", rng, compiled.MAX_GROUP + 1, groups=3)
    assert compiled.scale_search(x, 8) is None
    assert searches.scale_search(x, 8)[1].shape == x.shape


@needs_library
@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_the_vector_width_changes_no_bit(lanes, rng, monkeypatch, tmp_path):
    """searches.c picks 16, 8 or 4 groups per vector from the CPU; built with each width (forced by
    -DLANES, without -march=native for 4 as a CPU without AVX would), every search still gives numpy's bits."""
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path))
    flags = [f for f in compiled.FLAGS if lanes != 4 or f != "-march=native"] + [f"-DLANES={lanes}"]
    library = compiled.build(flags, name=f"searches-lanes{lanes}")
    monkeypatch.setattr(compiled, "library", lambda: library)
    for kind in ("gauss", "all zero", "near 1e-15", "nan"):
        x = make_groups(kind, rng, 32, groups=53)
        w = make_group_weights("lognormal", rng, x.shape)
        with np.errstate(all="ignore"):
            assert_same_bits(searches.scale_min_search_numpy(x, w, 15, -0.9, 0.05, 36, False, True),
                             compiled.scale_min_search(x, w, 15, -0.9, 0.05, 36, False, True))
            assert_same_bits(searches.scale_search_numpy(x, 8, w), compiled.scale_search(x, 8, w))
            assert_same_bits(searches.scale_refine_numpy(x[:16], 4), compiled.scale_refine(x[:16], 4))
            assert_same_bits(searches.scale_fit_numpy(np.abs(x[:8]), w[:8], 63), compiled.scale_fit(np.abs(x[:8]), w[:8], 63))
