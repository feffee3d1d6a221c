"""Cheap predictors of quantization damage (`q-psa predictors`, `plan --estimator`): each predictor's
formula on a tiny model, fisher_kl against the exact second-order KLD it estimates, the rank
correlation and its interval, and the estimator plan measuring fewer options than the full one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from helpers.cli_run import assert_user_error
from helpers.cli_run import run as cli
from helpers.tiny import PROSE, write_wide_gguf

from qpsa.quant.predictors import PREDICTORS, Predictors, spearman
from qpsa.quant.sensitivity import quant_groups
from qpsa.quant.session import MeasurementSession

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    path = write_wide_gguf(tmp / "tiny.gguf")
    text = tmp / "prose.txt"
    text.write_text(PROSE)
    return path, text, tmp


@pytest.fixture(scope="module")
def session(tiny):
    path, text, tmp = tiny
    return MeasurementSession(str(path), str(text), None, 64, 2, tmp / "session")


def test_simple_predictors_are_their_formulas(session):
    loaded = session.loaded
    session.reference()
    groups = quant_groups(loaded, "tensor")
    pred = Predictors(loaded, session.windows, session.reference_seconds)
    name = "blk.1.ffn_down.weight"
    group = next(g for g in groups if g.name == name)
    w = loaded.model.weights[name].double()
    e = pred.errors(groups, Q.Q4_0)[name].double()
    assert pred.predict("weight_norm", groups, Q.Q4_0).values[name] == pytest.approx(float(w.square().sum()))
    assert pred.predict("error", groups, Q.Q4_0).values[name] == pytest.approx(float(e.square().sum()))
    a = pred.activations()[name].double()
    assert pred.predict("imatrix_error", groups, Q.Q4_0).values[name] == pytest.approx(float((e.square() * a).sum()))
    assert group.tensors == [name]
    # a type whose bytes equal the tensor's: nothing changes, so nothing is predicted
    assert pred.predict("fisher_kl", groups, Q.F32).values[name] == 0.0


def _exact_second_order_kld(model, windows, name: str, e: torch.Tensor) -> float:
    """½ mean over scored tokens of Δzᵀ (diag p − p pᵀ) Δz, Δz the logits' directional derivative along E."""
    weights = model.weights
    tokens, s0 = windows.tokens, windows.score_from
    positions = torch.arange(tokens.shape[1])
    base = weights[name].detach().clone()
    total, n = 0.0, 0
    for w in range(tokens.shape[0]):
        def logits_at(t):
            weights[name].copy_(base + t * e)
            h = model.run_layers(model.embed(tokens[w : w + 1]), range(model.config.n_layer), positions)
            return model.logits(h[:, s0:-1])[0].double()

        with torch.inference_mode():
            eps = 1e-3
            dz = (logits_at(eps) - logits_at(-eps)) / (2 * eps)  # (S, V), central difference
            p = torch.softmax(logits_at(0.0), -1)
        weights[name].copy_(base)
        quad = (p * dz.square()).sum(-1) - (p * dz).sum(-1).square()
        total += float(quad.sum())
        n += dz.shape[0]
    return 0.5 * total / n


def test_fisher_kl_estimates_the_second_order_kld(session):
    """With many label draws, fisher_kl converges to ½ ΔWᵀ F ΔW per token; within 4 standard errors."""
    loaded = session.loaded
    groups = quant_groups(loaded, "tensor")
    pred = Predictors(loaded, session.windows, 1.0, draws=24, seed=3)
    name = "blk.0.attn_v.weight"
    p = pred.predict("fisher_kl", groups, Q.Q4_0)
    e = pred.errors(groups, Q.Q4_0)[name].float()
    exact = _exact_second_order_kld(loaded.model, session.windows, name, e)
    assert exact > 0
    assert abs(p.values[name] - exact) < 4 * p.se[name], (p.values[name], p.se[name], exact)
    assert p.se[name] < 0.5 * p.values[name]


def test_fisher_kl_diag_equals_fisher_kl_for_an_error_in_one_weight(session):
    """With E non-zero in a single weight there are no cross terms: the diagonal is the whole form,
    draw by draw, so the two predictors agree exactly on the same gradients."""
    loaded = session.loaded
    groups = [g for g in quant_groups(loaded, "tensor") if g.name == "blk.1.attn_k.weight"]
    pred = Predictors(loaded, session.windows, 1.0, draws=3, seed=1)
    e = torch.zeros_like(loaded.model.weights["blk.1.attn_k.weight"])
    e[3, 5] = 0.01
    pred._errors["Q4_0"] = {"blk.1.attn_k.weight": e}  # the error to judge, in place of a requantization's
    full = pred.predict("fisher_kl", groups, Q.Q4_0).values["blk.1.attn_k.weight"]
    diag = pred.predict("fisher_kl_diag", groups, Q.Q4_0).values["blk.1.attn_k.weight"]
    assert full > 0 and diag == pytest.approx(full, rel=1e-6)


def test_fisher_kl_is_close_to_the_measured_kld_for_a_small_error(session):
    """Q8_0's error is small: the measured KLD is in the second-order regime that fisher_kl estimates."""
    groups = quant_groups(session.loaded, "tensor")
    ref = session.reference()
    pred = Predictors(session.loaded, session.windows, 1.0, draws=24, seed=5)
    p = pred.predict("fisher_kl", groups, Q.Q8_0)
    from qpsa.quant.sensitivity import group_variant

    name = "blk.2.ffn_up.weight"
    group = next(g for g in groups if g.name == name)
    measured = ref.measure(group_variant(session.loaded, group, Q.Q8_0)[0], group.first_layer).kld
    assert abs(p.values[name] - measured) < 4 * p.se[name] + 0.1 * measured, (p.values[name], p.se[name], measured)


def test_spearman_and_its_interval():
    keys = [f"g{i}" for i in range(30)]
    y = {k: float(i) for i, k in enumerate(keys)}
    same = spearman({k: v**3 for k, v in y.items()}, y)
    assert same["rho"] == pytest.approx(1.0) and same["n"] == 30 and same["lo"] == pytest.approx(1.0)
    assert spearman({k: -v for k, v in y.items()}, y)["rho"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noisy = spearman({k: v + rng.normal(0, 8) for k, v in y.items()}, y)
    assert noisy["lo"] < noisy["rho"] < noisy["hi"] and 0.2 < noisy["rho"] < 0.99
    assert math.isnan(spearman({"a": 1.0}, {"a": 2.0})["rho"])


def test_predictors_command(capsys, tiny, tmp_path):
    path, text, _ = tiny
    code, out, err = cli(capsys, "predictors", path, "--types", "q4_0", "--text", text, "--ctx", 64, "--chunks", 2,
                         "--out", tmp_path / "p", "--json")
    assert code == 0, err
    r = json.loads(out)
    rows = {row["predictor"]: row for row in r["rows"]}
    assert set(rows) == set(PREDICTORS)
    assert all(-1 <= rows[p]["rho"] <= 1 for p in ("error", "fisher_kl", "fisher_diag", "imatrix_error"))
    assert all(rows[p]["forward_equivalents"] > 0 for p in ("fisher_kl", "imatrix_error", "qpsa_curvature"))
    assert rows["fisher_kl"]["n"] == len(r["measured"]["Q4_0"])
    assert (tmp_path / "p" / "predictors-Q4_0-tensor.png").stat().st_size > 0
    assert_user_error(*cli(capsys, "predictors", path, "--predictors", "magic", "--text", text)[::2], "unknown predictor")


def test_plan_with_an_estimator_measures_fewer_options(capsys, tiny, tmp_path):
    path, text, _ = tiny
    args = ["plan", path, "--types", "q8_0", "q4_0", "q2_k", "--target-bpw", "6", "--granularity", "tensor",
            "--text", text, "--ctx", 64, "--chunks", 1, "--json"]
    code, out, err = cli(capsys, *args, "--estimator", "fisher_kl", "--out", tmp_path / "e")
    assert code == 0, err
    est = json.loads(out)
    info = est["estimator"]
    assert info["predictor"] == "fisher_kl" and 0 < info["measured"] < info["options"]
    chosen = {g["group"]: g["type"] for g in est["groups"]}
    for g in est["groups"]:  # the options the plan chose are measured ones (or kept)
        option = next(o for o in g["options"] if o["type"] == g["type"])
        assert option["measured"] or g["type"] == "keep"
    assert est["plan"]["bytes"] <= est["budget_bytes"] or est["fallback"]
    assert len(chosen) == len(est["groups"])
    assert_user_error(*cli(capsys, *args, "--estimator", "magic", "--out", tmp_path / "x")[::2], "unknown predictor")
