"""The compiled CPU kernels (kernels.c): built on first use, cached, called through ctypes.

Kernels for the inference path, each in float32: causal (sliding-window) grouped-query attention,
RMS norm and SiLU/GELU(tanh) times up in place for `Transformer.block`, and the running
logsumexp over vocabulary chunks for `Transformer.head_nll`.
`kernels()` returns the loaded library, or None where it cannot be had: no C compiler,
a failed build, not x86-64/aarch64 Linux or macOS, or QPSA_KERNEL=0 in the environment. Callers
then use the pure-torch path (`causal_attention`, `F.rms_norm`, `F.silu`…), which compute the same thing; each wrapper
below returns None where its kernel cannot run, and the caller falls back. The build runs
`$CC` (default `cc`) with -O3 -march=native -fopenmp, once per source, compiler and CPU; the
library goes to <q-psa cache>/kernels/ under a name hashed from all three, written atomically
(`qpsa.native`, which the quantizers' compiled searches share).

OpenMP: the library links libgomp by soname, and torch has already loaded its own libgomp.so.1,
so the dynamic linker binds the kernel to that same runtime: one thread pool, torch's thread
count (`torch.set_num_threads`) applies to both.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
from pathlib import Path

import torch

from qpsa import native

SOURCE = Path(__file__).with_name("kernels.c")


def _build(compiler: str) -> Path:
    return native.build(SOURCE, "kernels", ["-O3", "-march=native", "-fopenmp"], compiler)


def kernels() -> ctypes.CDLL | None:
    """The compiled library with its functions' signatures set, or None where it cannot be built or
    loaded (see the module doc)."""
    if not native.enabled():
        return None
    return _load()


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(_build(native.compiler())))
    except (OSError, subprocess.SubprocessError):
        return None
    L, I, P, Fl = ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    library.causal_attention_f32.argtypes = [P, L, L, L, P, L, L, L, P, L, L, L, P, I, I, I, I, I, Fl, I, I]
    library.causal_attention_f32.restype = I
    library.rms_norm_f32.argtypes = [P, P, P, L, I, Fl]
    library.rms_norm_f32.restype = None
    library.act_mul_f32.argtypes = [P, L, L, I, I]
    library.act_mul_f32.restype = None
    library.logsumexp_merge_f32.argtypes = [P, L, L, L, P]
    library.logsumexp_merge_f32.restype = None
    return library


def engine() -> dict:
    """What computes on the CPU, for reports: torch's thread count and whether the compiled kernels
    are in use ("compiled") or torch's ops stand in for them ("torch ops")."""
    return {"threads": torch.get_num_threads(), "cpu_kernels": "compiled" if kernels() is not None else "torch ops"}


def _usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library, if it loaded and every tensor is float32 on the CPU, outside autograd."""
    library = kernels()
    if library is None or torch.is_grad_enabled():
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    return library


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0,
                     block: int | None = None) -> torch.Tensor | None:
    """Causal attention through the compiled kernel: q (B, T, H, D), k and v (B, T, KH, D) float32
    CPU tensors with unit stride along D -> (B, T, H·D); position t sees keys j <= t (and
    t − j < window if window > 0). None where the kernel is unavailable or the inputs don't fit it."""
    library = _usable(q, k, v)
    if library is None:
        return None
    B, T, H, D = q.shape
    KH = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if block is None:
        block = max(1, 96 // (H // KH))  # ~96 query rows per work item
    out = torch.empty(B, T, H * D, dtype=q.dtype)
    args = []
    for t in (q, k, v):
        args += [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]
    status = library.causal_attention_f32(*args, out.data_ptr(), B, T, H, KH, D, scale, window, block)
    if status != 0:
        raise MemoryError("attention kernel: out of memory")
    return out


def kernel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMS norm over the last dimension of a contiguous x, times weight, into a new tensor; None
    where the kernel cannot run."""
    library = _usable(x, weight)
    if library is None or not x.is_contiguous() or not weight.is_contiguous():
        return None
    n = x.shape[-1]
    out = torch.empty_like(x)
    library.rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def kernel_act_mul_(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor | None:
    """For a contiguous gate_up (..., 2F), rows [gate | up]: gate ← act(gate)·up in place, act SiLU or
    (gelu) GELU's tanh approximation; returns the gate half (..., F), or None where the kernel
    cannot run (nothing written then)."""
    library = _usable(gate_up)
    if library is None or not gate_up.is_contiguous():
        return None
    n = gate_up.shape[-1] // 2
    library.act_mul_f32(gate_up.data_ptr(), gate_up.numel() // (2 * n), 2 * n, n, int(gelu))
    return gate_up[..., :n]


def kernel_logsumexp_merge_(z: torch.Tensor, lse: torch.Tensor) -> bool:
    """lse (R,) ← log(exp(lse) + Σ_j exp(z[:, j])) in place, for z (R, n) with unit stride along n
    and a contiguous lse; False where the kernel cannot run (nothing written then)."""
    library = _usable(z, lse)
    if library is None or z.dim() != 2 or z.stride(-1) != 1 or not lse.is_contiguous():
        return False
    library.logsumexp_merge_f32(z.data_ptr(), z.shape[0], z.shape[1], z.stride(0), lse.data_ptr())
    return True
