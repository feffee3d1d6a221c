"""The quantizers' hot loops compiled (searches.c), through ctypes: the same bits as the numpy code, faster.

The four scale searches of searches.py, the K-quants' codes from the stored scales
(kquants._requantize) and the legacy types' importance weights (legacy._importance).

`library()` is the loaded library, or None where it cannot be had (QPSA_KERNEL=0, no C compiler, a
failed build; see `qpsa.native`), and each wrapper below then returns None: searches.py runs its
numpy version instead. The C does each group's float32 operations in numpy's order and is compiled
with -ffp-contract=off (no fused multiply-adds) and without -ffast-math, so it gives the same bits
(tests/gguf/test_compiled_searches.py compares the two on edge cases; test_quantize.py and
test_weighted_quantize.py compare both with ggml). Groups of more than 256 weights (no GGML type
has them) go to numpy.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
from pathlib import Path

import numpy as np

from qpsa import native

SOURCE = Path(__file__).with_name("searches.c")
FLAGS = ["-O2", "-march=native", "-ffp-contract=off", "-fno-fast-math"]
MAX_GROUP = 256  # searches.c's MAX_N


def library() -> ctypes.CDLL | None:
    """The compiled searches, or None where they cannot be built or loaded (see the module doc)."""
    if not native.enabled():
        return None
    return _load()


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        return build(FLAGS)
    except (OSError, subprocess.SubprocessError):
        return None


def build(flags: list[str], name: str = "searches") -> ctypes.CDLL:
    """searches.c built with these flags (cached as <name>-<hash>.so) and loaded, its signatures set."""
    path = native.build(SOURCE, name, flags, native.compiler(), key_extra=" ".join(flags).encode())
    lib = ctypes.CDLL(str(path))
    L, I, P, Fl = ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.scale_min_search_f32.argtypes = [P, L, L, P, L, L, L, L, I, Fl, Fl, I, I, I, P, P, P]
    lib.scale_search_f32.argtypes = [P, L, L, P, L, L, L, L, I, P, P]
    lib.scale_refine_f32.argtypes = [P, L, L, L, L, I, P, P]
    lib.scale_fit_f32.argtypes = [P, L, L, P, L, L, L, L, I, P, P]
    lib.requantize_codes.argtypes = [P, P, L, L, I, P, P, I, I, P]
    lib.legacy_importance.argtypes = [P, P, L, L, P]
    for f in (lib.scale_min_search_f32, lib.scale_search_f32, lib.scale_refine_f32, lib.scale_fit_f32, lib.requantize_codes,
              lib.legacy_importance):
        f.restype = None
    return lib


def _usable(x: np.ndarray) -> ctypes.CDLL | None:
    if x.ndim != 2 or not 0 < x.shape[0] <= MAX_GROUP:
        return None
    return library()


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _strided(a: np.ndarray, shape) -> tuple:
    """A float32 (n, S) array as C reads it: (the array, to keep alive, its address, row stride, column
    stride), strides in elements, so a transposed or broadcast view goes in without a copy."""
    a = np.broadcast_to(np.asarray(a, dtype=np.float32), shape)
    if any(st % 4 for st in a.strides):
        a = np.ascontiguousarray(a)
    return a, a.ctypes.data, a.strides[0] // 4, a.strides[1] // 4


def scale_min_search(x, w, nmax, rmin, rdelta, nstep, use_mad, qkx3=False):
    """searches.scale_min_search compiled; None where it cannot run."""
    lib = _usable(x)
    if lib is None:
        return None
    n, S = x.shape
    x, *xp = _strided(x, x.shape)
    w, *wp = _strided(w, x.shape)
    scale, mins = np.empty(S, np.float32), np.empty(S, np.float32)
    codes = np.empty((n, S), np.int32)
    lib.scale_min_search_f32(*xp, *wp, n, S, nmax, rmin, rdelta, nstep, int(use_mad), int(qkx3),
                             scale.ctypes.data, mins.ctypes.data, codes.ctypes.data)
    return scale, mins, codes


def scale_search(x, nmax, w=None):
    """searches.scale_search compiled; None where it cannot run."""
    lib = _usable(x)
    if lib is None:
        return None
    n, S = x.shape
    x, *xp = _strided(x, x.shape)
    w, *wp = (None, None, 0, 0) if w is None else _strided(w, x.shape)
    scale, codes = np.empty(S, np.float32), np.empty((n, S), np.int32)
    lib.scale_search_f32(*xp, *wp, n, S, nmax, scale.ctypes.data, codes.ctypes.data)
    return scale, codes


def scale_refine(x, nmax):
    """searches.scale_refine compiled; None where it cannot run."""
    lib = _usable(x)
    if lib is None:
        return None
    n, S = x.shape
    x, *xp = _strided(x, x.shape)
    scale, codes = np.empty(S, np.float32), np.empty((n, S), np.int32)
    lib.scale_refine_f32(*xp, n, S, nmax, scale.ctypes.data, codes.ctypes.data)
    return scale, codes


def scale_fit(x, w, nmax):
    """searches.scale_fit compiled; None where it cannot run."""
    lib = _usable(x)
    if lib is None:
        return None
    n, S = x.shape
    x, *xp = _strided(x, x.shape)
    w, *wp = _strided(w, x.shape)
    scale, codes = np.empty(S, np.float32), np.empty((n, S), np.uint8)
    lib.scale_fit_f32(*xp, *wp, n, S, nmax, scale.ctypes.data, codes.ctypes.data)
    return scale, codes


def requantize(x, codes, shift, d_sub, offset, lowest, highest):
    """kquants._requantize compiled; None where it cannot run. x float32 (B, n_sub, sub_len); codes int32
    (sub_len, B·n_sub), the search's; d_sub, offset float32 (B, n_sub) (offset may be None) -> int32 (B, n_sub·sub_len)."""
    lib = library()
    if lib is None:
        return None
    x, d_sub = _f32(x), _f32(d_sub)
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    offset = None if offset is None else _f32(offset)
    B, n_sub, sub_len = x.shape
    out = np.empty((B, n_sub * sub_len), np.int32)
    lib.requantize_codes(x.ctypes.data, codes.ctypes.data, B * n_sub, sub_len, shift, d_sub.ctypes.data,
                         None if offset is None else offset.ctypes.data, lowest, highest, out.ctypes.data)
    return out


def importance(x, weights):
    """legacy._importance compiled; None where it cannot run. x float32 whole rows of blocks (B, block_size),
    weights (n,) -> (B, block_size)."""
    lib = library()
    if lib is None:
        return None
    x, weights = _f32(x), _f32(weights)
    out = np.empty(x.shape, np.float32)
    lib.legacy_importance(x.ctypes.data, weights.ctypes.data, x.size // weights.size, weights.size, out.ctypes.data)
    return out
