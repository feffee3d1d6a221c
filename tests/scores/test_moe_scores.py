"""Layer scores on a mixture-of-experts model (qwen3moe): ablation, block influence and Fisher see
the whole layer (router and experts), Q-PSA's moves land in expert tensors and the router, and the
batched estimator's expert hook equals a brute-force forward of the perturbed bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers.tiny import PROSE, write_tiny_gguf

from qpsa.gguf.quants import dequantize
from qpsa.model.load import load_model
from qpsa.model.transformer import Transformer
from qpsa.scores.base import ScoreSettings, eval_tokens, token_nll
from qpsa.scores.baselines import block_influence, clear_cache, fisher, layer_ablation, weight_norm
from qpsa.scores.qpsa.evaluate import Evaluator
from qpsa.scores.qpsa.moves import plan_matrix
from qpsa.scores.qpsa.run import score_qpsa
from qpsa.scores.qpsa.settings import QpsaSettings
from qpsa.scores.qpsa.summary import evaluate_plan
from qpsa.sources.texts import EvalText

pytestmark = pytest.mark.usefixtures("one_thread")

IDENTITY = 1
# an MoE layer's matrices: attention, the router and the three stacked expert tensors (ModelConfig.matrices)
MOE_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                "ffn_down_exps")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QPSA_CACHE", str(root / "cache"))
        path = write_tiny_gguf(root / "moe.gguf", "qwen3moe", n_layer=3, identity_layer=IDENTITY, qtype=Q.Q8_0,
                               tied=False)
        loaded = load_model(str(path))
        yield {"path": path, "loaded": loaded, "tokens": eval_tokens(loaded, EvalText("prose", PROSE, "t"), 60)}
    clear_cache()


def test_identity_layer_scores_zero(moe):
    loaded, tokens = moe["loaded"], moe["tokens"]
    settings = ScoreSettings()
    abl = layer_ablation(loaded, tokens, settings)
    assert abl.scores[IDENTITY] == 0.0 and min(range(3), key=lambda i: abs(abl.scores[i])) == IDENTITY
    bi = block_influence(loaded, tokens, settings)
    assert bi.scores[IDENTITY] == 0.0 and all(x > 1e-3 for i, x in enumerate(bi.scores) if i != IDENTITY)
    fi = fisher(loaded, tokens, settings)
    assert set(fi.details["per_matrix"]) == set(MOE_MATRICES)
    # no gradient reaches a layer whose attn_output and ffn_down_exps are zero (router included)
    assert fi.scores[IDENTITY] == 0.0
    for i in (0, 2):
        assert all(fi.details["per_matrix"][m][i] > 0 for m in MOE_MATRICES)
    wn = weight_norm(loaded, tokens, settings)
    assert set(wn.details["per_matrix"]) == set(MOE_MATRICES)


def test_fisher_of_experts_equals_direct_autograd(moe):
    loaded, tokens = moe["loaded"], moe["tokens"]
    s = fisher(loaded, tokens, ScoreSettings())
    assert not any(t.requires_grad for t in loaded.model.weights.values())
    fresh = load_model(str(moe["path"]))
    w, ids, layer = fresh.model.weights, tokens.tokens, 2
    down = w[f"blk.{layer}.ffn_down_exps.weight"].detach().clone().requires_grad_(True)
    w[f"blk.{layer}.ffn_down_exps.weight"] = down
    router = w[f"blk.{layer}.ffn_gate_inp.weight"].detach().clone().requires_grad_(True)
    w[f"blk.{layer}.ffn_gate_inp.weight"] = router
    logits = fresh.model.forward(ids)[0, :-1]
    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    for name, grad in (("ffn_down_exps", down.grad), ("ffn_gate_inp", router.grad)):
        rec = fresh.file.tensors[f"blk.{layer}.{name}.weight"]
        _, step = rec.grid().decode(rec.blocks)
        expect = float((grad.double() * torch.from_numpy(step.reshape(rec.shape)).double()).square().sum())
        assert expect > 0
        assert s.details["per_matrix"][name][layer] == pytest.approx(expect, rel=1e-4)


def _nll(loaded, weights, tokens) -> torch.Tensor:
    m = Transformer(loaded.config, weights, dtype=torch.float64)
    with torch.inference_mode():
        h = m.run_layers(m.embed(tokens.tokens), range(loaded.config.n_layer), torch.arange(tokens.tokens.shape[1]))
        return token_nll(m, h, tokens.tokens)[0].double()


@pytest.mark.parametrize("unit", ["weight", "block"])
def test_expert_and_router_moves_equal_brute_force(moe, unit):
    """Each move re-encoded to bytes, the whole tensor re-dequantized and the model run from scratch:
    the batched evaluator (expert hook for ffn_*_exps, linear hook for the router) gives the same ΔNLL."""
    settings = QpsaSettings(samples_per_matrix=3, max_tokens=40, unit=unit, batch_size=4)
    loaded = load_model(str(moe["path"]), dtype=settings.dtype)
    tokens = eval_tokens(loaded, EvalText("prose", PROSE, "t"), settings.max_tokens)
    ev = Evaluator(loaded.model, tokens.tokens, settings.batch_size)
    base = {n: t.to_torch() for n, t in loaded.file.tensors.items()}
    base_nll = _nll(loaded, base, tokens)
    checked = nonzero = 0
    for layer, matrix in ((0, "ffn_gate_exps"), (0, "ffn_up_exps"), (2, "ffn_down_exps"), (2, "ffn_gate_inp")):
        plan = plan_matrix(loaded.file, settings, layer, matrix)
        raw = evaluate_plan(ev, plan)
        for j in range(len(raw["kept"])):
            for sign, key in ((0, "dnll_plus"), (1, "dnll_minus")):
                move = plan.directions[2 * j + sign]
                name = f"blk.{layer}.{matrix}.weight"
                t = loaded.file.tensors[name]
                blocks = np.array(t.raw).reshape(-1, t.type_size)
                blocks[move.blocks] = move.new
                expect = float((_nll(loaded, {**base, name: dequantize(blocks.reshape(-1), t.qtype, t.shape)},
                                     tokens) - base_nll).mean())
                assert raw[key][j] == pytest.approx(expect, abs=1e-12, rel=1e-9)
                checked += 1
                nonzero += expect != 0
    assert checked >= 20 and nonzero >= 10  # moves in experts no token visits change nothing, exactly


def test_qpsa_scores_moe_layers(moe):
    for estimator, scope in (("exact", "layer"), ("probe", "layer")):
        settings = QpsaSettings(samples_per_matrix=3, max_tokens=40, estimator=estimator, probes=2,
                                precision="float64", probe_scope=scope)
        loaded = load_model(str(moe["path"]), dtype=settings.dtype)
        tokens = eval_tokens(loaded, EvalText("prose", PROSE, "t"), settings.max_tokens)
        scores = score_qpsa(loaded, tokens, settings, noise_floor=False).scores
        assert scores.details["matrices"] == list(MOE_MATRICES)
        assert scores.scores[IDENTITY] == 0.0
        assert scores.scores[0] != 0.0 and scores.scores[2] != 0.0
        if not settings.layer_probes:
            assert set(scores.details["per_matrix"]["0"]) == set(MOE_MATRICES)


def test_baseline_and_score_commands_on_moe(moe, prose, tmp_path, capsys, monkeypatch):
    from helpers.cli_run import run

    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))
    code, stdout, err = run(capsys, "baseline", moe["path"], "--text", prose, "--max-tokens", 40,
                            "--out", tmp_path / "b.json", "--json")
    assert code == 0, err
    methods = json.loads(stdout)["methods"]
    assert methods["layer_ablation"]["scores"][IDENTITY] == 0.0 and methods["fisher"]["scores"][IDENTITY] == 0.0
    code, stdout, err = run(capsys, "score", moe["path"], "--text", prose, "--samples-per-matrix", 2,
                            "--max-tokens", 24, "--out", tmp_path / "s.json")
    assert code == 0, err
    assert "router" in stdout and "down×E" in stdout  # the MoE layer's matrices as columns
    s = json.loads((tmp_path / "s.json").read_text())["methods"]["qpsa"]
    assert s["details"]["matrices"] == list(MOE_MATRICES) and s["scores"][IDENTITY] == 0.0
