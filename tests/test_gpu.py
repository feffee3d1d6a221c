"""On a CUDA GPU: every command on the bundled models, and the GPU's numbers against the CPU's.
Skipped where torch sees no CUDA device (CI is CPU-only); run with `python -m pytest -m gpu tests/test_gpu.py`
and record the results in docs/benchmarks.md with the GPU named."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.bundled import WIKITEXT, bundled_path
from tests.helpers.cli_run import run

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on the GPU as on the CPU: no TF32 matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_dequantization_on_the_gpu_equals_the_cpu(name):
    from qpsa.gguf.read import open_gguf
    from qpsa.model.weights import WeightStore

    gguf_file = open_gguf(bundled_path(name))
    cpu, gpu = WeightStore.from_gguf(gguf_file, budget=0.0), WeightStore.from_gguf(gguf_file, device="cuda", budget=0.0)
    for unit in [0, 1, "token_embd.weight"]:
        a = cpu.layer(unit) if isinstance(unit, int) else {unit: cpu.matrix(unit)}
        b = gpu.layer(unit) if isinstance(unit, int) else {unit: gpu.matrix(unit)}
        for n in a:
            assert b[n].device.type == "cuda" and torch.equal(a[n], b[n].cpu()), n


def test_every_torch_dequantizer_on_the_gpu_equals_the_cpu():
    """Every type, random blocks: the GPU's values bit for bit the CPU's (NaN where both are NaN)."""
    import numpy as np

    from qpsa.gguf.quants import GRIDS

    rng = np.random.default_rng(0)
    for qtype, grid in GRIDS.items():
        blocks = torch.from_numpy(rng.integers(0, 256, size=(257, grid.type_size), dtype=np.uint8))
        a, b = grid.dequantize_torch(blocks), grid.dequantize_torch(blocks.cuda())
        assert b.device.type == "cuda", qtype.name
        assert torch.equal(a.view(torch.int32), b.cpu().view(torch.int32)), qtype.name


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_float32_ppl_on_the_gpu_matches_the_cpu(name, capsys):
    results = {}
    for device in ("cpu", "cuda"):
        code, out, err = run(capsys, "ppl", name, "--text", WIKITEXT, "--chunks", 4, "--device", device, "--json")
        assert code == 0, err
        results[device] = json.loads(out)
    assert results["cuda"]["model"]["device"].startswith("cuda")
    assert abs(results["cuda"]["ppl"] / results["cpu"]["ppl"] - 1) < 1e-3, (results["cuda"]["ppl"], results["cpu"]["ppl"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precisions_on_the_gpu_are_close(dtype, capsys):
    ppl = {}
    for d in ("float32", dtype):
        code, out, err = run(capsys, "ppl", "smollm2-135m", "--text", WIKITEXT, "--chunks", 4, "--device", "cuda",
                             "--dtype", d, "--json")
        assert code == 0, err
        ppl[d] = json.loads(out)["ppl"]
    assert abs(ppl[dtype] / ppl["float32"] - 1) < 0.03, ppl


def test_on_demand_weights_on_the_gpu_equal_resident(capsys):
    out = {}
    for extra in ([], ["--max-memory", "1G"]):
        code, text, err = run(capsys, "ppl", "smollm2-135m", "--text", WIKITEXT, "--chunks", 2, "--device", "cuda",
                              "--json", *extra)
        assert code == 0, err
        out[bool(extra)] = json.loads(text)
    assert out[True]["model"]["weights"] == "on demand"
    assert out[True]["ppl"] == out[False]["ppl"]


def _commands(tmp):
    m = "smollm2-135m"
    return {
        "baseline": ["baseline", m, "--max-tokens", 128, "--out", tmp / "b.json"],
        "score": ["score", m, "--max-tokens", 128, "--samples-per-matrix", 2, "--layers", "0,29", "--out", tmp / "s.json"],
        "prune": ["prune", m, "--rankings", tmp / "b.json", "--k", 1, "--eval-tokens", 128],
        "loop": ["loop", m, "--rankings", tmp / "b.json", "--k", 1, "--eval-tokens", 128],
        "compare": ["compare", m, "--type", "Q8_0", "--chunks", 1, "--text", WIKITEXT],
        "sensitivity": ["sensitivity", m, "--to", "Q8_0", "--chunks", 1, "--text", WIKITEXT, "--out", tmp / "sens"],
        "plan": ["plan", m, "--target-bpw", 6, "--chunks", 1, "--text", WIKITEXT, "--out", tmp / "plan"],
        "noise": ["noise", m, "--chunks", 1, "--text", WIKITEXT, "--out", tmp / "noise"],
        "imatrix": ["imatrix", m, "--chunks", 1, "--text", WIKITEXT, "--output", tmp / "im.gguf"],
        "study": ["study", m, "--quick", "--out", tmp / "study"],
    }


def test_every_command_runs_on_the_gpu(tmp_path, capsys):
    """Each command on cuda (in order: prune and loop read baseline's rankings); each names the device."""
    failures = {}
    for name, args in _commands(tmp_path).items():
        code, out, err = run(capsys, *args, "--device", "cuda")
        if code != 0:
            failures[name] = err.strip().splitlines()[-1:] if err.strip() else code
    assert not failures, failures
    assert json.loads((tmp_path / "b.json").read_text())["model"]["device"].startswith("cuda")
