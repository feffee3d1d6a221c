"""--device, --dtype and --max-memory on every command that computes: bad values are one line, exit 2,
before any work; outputs name the device and dtype."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.cli_run import assert_user_error, run
from tests.helpers.tiny import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("dev") / "tiny.gguf", "llama", n_layer=2)


def commands(model, tmp):
    """Each command that computes, with the least arguments it needs."""
    return {
        "ppl": ["ppl", model, "--chunks", 1, "--ctx", 32],
        "baseline": ["baseline", model, "--methods", "layer_ablation", "--max-tokens", 16, "--out", tmp / "b.json"],
        "score": ["score", model, "--max-tokens", 16, "--out", tmp / "s.json"],
        "prune": ["prune", model, "--layers", "1", "--eval-tokens", 16],
        "study": ["study", model, "--quick", "--out", tmp / "study"],
        "compare": ["compare", model, "--type", "Q8_0", "--chunks", 1, "--ctx", 32],
        "sensitivity": ["sensitivity", model, "--to", "Q8_0", "--chunks", 1, "--ctx", 32, "--out", tmp / "sens"],
        "plan": ["plan", model, "--target-bpw", "8", "--chunks", 1, "--ctx", 32, "--out", tmp / "plan"],
        "noise": ["noise", model, "--chunks", 1, "--ctx", 32, "--out", tmp / "noise"],
        "imatrix": ["imatrix", model, "--chunks", 1, "--ctx", 32, "--output", tmp / "imatrix.gguf"],
        "predictors": ["predictors", model, "--chunks", 1, "--ctx", 32, "--out", tmp / "pred"],
    }


NAMES = ["ppl", "baseline", "score", "prune", "study", "compare", "sensitivity", "plan", "noise", "imatrix", "predictors"]


BAD = {
    "device": (["--device", "tpu"], ["--device 'tpu' is not a device"]),
    "device-index": (["--device", "cuda:x"], ["not a device"]),
    "dtype": (["--dtype", "float8"], ["--dtype 'float8' is not supported"]),
    "size": (["--max-memory", "lots"], ["--max-memory 'lots' is not a size"]),
    "below-layer": (["--max-memory", "1K"], ["below one layer"]),
}
# every command with a device and a memory budget it cannot have; every bad value on two commands
CASES = [(c, b) for c in NAMES for b in ("device", "below-layer")] + [
    (c, b) for c in ("ppl", "sensitivity") for b in ("device-index", "dtype", "size")]


@pytest.mark.parametrize("command, bad", CASES)
def test_bad_compute_options_are_one_line(command, bad, tiny, tmp_path, capsys):
    option, needles = BAD[bad]
    args = commands(tiny, tmp_path)[command]
    code, _, err = run(capsys, *args, *option)
    assert_user_error(code, err, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", NAMES)
def test_cuda_where_torch_has_none_is_one_line(command, tiny, tmp_path, capsys):
    code, _, err = run(capsys, *commands(tiny, tmp_path)[command], "--device", "cuda")
    assert_user_error(code, err, "--device cuda", "use --device cpu")


def test_ppl_names_device_and_dtype(tiny, capsys):
    code, out, err = run(capsys, "ppl", tiny, "--chunks", 1, "--ctx", 32, "--json")
    assert code == 0, err
    model = json.loads(out)["model"]
    assert model["device"] == "cpu" and model["dtype"] == "float32" and model["weights"] == "resident"
    code, out, err = run(capsys, "ppl", tiny, "--chunks", 1, "--ctx", 32, "--dtype", "bfloat16")
    assert code == 0, err
    assert "device cpu, dtype bfloat16" in out


def test_ppl_on_demand_equals_resident(tiny, capsys):
    """--max-memory just above the on-demand minimum: layers dequantized as they run, same PPL to the last digit."""
    from qpsa.gguf.read import open_gguf
    from qpsa.model.budget import plan_memory
    from qpsa.model.load import load_model
    from qpsa.model.weights import WeightStore

    loaded = load_model(str(tiny), tokenizer=False)
    store = WeightStore.from_gguf(open_gguf(tiny), budget=0.0)
    minimum = plan_memory(loaded.config, store, torch.device("cpu"), max_memory=2**40, ctx=32).minimum
    results = []
    for extra in ([], ["--max-memory", str(minimum + 1)]):
        code, out, err = run(capsys, "ppl", tiny, "--chunks", 2, "--ctx", 32, "--json", *extra)
        assert code == 0, err
        results.append(json.loads(out))
    assert results[1]["model"]["weights"] == "on demand"
    assert results[0]["ppl"] == results[1]["ppl"]
