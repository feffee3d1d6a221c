"""`q-psa plan` against llama-quantize's presets: the presets measured beside the plan, the
`--target-preset` budget, the fallback to a preset that measured better, and `--imatrix` reaching
every requantization (candidates, plan, presets), with its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.cli_run import assert_user_error
from helpers.cli_run import run as cli
from helpers.tiny import PROSE, write_tiny_gguf, write_wide_gguf

from qpsa.eval.perplexity import make_windows
from qpsa.gguf.read import file_sha256, open_gguf
from qpsa.model.load import load_model
from qpsa.quant import plan as plan_module
from qpsa.quant.imatrix import compute_imatrix, read_imatrix
from qpsa.quant.plan import PRESET_NAMES, preset_size
from qpsa.quant.requantize import choose_types
from qpsa.quant.sensitivity import group_variant, quant_groups


@pytest.fixture
def tiny(tmp_path):
    """A 3-layer llama in F32 with rows of 256 (so K-quants fit), a separate head, a text and an imatrix."""
    path = write_wide_gguf(tmp_path / "tiny.gguf")
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    loaded = load_model(path)
    im = compute_imatrix(loaded.model, make_windows(loaded.tokenizer, PROSE, 32, 3).tokens, "prose")
    return path, text, im.write(tmp_path / "imatrix.gguf")


def _plan(capsys, tiny, out, *extra):
    args = ["plan", tiny[0], "--types", "q8_0", "q4_k", "q2_k", "--text", tiny[1], "--ctx", 64, "--chunks", 1,
            "--out", out, "--json", *extra]
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    return json.loads(stdout)


def test_target_preset_budget_is_the_presets_size_and_presets_are_measured(capsys, tiny, tmp_path):
    plan = _plan(capsys, tiny, tmp_path / "p", "--target-preset", "q4_k_m")
    n_bytes, bpw = preset_size(open_gguf(tiny[0]), "Q4_K_M")
    assert plan["target_preset"] == "Q4_K_M"
    assert plan["budget_bytes"] == n_bytes and plan["target_bpw"] == pytest.approx(bpw)
    labels = [p["label"] for p in plan["presets"]]
    assert "Q4_K_M" in labels and set(labels) <= set(PRESET_NAMES)
    below = [p for p in plan["presets"] if p["bytes"] < n_bytes]
    assert below, "the nearest preset below the budget is measured too"
    # every preset and uniform type that fits the budget is measured: the fallback's candidates
    gguf_file = open_gguf(tiny[0])
    fit = {name for name in PRESET_NAMES if preset_size(gguf_file, name)[0] <= n_bytes}
    assert fit <= set(labels)
    uniform_fit = {f"uniform {t.upper()}" for t in ("q8_0", "q4_k", "q2_k")
                   if sum(c.n_bytes for c in choose_types(gguf_file, t.upper(), fallback=True)) <= n_bytes}
    assert uniform_fit and uniform_fit <= {u["label"] for u in plan["uniform"]}
    for p in plan["presets"]:  # shaped like the uniform entries, which the HTML report draws
        assert set(plan["uniform"][0]) <= set(p) and p["kld"] > 0 and 0 <= p["same_top"] <= 1
    if plan["fallback"] is None:
        assert plan["plan"]["bytes"] <= n_bytes
        fitting = [m for m in plan["presets"] + plan["uniform"] if m["bytes"] <= n_bytes]
        assert all(plan["plan"]["kld"] <= m["kld"] for m in fitting)
    html = (tmp_path / "p" / "plan.html").read_text()
    assert "Q4_K_M" in html
    png = tmp_path / "p" / "plan.png"  # the KLD-against-size chart beside plan.json
    assert str(png) in plan["files"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_falls_back_to_a_preset_that_measured_better(capsys, tiny, tmp_path, monkeypatch):
    """A deliberately bad choice (every group at its smallest option) loses to Q4_K_M at Q4_K_M's size:
    the result names the preset, and the recipe and the written file are the preset."""

    def smallest(options, budget):
        chosen = {g: min(opts, key=lambda o: o.bytes) for g, opts in options.items()}
        return chosen, sum(o.kld for o in chosen.values())

    monkeypatch.setattr(plan_module, "choose_mixture", smallest)
    out = tmp_path / "p"
    plan = _plan(capsys, tiny, out, "--target-preset", "Q4_K_M", "--output", tmp_path / "p.gguf")
    fallback = plan["fallback"]
    assert fallback is not None and fallback["kld"] < fallback["plan_kld"] == plan["plan"]["kld"]
    best = min((m for m in plan["presets"] + plan["uniform"] if m["bytes"] <= plan["budget_bytes"]),
               key=lambda m: m["kld"])
    assert fallback["label"] == best["label"]
    written = open_gguf(tmp_path / "p.gguf")
    assert sum(t.raw.nbytes for t in written.tensors.values()) == fallback["bytes"]
    assert "FALLBACK" in (out / "recipe.txt").read_text()
    if not fallback["label"].startswith("uniform "):
        assert plan["llama_quantize"][-1] == fallback["label"].lower()
        assert "--tensor-type" not in plan["llama_quantize"]  # the preset itself, nothing overridden
        want = {c.name: c.target.name for c in choose_types(open_gguf(tiny[0]), fallback["label"])}
        assert {n: t.qtype.name for n, t in written.tensors.items()} == want
    code, stdout, err = cli(capsys, "plan", tiny[0], "--types", "q8_0", "q4_k", "q2_k", "--text", tiny[1], "--ctx",
                            64, "--chunks", 1, "--out", out, "--resume", "--target-preset", "Q4_K_M")
    assert code == 0, err
    assert "fallback:" in stdout and fallback["label"] in stdout


def test_imatrix_reaches_every_requantization(capsys, tiny, tmp_path):
    loaded = load_model(tiny[0])
    im = read_imatrix(tiny[2])
    group = quant_groups(loaded, "layer")[1]
    plain, _ = group_variant(loaded, group, plan_module.Q.Q4_K)
    weighted, _ = group_variant(loaded, group, plan_module.Q.Q4_K, im)
    assert any(not torch.equal(plain[n], weighted[n]) for n in plain)
    files = {}
    for name, extra in (("plain", ()), ("weighted", ("--imatrix", tiny[2]))):
        plan = _plan(capsys, tiny, tmp_path / name, "--target-bpw", 5.0, "--output", tmp_path / f"{name}.gguf", *extra)
        files[name] = (plan, (tmp_path / f"{name}.gguf").read_bytes())
    plan, written = files["weighted"]
    assert plan["imatrix"]["sha256"] == file_sha256(tiny[2])
    assert "--imatrix" in plan["llama_quantize"]
    checkpoint = json.loads((tmp_path / "weighted" / "sensitivity-Q4_K-layer.json").read_text())
    assert checkpoint["imatrix"]["sha256"] == file_sha256(tiny[2])
    plain_plan, plain_written = files["plain"]
    assert plain_plan["imatrix"] is None and written != plain_written
    # the same presets, the same sizes, other measurements: they were requantized with the weights
    plain_presets = {p["label"]: p for p in plain_plan["presets"]}
    common = [p for p in plan["presets"] if p["label"] in plain_presets]
    assert common and all(p["bytes"] == plain_presets[p["label"]]["bytes"] for p in common)
    assert any(p["kld"] != plain_presets[p["label"]]["kld"] for p in common)
    # --resume does not take the unweighted run's measurements for a weighted one
    again = _plan(capsys, tiny, tmp_path / "plain", "--target-bpw", 5.0, "--resume", "--imatrix", tiny[2])
    assert again["groups"] == plan["groups"]


def test_bad_input_is_one_line_and_exit_2(capsys, tiny, tmp_path):
    base = ["plan", tiny[0], "--types", "q8_0", "q4_k", "--text", tiny[1], "--ctx", 64, "--chunks", 1,
            "--out", tmp_path / "p"]
    code, _, err = cli(capsys, *base)
    assert_user_error(code, err, "--target-bpw", "--target-preset")
    code, _, err = cli(capsys, *base, "--target-bpw", 5, "--target-preset", "Q4_K_M")
    assert_user_error(code, err, "one budget")
    code, _, err = cli(capsys, *base, "--target-preset", "Q9_K_X")
    assert_user_error(code, err, "Q9_K_X")
    code, _, err = cli(capsys, *base, "--target-preset", "Q4_K_M", "--imatrix", tmp_path / "none.gguf")
    assert_user_error(code, err, "none.gguf")
    other = write_tiny_gguf(tmp_path / "other.gguf", "llama", n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=256,
                            tied=False)
    code, _, err = cli(capsys, "plan", other, "--types", "q8_0", "--text", tiny[1], "--ctx", 64, "--chunks", 1,
                       "--target-preset", "Q4_K_M", "--imatrix", tiny[2], "--out", tmp_path / "o")
    assert_user_error(code, err, "another model")
    im = read_imatrix(tiny[2])
    im.counts["blk.1.ffn_up.weight"] = np.array([0])
    zero = im.write(tmp_path / "zero.gguf")
    code, _, err = cli(capsys, "sensitivity", tiny[0], "--to", "q4_k", "--text", tiny[1], "--ctx", 64, "--chunks", 1,
                       "--imatrix", zero, "--out", tmp_path / "s")
    assert_user_error(code, err, "blk.1.ffn_up.weight has a count of 0")
