"""The compiled CPU kernels (qpsa/model/kernels.c) against float64 references, their build and cache,
and every way of falling back to torch."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from qpsa import native
from qpsa.model import kernel
from qpsa.model.kernel import kernel_act_mul_, kernel_attention, kernel_logsumexp_merge_, kernel_rms_norm, kernels

HAVE_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None

pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="needs a C compiler")


def test_the_kernels_build_where_a_compiler_is():
    assert kernels() is not None


def reference_attention(q, k, v, scale, window):
    """Causal (sliding-window) GQA attention in float64: (B, T, H, D) -> (B, T, H·D)."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    seen = (dist >= 0) & (dist < window if window else True)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~seen, -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)


def qkv_views(B, T, H, K, D, seed=0, spread=1.0):
    """q, k, v as the layer hands them over: views into one (B, T, (H+2K)·D) projection output."""
    qkv = torch.randn(B, T, (H + 2 * K) * D, generator=torch.Generator().manual_seed(seed)) * spread
    return (t.unflatten(-1, (-1, D)) for t in qkv.split([H * D, K * D, K * D], dim=-1))


@pytest.mark.parametrize(
    "B, T, H, K, D",
    [
        (2, 70, 9, 3, 64),  # SmolLM2's heads: G = 3, D = 64
        (1, 130, 4, 1, 256),  # Gemma 3's: G = 4, D = 256
        (3, 40, 4, 4, 8),  # G = 1, D below one vector
        (1, 33, 16, 2, 48),  # G = 8, D not a multiple of the vector width
        (2, 57, 6, 2, 80),  # D = 80: padded value channels
        (1, 1, 2, 1, 64),  # one token
    ],
)
@pytest.mark.parametrize("window", [0, 5, 50])
@pytest.mark.parametrize("block", [None, 1, 7, 1000])
def test_attention_matches_float64(B, T, H, K, D, window, block):
    """Ragged query blocks (7), one position per block (1), one block for everything (1000), and
    sliding windows shorter and longer than the blocks."""
    q, k, v = qkv_views(B, T, H, K, D, seed=T + D)
    scale = D**-0.5
    with torch.inference_mode():
        got = kernel_attention(q, k, v, scale, window, block=block)
    expected = reference_attention(q, k, v, scale, window)
    assert got.shape == (B, T, H * D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


def test_attention_with_scores_spread_wide():
    """Scores over hundreds of nats: most probabilities underflow to 0 and the max must be subtracted.
    float32 scores that large carry ~1e-4 absolute rounding, so the bar is torch's own float32 error."""
    q, k, v = qkv_views(2, 96, 6, 2, 32, spread=6.0)
    expected = reference_attention(q, k, v, 1.0, 0)
    with torch.inference_mode():
        got = kernel_attention(q, k, v, 1.0)
        torch_f32 = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=1.0, enable_gqa=True
        ).transpose(1, 2).reshape(got.shape)
    assert (expected - torch_f32.double()).abs().max() > 1e-5  # the case really is ill-conditioned
    assert (got.double() - expected).abs().max() <= 1.5 * (torch_f32.double() - expected).abs().max()


def test_attention_reads_any_strides():
    _, k, v = qkv_views(2, 45, 6, 3, 16)
    q_strided = torch.randn(2, 6, 45, 16).transpose(1, 2)  # head-major storage
    with torch.inference_mode():
        got = kernel_attention(q_strided, k, v, 0.25)
    torch.testing.assert_close(got.double(), reference_attention(q_strided, k, v, 0.25, 0), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 576), (3, 640), (4, 5, 13), (1, 1, 1)])
def test_rms_norm_matches_float64(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    weight = torch.randn(shape[-1])
    before = x.clone()
    with torch.inference_mode():
        got = kernel_rms_norm(x, weight, 1e-6)
    expected = F.rms_norm(x.double(), weight.shape, weight.double(), 1e-6)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(x, before)


@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu"])
@pytest.mark.parametrize("n", [1536, 17, 3])
def test_act_mul_matches_float64(gelu, n):
    """Gate values out to ±100 (exp's overflow and underflow range), a ragged last vector (17, 3)."""
    gen = torch.Generator().manual_seed(n)
    gate_up = torch.cat([torch.randn(2, 5, n, generator=gen) * 30, torch.randn(2, 5, n, generator=gen)], dim=-1)
    gate_up[0, 0, :3] = torch.tensor([100.0, -100.0, 0.0])[:n]
    gate, up = gate_up.double().chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    expected = act * up
    up_before = gate_up[..., n:].clone()
    with torch.inference_mode():
        got = kernel_act_mul_(gate_up, gelu=gelu)
    assert got.data_ptr() == gate_up.data_ptr() and got.shape == (2, 5, n)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(gate_up[..., n:], up_before)


@pytest.mark.parametrize("chunk", [1024, 37, 5])
def test_logsumexp_merge_matches_float64(chunk):
    """A running logsumexp over vocabulary chunks (ragged last chunk, chunks narrower than a vector),
    starting from -inf, on logits spread over ±80 nats (most exps underflow) and read through a
    row stride wider than the chunk, as the head's buffer is."""
    z = torch.randn(6, 300, generator=torch.Generator().manual_seed(chunk)) * 30
    z[1] = 80.0 - torch.arange(300.0)  # one row with values everywhere from +80 to -219
    lse = torch.full((6,), -math.inf)
    with torch.inference_mode():
        for start in range(0, 300, chunk):
            assert kernel_logsumexp_merge_(z[:, start : start + chunk], lse)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.double(), dim=-1), atol=1e-5, rtol=1e-6)


def test_every_kernel_declines_what_it_does_not_cover():
    x = torch.randn(2, 4, 8)
    w = torch.ones(8)
    q, k, v = qkv_views(1, 4, 2, 1, 8)
    assert kernel_rms_norm(x, w, 1e-6) is None  # autograd on: torch records the graph
    with torch.inference_mode():
        assert kernel_rms_norm(x.double(), w.double(), 1e-6) is None
        assert kernel_rms_norm(x.transpose(0, 1), w, 1e-6) is None  # not contiguous
        assert kernel_act_mul_(x.transpose(0, 1), gelu=False) is None
        assert kernel_attention(q.double(), k.double(), v.double(), 1.0) is None
        assert not kernel_logsumexp_merge_(x[0].t(), torch.zeros(8))  # not unit stride along the row
        assert kernel_attention(q, k, v, 1.0) is not None


def test_qpsa_kernel_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("QPSA_KERNEL", "0")
    assert kernels() is None
    with torch.inference_mode():
        assert kernel_rms_norm(torch.randn(3, 8), torch.ones(8), 1e-6) is None


def test_no_compiler_means_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernel._load.cache_clear()
    try:
        assert kernels() is None
    finally:
        kernel._load.cache_clear()
    assert not list((tmp_path / "fresh").glob("kernels/*"))  # nothing half-written left behind


def test_the_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path))
    first = kernel._build("cc")
    stamp = first.stat().st_mtime_ns
    assert kernel._build("cc") == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial files
    monkeypatch.setattr(native, "cpu_id", lambda: "another cpu")
    assert kernel._build("cc") != first
