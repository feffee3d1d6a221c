"""Quantization cost on a mixture-of-experts model (qwen3moe): the `experts` and `expert`
granularities of `sensitivity` and `plan`, the router usage they report, and `inspect`'s expert sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers.cli_run import assert_user_error
from helpers.cli_run import run as cli
from helpers.llamacpp_tools import requires, run_tool
from helpers.tiny import PROSE, write_tiny_gguf

from qpsa.errors import QpsaError
from qpsa.gguf.quants import dequantize, quantize
from qpsa.gguf.read import open_gguf
from qpsa.model.load import load_model
from qpsa.quant.imatrix import read_imatrix
from qpsa.quant.requantize import is_quantizable
from qpsa.quant.sensitivity import group_variant, quant_groups

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYER, N_EXPERT = 2, 4


@pytest.fixture
def moe(tmp_path, monkeypatch):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "moe.gguf", "qwen3moe", n_layer=N_LAYER, n_expert=N_EXPERT, qtype=Q.Q8_0,
                           tied=False)
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    return path, text


def test_groups_of_each_granularity(moe):
    loaded = load_model(str(moe[0]))
    quantizable = {n for n, t in loaded.file.tensors.items() if is_quantizable(n, t.shape)}
    assert not any("ffn_gate_inp" in n for n in quantizable)  # the router stays as it is, as llama-quantize leaves it
    for granularity in ("layer", "tensor", "experts"):
        groups = quant_groups(loaded, granularity)
        names = [n for g in groups for n in g.tensors]
        assert sorted(names) == sorted(quantizable) and len(set(names)) == len(names)  # a partition
    experts = quant_groups(loaded, "experts")
    assert [g.name for g in experts] == ["token_embd.weight", "layer 0 attention", "layer 0 experts",
                                         "layer 1 attention", "layer 1 experts", "output.weight"]
    assert experts[2].tensors == ["blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight",
                                  "blk.0.ffn_down_exps.weight"]
    one = quant_groups(loaded, "expert")
    assert len(one) == N_LAYER * N_EXPERT
    assert (one[5].name, one[5].expert, one[5].first_layer) == ("layer 1 expert 1", 1, 1)


def test_expert_granularity_on_a_dense_model_is_refused(tmp_path):
    loaded = load_model(str(write_tiny_gguf(tmp_path / "d.gguf", "llama")))
    for granularity in ("expert", "experts"):
        with pytest.raises(QpsaError, match="needs a mixture-of-experts model"):
            quant_groups(loaded, granularity)


def test_one_expert_is_requantized_alone(moe):
    loaded = load_model(str(moe[0]))
    group = quant_groups(loaded, "expert")[2]  # layer 0 expert 2
    values, info = group_variant(loaded, group, Q.Q4_0)
    assert set(values) == set(group.tensors)
    for name, v in values.items():
        t = loaded.file.tensors[name]
        before = t.to_torch()
        changed = [e for e in range(N_EXPERT) if not torch.equal(v[e], before[e])]
        assert changed == [2]
        expect = dequantize(quantize(before[2].numpy(), Q.Q4_0).reshape(-1), Q.Q4_0, t.shape[1:])
        assert torch.equal(v[2], expect)
    share = sum(loaded.file.tensors[n].raw.nbytes for n in group.tensors) // N_EXPERT
    assert info["bytes_before"] == share and info["bytes"] < share


def test_sensitivity_by_expert_reports_router_usage(moe, capsys, tmp_path):
    path, text = moe
    code, stdout, err = cli(capsys, "sensitivity", path, "--to", "q4_0", "--granularity", "expert", "--text", text,
                            "--ctx", 64, "--chunks", 2, "--out", tmp_path / "s", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert len(result["rows"]) == N_LAYER * N_EXPERT and result["granularity"] == "expert"
    usage = result["expert_usage"]
    assert usage["k"] == 2 and usage["tokens"] == 2 * 64
    for layer in usage["fraction"]:
        assert len(layer) == N_EXPERT and sum(layer) == pytest.approx(2.0)
    # an expert no measured token is routed to cannot change the measured logits
    for r in result["rows"]:
        routed = usage["fraction"][r["group"]["first_layer"]][r["group"]["expert"]]
        assert (r["kld"] == 0.0) == (routed == 0.0), r["group"]["name"]
    assert any(r["kld"] > 0 for r in result["rows"])
    html = [f for f in result["files"] if f.endswith(".html")]
    assert html, result["files"]
    page = open(html[0], encoding="utf-8").read()
    assert "Router usage" in page and "KLD of each expert alone" in page
    code, stdout, err = cli(capsys, "sensitivity", path, "--to", "q4_0", "--granularity", "expert", "--text", text,
                            "--ctx", 64, "--chunks", 2, "--out", tmp_path / "s")
    assert code == 0, err
    assert "Router usage" in stdout and "routed" in stdout


def test_experts_together_sum_up_and_plan(moe, capsys, tmp_path):
    path, text = moe
    code, stdout, err = cli(capsys, "sensitivity", path, "--to", "q4_0", "--granularity", "experts", "--text", text,
                            "--ctx", 64, "--chunks", 2, "--out", tmp_path / "s", "--json")
    assert code == 0, err
    rows = {r["group"]["name"]: r for r in json.loads(stdout)["rows"]}
    assert rows["layer 1 experts"]["kld"] > 0 and rows["layer 1 attention"]["kld"] > 0
    args = ["plan", path, "--types", "q8_0", "q4_0", "--text", text, "--ctx", 64, "--chunks", 2,
            "--out", tmp_path / "p", "--target-bpw", 6.5]
    code, _, err = cli(capsys, *args, "--granularity", "expert")
    assert_user_error(code, err, "--granularity experts")
    code, stdout, err = cli(capsys, *args, "--granularity", "experts", "--json")
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["granularity"] == "experts" and plan["plan"]["bits_per_weight"] <= 6.5
    assert {g["group"] for g in plan["groups"]} >= {"layer 0 experts", "layer 0 attention"}
    assert len(plan["expert_usage"]["fraction"]) == N_LAYER


def test_expert_granularity_on_a_dense_model_is_a_user_error(capsys, tmp_path):
    path = write_tiny_gguf(tmp_path / "d.gguf", "llama")
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    code, _, err = cli(capsys, "sensitivity", path, "--to", "q4_0", "--granularity", "expert", "--text", text,
                       "--ctx", 64, "--chunks", 1, "--out", tmp_path / "s")
    assert_user_error(code, err, "needs a mixture-of-experts model")
    code, _, err = cli(capsys, "sensitivity", path, "--to", "q4_0", "--granularity", "row", "--text", text,
                       "--ctx", 64, "--chunks", 1, "--out", tmp_path / "s")
    assert_user_error(code, err, "--granularity must be one of")


def test_inspect_shows_experts(moe, capsys):
    code, stdout, err = cli(capsys, "inspect", moe[0], "--json")
    assert code == 0, err
    e = json.loads(stdout)["experts"]
    assert (e["count"], e["used"], e["feed_forward_length"], e["layers"]) == (N_EXPERT, 2, 64, N_LAYER)
    loaded = load_model(str(moe[0]))
    t = loaded.file.tensors["blk.0.ffn_down_exps.weight"]
    one = sum(loaded.file.tensors[f"blk.0.{m}.weight"].raw.nbytes for m in ("ffn_gate_exps", "ffn_up_exps",
                                                                              "ffn_down_exps")) // N_EXPERT
    assert e["per_expert"][0] == {"layer": 0, "weights": 3 * 64 * 64, "bytes": one, "types": ["Q8_0"] * 3}
    assert t.shape == (N_EXPERT, 64, 64)
    n = sum(x.n_elements for x in loaded.file.tensors.values())
    assert e["active_weights_per_token"] == n - N_LAYER * (N_EXPERT - 2) * 3 * 64 * 64
    code, stdout, err = cli(capsys, "inspect", moe[0])
    assert code == 0 and "2 used per token" in stdout
    assert np.isclose(e["share_of_weights"], N_LAYER * N_EXPERT * 3 * 64 * 64 / n, atol=1e-4)


@requires("llama-imatrix", "llama-quantize")
def test_imatrix_and_requantize_equal_llama_cpp(tmp_path, capsys):
    """On a tiny F32 qwen3moe: q-psa's imatrix has llama-imatrix's entries, the same per-expert counts
    (so the same routing of every token), sums within 0.1% (llama.cpp keeps K/V in F16); requantizing
    with it to Q4_0 gives llama-quantize --imatrix's bytes, expert by expert."""
    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen3moe", n_layer=2, seed=4)
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "qpsa.gguf"
    run_tool("llama-imatrix", "-m", path, "-f", text, "-c", 64, "--chunks", 3, "-t", 1, "--no-ppl", "-o", theirs,
             timeout=120)
    code, _, err = cli(capsys, "imatrix", path, "--text", text, "--ctx", 64, "--chunks", 3, "--output", ours, "--json")
    assert code == 0, err
    a, b = read_imatrix(ours), read_imatrix(theirs)
    assert a.names == b.names and "blk.1.ffn_down_exps.weight" in a.names and "blk.0.ffn_gate_inp.weight" in a.names
    assert (a.chunk_count, a.chunk_size) == (b.chunk_count, b.chunk_size)
    for n in a.names:
        assert a.counts[n].tolist() == b.counts[n].tolist(), n
        assert a.counts[n].size == (N_EXPERT_WRITTEN if "_exps." in n else 1)
        np.testing.assert_allclose(a.in_sum2[n], b.in_sum2[n], rtol=1e-3, atol=1e-3 * float(b.in_sum2[n].max()))
    q_theirs, q_ours = tmp_path / "llama-q4.gguf", tmp_path / "qpsa-q4.gguf"
    run_tool("llama-quantize", "--allow-requantize", "--pure", "--imatrix", theirs, path, q_theirs, "Q4_0", 1,
             timeout=120)
    code, _, err = cli(capsys, "requantize", path, "--type", "Q4_0", "--pure", "--imatrix", theirs, "--output", q_ours,
                       "--json")
    assert code == 0, err
    x, y = open_gguf(q_ours), open_gguf(q_theirs)
    assert {n: t.qtype.name for n, t in x.tensors.items()} == {n: t.qtype.name for n, t in y.tensors.items()}
    assert x.tensors["blk.0.ffn_up_exps.weight"].qtype == Q.Q4_0
    differ = [n for n in x.tensors if not np.array_equal(np.asarray(x.tensors[n].raw), np.asarray(y.tensors[n].raw))]
    assert not differ, differ


N_EXPERT_WRITTEN = 8  # write_tiny_gguf's default expert count


def test_predictors_on_moe_model_are_a_user_error(moe, capsys, tmp_path):
    """The predictors have no per-expert gradient slices or imatrix weighting: one line, exit 2, before
    anything is measured (`predictors`, and `plan --estimator`)."""
    path, text = moe
    code, _, err = cli(capsys, "predictors", path, "--types", "q4_0", "--text", text, "--ctx", 32, "--chunks", 2,
                       "--out", tmp_path / "p")
    assert_user_error(code, err, "mixture-of-experts")
    code, _, err = cli(capsys, "plan", path, "--types", "q8_0", "q4_0", "--target-bpw", "6", "--text", text, "--ctx", 32,
                       "--chunks", 1, "--estimator", "fisher_kl", "--out", tmp_path / "e")
    assert_user_error(code, err, "mixture-of-experts")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").glob("*.json"))
