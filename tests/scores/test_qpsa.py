"""Q-PSA estimators (qpsa.scores.qpsa) and `q-psa score`, on tiny models.

What is asserted is what is true by construction: a layer whose attn_output and ffn_down are
zero passes its input through bit for bit, so moving any of its weights changes nothing; the
batched estimator equals a brute-force forward of a model rebuilt from the perturbed bytes; a
re-encoded block differs from the original only in the moved code's bits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from helpers.cli_run import run as _run
from helpers.tiny import PROSE, write_tiny_gguf

from qpsa.errors import QpsaError
from qpsa.gguf.quants import dequantize
from qpsa.gguf.read import GGUFTensor
from qpsa.model.layers import parse_layers
from qpsa.model.load import load_model
from qpsa.model.transformer import Transformer
from qpsa.scores.base import eval_tokens, token_nll
from qpsa.scores.qpsa.evaluate import Evaluator
from qpsa.scores.qpsa.moves import move_codes, plan_layer, plan_matrix
from qpsa.scores.qpsa.run import score_qpsa
from qpsa.scores.qpsa.settings import MATRICES, QpsaSettings
from qpsa.scores.qpsa.summary import evaluate_plan, matrix_summary
from qpsa.sources.texts import EvalText

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path, settings: QpsaSettings):
    loaded = load_model(str(path), dtype=settings.dtype)
    return loaded, eval_tokens(loaded, EvalText("prose", PROSE, "test"), settings.max_tokens)


# ---- settings and --layers ---------------------------------------------------------------------


def test_parse_layers():
    assert parse_layers("0-5,9", 10) == [0, 1, 2, 3, 4, 5, 9]
    assert parse_layers("9,0-1", 10) == [9, 0, 1]  # in the order written
    assert parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers(" 2 ", 3) == [2]
    for bad, needle in (("", "empty"), ("1,,2", "empty"), ("0-10", "out of range"), ("1,1", "twice"),
                        ("0-2,2", "twice"), ("3-1", "backwards"), ("a", "not a layer"), ("-1", "not a layer")):
        with pytest.raises(QpsaError, match=needle):
            parse_layers(bad, 10)


@pytest.mark.parametrize("kwargs, needle", [
    ({"samples_per_matrix": 0}, "--samples-per-matrix"), ({"probes": 0}, "--probes"), ({"max_tokens": 1}, "--max-tokens"),
    ({"seed": -1}, "--seed"), ({"batch_size": 0}, "--batch-size"), ({"unit": "nibble"}, "--unit"),
    ({"estimator": "guess"}, "--estimator"), ({"precision": "float16"}, "--precision"),
    ({"estimator": "probe", "unit": "byte"}, "byte"),
])
def test_settings_are_validated(kwargs, needle):
    with pytest.raises(QpsaError, match=needle):
        QpsaSettings(**kwargs)


def test_default_precision_follows_the_estimator():
    assert QpsaSettings().resolved_precision == "float64"
    assert QpsaSettings(estimator="probe").resolved_precision == "float32"
    assert QpsaSettings(estimator="probe", precision="float64").dtype == torch.float64


# ---- re-encoding -------------------------------------------------------------------------------

_SCALE_BYTES = {Q.Q4_0: [(0, 2)], Q.Q4_1: [(0, 2), (2, 4)], Q.Q5_0: [(0, 2)], Q.Q5_1: [(0, 2), (2, 4)],
                Q.Q8_0: [(0, 2)], Q.Q2_K: [(80, 82), (82, 84)], Q.Q3_K: [(108, 110)],
                Q.Q4_K: [(0, 2), (2, 4)], Q.Q5_K: [(0, 2), (2, 4)], Q.Q6_K: [(208, 210)]}


def _synthetic_tensor(qtype, n_blocks, rng) -> GGUFTensor:
    bs, ts = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for a, b in _SCALE_BYTES[qtype]:  # finite f16 scales, so every value is finite
        blocks[:, a:b] = np.frombuffer(np.float16(0.0123).tobytes(), dtype=np.uint8)
    return GGUFTensor("synthetic", (n_blocks, bs), qtype, blocks.reshape(-1), 0)


def _code_bits(grid, block: np.ndarray, k: int) -> np.ndarray:
    """Mask of the bits of `block` that store code k: those that change when only code k changes."""
    codes, _ = grid.decode(block[None])
    mask = np.zeros_like(block)
    for c in range(grid.code_min, grid.code_max + 1):
        other = codes.copy()
        other[0, k] = c
        mask |= grid.encode(other, block[None])[0] ^ block
    return mask


@pytest.mark.parametrize("qtype", list(_SCALE_BYTES))
def test_reencoded_bytes_differ_only_in_the_moved_codes_bits(qtype):
    rng = np.random.default_rng(int(qtype))
    t = _synthetic_tensor(qtype, 4, rng)
    grid = t.grid()
    codes, step = grid.decode(t.blocks)
    movable = np.flatnonzero(((codes > grid.code_min) & (codes < grid.code_max)).reshape(-1))
    for flat in rng.choice(movable, size=6, replace=False):
        b, k = divmod(int(flat), grid.block_size)
        bits = _code_bits(grid, np.array(t.blocks[b]), k)
        for direction in (1, -1):
            mv = move_codes(t, [flat], [direction])
            changed = mv.new[0] ^ mv.old[0]
            assert changed.any() and not (changed & ~bits).any()  # only code k's bits moved
            assert mv.blocks.tolist() == [b]
            new_codes, _ = grid.decode(mv.new)
            expect = codes[b].copy()
            expect[k] += direction
            assert (new_codes[0] == expect).all()
            # the weight change is what the exact dequantizer gives for those bytes: one step, one weight
            assert mv.rows.tolist() == [flat // t.shape[1]] and mv.cols.tolist() == [flat % t.shape[1]]
            assert mv.delta[0] == pytest.approx(direction * float(step[b, k]), rel=1e-5)


# ---- exactness ---------------------------------------------------------------------------------


def _full_nll(loaded, weights, tokens) -> torch.Tensor:
    m = Transformer(loaded.config, weights, dtype=torch.float64)
    with torch.inference_mode():
        h = m.run_layers(m.embed(tokens.tokens), range(loaded.config.n_layer), torch.arange(tokens.tokens.shape[1]))
        return token_nll(m, h, tokens.tokens)[0].double()


def _brute_force_dnll(loaded, tokens, base_nll, layer, matrix, move) -> float:
    """ΔNLL from a model rebuilt from the perturbed bytes: the whole tensor re-dequantized, full forward.
    `move` is a Move of `matrix`, or a list of (matrix, Move) applied together."""
    weights = {n: tt.to_torch() for n, tt in loaded.file.tensors.items()}
    for m, mv in [(matrix, move)] if matrix is not None else move:
        name = f"blk.{layer}.{m}.weight"
        t = loaded.file.tensors[name]
        raw = np.array(t.raw).reshape(-1, t.type_size)
        raw[mv.blocks] = mv.new
        weights[name] = dequantize(raw.reshape(-1), t.qtype, t.shape)
    return float((_full_nll(loaded, weights, tokens) - base_nll).mean())


@pytest.mark.parametrize("arch, qtype, unit", [("llama", Q.Q4_1, "weight"), ("gemma3", Q.Q5_0, "weight"),
                                               ("qwen2", Q.Q8_0, "block"), ("llama", Q.Q4_0, "byte")])
def test_exact_estimator_equals_brute_force(tmp_path, arch, qtype, unit):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, n_layer=3, qtype=qtype, std=0.04)
    settings = QpsaSettings(samples_per_matrix=2, max_tokens=40, unit=unit, batch_size=3)
    loaded, tokens = _load(path, settings)
    ev = Evaluator(loaded.model, tokens.tokens, settings.batch_size)
    base_nll = _full_nll(loaded, {n: t.to_torch() for n, t in loaded.file.tensors.items()}, tokens)
    checked = 0
    for layer, matrix in ((0, "attn_k"), (1, "ffn_down"), (2, "attn_output"), (2, "ffn_gate")):
        plan = plan_matrix(loaded.file, settings, layer, matrix)
        raw = evaluate_plan(ev, plan)
        for j in range(len(raw["kept"])):
            for sign, key in ((0, "dnll_plus"), (1, "dnll_minus")):
                move = plan.directions[2 * j + sign]
                if unit != "byte":
                    assert len(move.rows) > 0
                expect = _brute_force_dnll(loaded, tokens, base_nll, layer, matrix, move)
                assert raw[key][j] == pytest.approx(expect, abs=1e-12, rel=1e-9)
                checked += 1
    assert checked >= 12


def test_identity_layer_moves_change_nothing(tmp_path):
    """attn_output = ffn_down = 0 in layer 1: its output is its input exactly, whatever q/k/v/gate/up hold.
    (In Q8_0 the zero matrices have scale 0, so their own moves are exactly zero too.)"""
    path = write_tiny_gguf(tmp_path / "id.gguf", "llama", n_layer=3, qtype=Q.Q8_0, identity_layer=1)
    for estimator, scope in (("exact", "layer"), ("probe", "matrix"), ("probe", "layer")):
        settings = QpsaSettings(samples_per_matrix=4, max_tokens=40, estimator=estimator, probes=2,
                                precision="float64", probe_scope=scope)
        loaded, tokens = _load(path, settings)
        scores = score_qpsa(loaded, tokens, settings, noise_floor=False).scores
        if settings.layer_probes:
            raw = scores.details["samples"]["1"]["layer"]
            assert len(raw["dnll_plus"]) == 2 and all(v == 0.0 for v in raw["dnll_plus"] + raw["dnll_minus"])
            assert scores.details["per_layer"]["1"]["se"] == 0.0 and scores.details["per_matrix"] == {}
            assert scores.scores[1] == 0.0 and scores.scores[0] != 0.0 and scores.scores[2] != 0.0
            continue
        pm = scores.details["per_matrix"]
        for m in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            raw = scores.details["samples"]["1"][m]
            assert raw["dnll_plus"] and all(v == 0.0 for v in raw["dnll_plus"] + raw["dnll_minus"])
            assert pm["1"][m]["mean"] == 0.0
            plan = plan_matrix(loaded.file, settings, 1, m)
            assert all(len(d.rows) and np.abs(d.delta).min() > 0 for d in plan.directions)  # the moves were real
        assert scores.scores[1] == 0.0
        assert scores.scores[0] != 0.0 and scores.scores[2] != 0.0


def test_all_zero_matrix_in_an_offset_grid_has_no_movable_weight(tmp_path):
    """Q4_1 stores zeros as code 0, the bottom of the grid: no weight of such a matrix can move both ways,
    so it has no samples and its layer's score is unknown (None), never a made-up number."""
    path = write_tiny_gguf(tmp_path / "id41.gguf", "llama", n_layer=2, qtype=Q.Q4_1, identity_layer=0)
    settings = QpsaSettings(samples_per_matrix=2, max_tokens=24)
    loaded, tokens = _load(path, settings)
    scores = score_qpsa(loaded, tokens, settings, layers=[0], noise_floor=False).scores
    assert scores.details["per_matrix"]["0"]["attn_output"]["n_samples"] == 0
    assert scores.details["per_matrix"]["0"]["attn_output"]["mean"] is None
    assert scores.scores == [None, None]
    json.dumps(scores.to_dict(), allow_nan=False)  # strict JSON


def _exact_against_probe(tmp_path, n_ff: int, max_tokens: int, n: int, probes: int):
    """A tiny Q4_1 llama, an evaluator on it, and float64 settings for the exact estimator over
    every movable weight and for `probes` probes of n weights each."""
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", n_layer=2, n_embd=32, n_head=2, n_head_kv=1, n_ff=n_ff,
                           qtype=Q.Q4_1, std=0.04)
    everything = QpsaSettings(samples_per_matrix=10**6, max_tokens=max_tokens, precision="float64", batch_size=64)
    probe = QpsaSettings(samples_per_matrix=n, max_tokens=max_tokens, precision="float64", batch_size=64,
                         estimator="probe", probes=probes)
    loaded, tokens = _load(path, everything)
    return loaded, Evaluator(loaded.model, tokens.tokens, 64), everything, probe


def test_probe_mean_approaches_the_exact_mean_over_the_whole_matrix(tmp_path):
    """The probe (K probes, each N fresh weights moved together with random signs, /N) is unbiased to
    second order for the mean per-weight value over the matrix's movable weights; here that mean is
    computed exactly, every movable weight on its own, and the probe mean must fall within a few of
    its standard errors (plus a margin for the fourth-order terms)."""
    loaded, ev, everything, probe = _exact_against_probe(tmp_path, n_ff=64, max_tokens=32, n=16, probes=64)
    for m in ("attn_v", "attn_output"):
        pe, pp = plan_matrix(loaded.file, everything, 1, m), plan_matrix(loaded.file, probe, 1, m)
        first = plan_matrix(loaded.file, QpsaSettings(samples_per_matrix=16, max_tokens=32), 1, m)
        assert first.index == pp.index[0]  # probe 0's weights are the exact estimator's N
        assert len(pe.index) > 400 and pe.n_redrawn == 0  # every movable weight of the matrix
        se = matrix_summary(evaluate_plan(ev, pe), ev.base_ppl, "exact", None)
        sp = matrix_summary(evaluate_plan(ev, pp), ev.base_ppl, "probe", None)
        assert sp["n_samples"] == 64
        tol = 4 * sp["se_nll"] + 0.1 * abs(se["mean_nll"])
        assert abs(sp["mean_nll"] - se["mean_nll"]) <= tol, (m, se["mean_nll"], sp["mean_nll"], sp["se_nll"])
        # the probes' first-order RMS estimate matches the per-weight RMS in order of magnitude
        assert 0.5 < sp["first_order_rms"] / se["first_order_rms"] < 2


def test_layer_probe_moves_every_matrix_of_the_layer_exactly(tmp_path):
    """A layer-scope probe moves probe k's units of every matrix (the same units and signs as that
    matrix's own probe k) together, and its batched ΔNLL equals a forward of the model rebuilt from
    all seven perturbed tensors."""
    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen2", n_layer=2, qtype=Q.Q5_1, seed=5)
    settings = QpsaSettings(samples_per_matrix=3, max_tokens=24, precision="float64", estimator="probe", probes=3)
    assert settings.probe_scope == "layer" and settings.probes == 3
    assert QpsaSettings(estimator="probe").probes == 12 and QpsaSettings(estimator="probe", probe_scope="matrix").probes == 2
    loaded, tokens = _load(path, settings)
    plan = plan_layer(loaded.file, settings, 1)
    assert plan.n_sampled == 3 * len(MATRICES) and len(plan.directions) == 6
    for m in MATRICES:
        alone = plan_matrix(loaded.file, QpsaSettings(**{**vars(settings), "probe_scope": "matrix"}), 1, m)
        assert [probe[m] for probe in plan.index] == alone.index
        assert all((dict(x)[m].delta == y.delta).all() for x, y in zip(plan.directions, alone.directions))
    ev = Evaluator(loaded.model, tokens.tokens, 4)
    raw = evaluate_plan(ev, plan)
    base_nll = _full_nll(loaded, {n: t.to_torch() for n, t in loaded.file.tensors.items()}, tokens)
    for k, sign in ((0, 0), (0, 1), (2, 1)):
        got = (raw["dnll_plus"], raw["dnll_minus"])[sign][k]
        assert got == pytest.approx(_brute_force_dnll(loaded, tokens, base_nll, 1, None, plan.directions[2 * k + sign]),
                                    abs=1e-12, rel=1e-9)


def test_layer_probe_mean_approaches_the_layer_score(tmp_path):
    """Layer-scope probes estimate the equal-weight mean over the 7 matrices of their mean per-weight
    values; here those means are computed exactly (every movable weight on its own)."""
    loaded, ev, everything, probe = _exact_against_probe(tmp_path, n_ff=32, max_tokens=24, n=8, probes=96)
    exact = [matrix_summary(evaluate_plan(ev, plan_matrix(loaded.file, everything, 1, m)), ev.base_ppl, "exact", None)
             for m in MATRICES]
    assert all(e["n_samples"] > 8 for e in exact)
    layer_mean = sum(e["mean_nll"] for e in exact) / len(MATRICES)
    sp = matrix_summary(evaluate_plan(ev, plan_layer(loaded.file, probe, 1)), ev.base_ppl, "probe", None)
    assert sp["n_samples"] == 96 and sp["total_nll"] is None
    tol = 4 * sp["se_nll"] + 0.1 * abs(layer_mean)
    assert abs(sp["mean_nll"] - layer_mean) <= tol, (layer_mean, sp["mean_nll"], sp["se_nll"])


def test_byte_unit_counts_nonfinite_in_n_skipped(tmp_path):
    """Q8_0 blocks whose scale is f16 0x7B00 (57344) and codes 0: raw byte 1 of a block + 1 makes the
    scale 0x7C00 = inf (and 0 × inf = NaN). Those samples are skipped and counted, never averaged."""
    path = write_tiny_gguf(tmp_path / "q8.gguf", "llama", n_layer=1, qtype=Q.Q8_0)
    loaded = load_model(str(path), tokenizer=False)
    t = loaded.file.tensors["blk.0.attn_q.weight"]
    data = bytearray(path.read_bytes())
    for b in range(t.raw.nbytes // 34):
        at = t.offset + 34 * b
        data[at : at + 34] = b"\x00\x7b" + bytes(32)
    path.write_bytes(bytes(data))
    settings = QpsaSettings(samples_per_matrix=150, max_tokens=24, unit="byte")
    loaded, tokens = _load(path, settings)
    plan = plan_matrix(loaded.file, settings, 0, "attn_q")
    assert sorted(plan.skipped) == sorted(u for u in plan.index if u % 34 == 1)
    assert len(plan.skipped) > 0
    ev = Evaluator(loaded.model, tokens.tokens, 16)
    raw = evaluate_plan(ev, plan)
    s = matrix_summary(raw, ev.base_ppl, "exact", None)
    assert s["n_skipped"] == len(plan.skipped) and s["n_samples"] == 150 - len(plan.skipped)
    assert math.isfinite(s["mean"]) and all(map(math.isfinite, raw["dnll_plus"] + raw["dnll_minus"]))


# ---- reproducibility ---------------------------------------------------------------------------


def test_same_seed_same_numbers_and_layer_subsets_agree(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", n_layer=3, qtype=Q.Q5_1)
    settings = QpsaSettings(samples_per_matrix=3, max_tokens=32, batch_size=4)
    loaded, tokens = _load(path, settings)
    a = score_qpsa(loaded, tokens, settings).scores
    b = score_qpsa(loaded, tokens, settings).scores
    sub = score_qpsa(loaded, tokens, settings, layers=[2, 0]).scores
    assert a.scores == b.scores and a.uncertainty == b.uncertainty
    for key in ("per_layer", "per_matrix", "samples", "noise_floor"):
        a.details[key].pop("seconds", None), b.details[key].pop("seconds", None)
        assert a.details[key] == b.details[key]
    for i in ("0", "2"):
        assert sub.details["per_layer"][i] == a.details["per_layer"][i]
        assert sub.details["samples"][i] == a.details["samples"][i]
    assert sub.scores[1] is None and sub.scores[0] == a.scores[0] and sub.scores[2] == a.scores[2]
    other = score_qpsa(loaded, tokens, QpsaSettings(samples_per_matrix=3, max_tokens=32, seed=7), layers=[0]).scores
    assert other.details["samples"]["0"]["attn_q"]["kept"] != a.details["samples"]["0"]["attn_q"]["kept"]


# ---- the command -------------------------------------------------------------------------------


def test_score_command_json_table_and_files(tmp_path, prose, capsys):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", n_layer=2, qtype=Q.Q4_1)
    out = tmp_path / "res.json"
    code, stdout, err = _run(capsys, "score", path, "--text", prose, "--samples-per-matrix", 2, "--max-tokens", 24,
                             "--out", out, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d == json.loads(out.read_text())
    assert d["command"] == "score" and d["model"]["sha256"] and d["text"]["n_scored"] == 23
    s = d["methods"]["qpsa"]
    assert len(s["scores"]) == 2 and sorted(s["ranking"]) == [0, 1]
    assert set(s["details"]["per_matrix"]["0"]) == set(MATRICES)
    assert s["details"]["noise_floor"]["floor"] > 0 and 0 <= s["details"]["below_floor"] <= 1
    assert out.with_suffix(".csv").exists() and not (tmp_path / "res.json.ckpt").exists()
    code, stdout, err = _run(capsys, "score", path, "--text", prose, "--samples-per-matrix", 2, "--max-tokens", 24,
                             "--out", tmp_path / "res2.json", "--estimator", "probe", "--probes", 2, "--layers", "1")
    assert code == 0, err
    assert "Q-PSA per layer" in stdout and "noise floor" in stdout and "score±se" in stdout


@pytest.mark.parametrize("args, needle", [
    (["--samples-per-matrix", 0], "--samples-per-matrix"), (["--probes", 0], "--probes"),
    (["--max-tokens", 1], "--max-tokens"), (["--max-tokens", 100000], "context length"),
    (["--layers", "2"], "out of range"), (["--layers", "0,0"], "twice"), (["--layers", ""], "empty"),
    (["--unit", "nibble"], "--unit"), (["--estimator", "probe", "--unit", "byte"], "byte"),
    (["--precision", "half"], "--precision"), (["--estimator", "probe", "--probe-scope", "row"], "--probe-scope"),
])
def test_score_command_bad_arguments(tmp_path, prose, capsys, args, needle):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", n_layer=2)
    code, _, err = _run(capsys, "score", path, "--text", prose, "--out", tmp_path / "r.json", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q-psa: error: ") and needle in lines[0], err


def test_score_command_bad_out_paths(tmp_path, prose, capsys):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", n_layer=2)
    (tmp_path / "adir").mkdir()
    for out, needle in ((path, "model file"), (tmp_path / "adir", "directory"),
                        (tmp_path / "missing" / "r.json", "does not exist"), (tmp_path / "r.csv", "CSV")):
        code, _, err = _run(capsys, "score", path, "--text", prose, "--out", out)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
