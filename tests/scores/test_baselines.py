"""Baseline layer-importance methods and the `baseline` / `agreement` commands.

Fast tests use tiny random models (tests/tiny.py) in which one layer is exactly the identity (its
attn_output and ffn_down are zero); one slow test runs all six methods on SmolLM2-135M.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from helpers.bundled import WIKITEXT, bundled_path
from helpers.tiny import write_tiny_gguf

from qpsa.cli.app import main
from qpsa.errors import QpsaError
from qpsa.model.load import load_model
from qpsa.scores.base import ScoreSettings, eval_tokens, ppl_of
from qpsa.scores.baselines import FISHER_GROUPS, MATRICES, clear_cache, layer_states, run_baselines, work_units
from qpsa.scores.registry import find_method, method_names
from qpsa.scores.results import ScoreRun, rank_agreement
from qpsa.sources.texts import text_from_file

BASELINES = {name: find_method(name).compute() for name in method_names("baseline")}

N_LAYER, IDENTITY, N_TOKENS = 4, 2, 160
WORDS = ["the", "world", "and", "hello", "in", "of", "a", "to", "was", "he", "it", "with", "as", "his", "on",
         "at", "by", "that", "from", "her", "which"]


def write_text(path) -> str:
    rng = np.random.default_rng(7)
    sentences = []
    for _ in range(60):
        words = rng.choice(WORDS, size=rng.integers(5, 12))
        sentences.append(" ".join(words).capitalize() + ".")
    path.write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return str(path)


def tiny_setup(root, arch: str = "llama") -> dict:
    model = write_tiny_gguf(root / f"{arch}.gguf", arch, n_layer=N_LAYER, identity_layer=IDENTITY,
                            qtype=GGMLQuantizationType.Q8_0, tied=False)
    text = write_text(root / "text.txt")
    loaded = load_model(str(model))
    tokens = eval_tokens(loaded, text_from_file(text), N_TOKENS)
    return {"model": str(model), "text": text, "loaded": loaded, "tokens": tokens}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QPSA_CACHE", str(root / "cache"))
        yield tiny_setup(root)
    clear_cache()


@pytest.fixture
def cli_env(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tiny


def run_all(setup, settings=None):
    settings = settings or ScoreSettings()
    return {name: fn(setup["loaded"], setup["tokens"], settings) for name, fn in BASELINES.items()}


def direct_nll(model, ids, layers) -> torch.Tensor:
    """Per-token NLL (float64) of the forward through `layers`, computed without the state cache."""
    with torch.inference_mode():
        logits = model.forward(ids, layers=layers)[0, :-1].double()
    return torch.logsumexp(logits, -1) - logits.gather(-1, ids[0, 1:, None])[:, 0]


# ---- the identity layer ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_identity_layer(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))
    setup = tiny_setup(tmp_path, arch)
    s = {name: BASELINES[name](setup["loaded"], setup["tokens"], ScoreSettings())
         for name in ("layer_ablation", "block_influence", "angular_distance", "fisher")}
    abl = s["layer_ablation"]
    # skipping a layer that adds nothing changes nothing: the same floats go through the same layers
    assert abl.scores[IDENTITY] == 0.0
    assert abl.details["delta_nll"][IDENTITY] == 0.0
    assert abl.uncertainty[IDENTITY] == 0.0
    # in a random model, skipping another layer can lower the PPL, so compare magnitudes
    assert min(range(N_LAYER), key=lambda i: abs(abl.scores[i])) == IDENTITY
    for name in ("block_influence", "angular_distance"):
        assert s[name].scores[IDENTITY] == 0.0
        assert s[name].ranking()[0] == IDENTITY
        assert all(x > 1e-3 for i, x in enumerate(s[name].scores) if i != IDENTITY)
    # Q8_0 blocks of zeros have scale d = 0, so every weight of the zeroed matrices has grid step 0,
    # and the other five matrices get no gradient through them: the layer's fisher score is 0
    assert s["fisher"].scores[IDENTITY] == 0.0


# ---- layer ablation ----------------------------------------------------------------------------


def test_layer_ablation_equals_direct_forward(tiny):
    model, ids = tiny["loaded"].model, tiny["tokens"].tokens
    abl = BASELINES["layer_ablation"](tiny["loaded"], tiny["tokens"], ScoreSettings())
    base = direct_nll(model, ids, None)
    base_ppl = ppl_of(base)
    assert abl.details["base_ppl"] == pytest.approx(base_ppl, rel=1e-5)
    for i in range(N_LAYER):
        nll = direct_nll(model, ids, [j for j in range(N_LAYER) if j != i])
        assert abl.scores[i] == pytest.approx(ppl_of(nll) - base_ppl, abs=1e-5 * base_ppl)
        assert abl.details["ppl"][i] == pytest.approx(ppl_of(nll), rel=1e-5)
        # delta method, paired over tokens: se(ΔPPL) = PPL_ablated · sd(ΔNLL_t)/√N
        d = nll - base
        se = ppl_of(nll) * float(d.std()) / math.sqrt(d.numel())
        assert abl.uncertainty[i] == pytest.approx(se, rel=1e-3)
        assert abl.details["delta_nll"][i] == pytest.approx(float(d.mean()), abs=1e-5)


def test_layer_ablation_batch_size_does_not_matter(tiny, monkeypatch):
    from qpsa.scores import baselines

    a = baselines.layer_ablation(tiny["loaded"], tiny["tokens"], ScoreSettings())
    monkeypatch.setattr(baselines, "ABLATION_MAX_BATCH", 1)
    b = baselines.layer_ablation(tiny["loaded"], tiny["tokens"], ScoreSettings())
    assert b.details["batch"] == 1 and a.details["batch"] > 1
    base = a.details["base_ppl"]
    for x, y in zip(a.scores, b.scores):
        assert x == pytest.approx(y, abs=1e-5 * base)


# ---- the other methods against direct computations -----------------------------------------------


def test_weight_norm_is_frobenius_of_gguf_dequantized_matrices(tiny):
    loaded = tiny["loaded"]
    s = BASELINES["weight_norm"](loaded, tiny["tokens"], ScoreSettings())
    for i in range(N_LAYER):
        # the gguf package's own dequantizer, not q-psa's
        sq = sum(np.square(loaded.file.tensors[f"blk.{i}.{m}.weight"].dequantize().astype(np.float64)).sum()
                 for m in MATRICES)
        assert s.scores[i] == pytest.approx(math.sqrt(sq), rel=1e-9)
    assert s.ranking()[0] == IDENTITY  # two of its seven matrices are zero


def test_block_influence_and_angular_distance_direct(tiny):
    loaded, tokens = tiny["loaded"], tiny["tokens"]
    states = layer_states(loaded, tokens).states
    bi = BASELINES["block_influence"](loaded, tokens, ScoreSettings())
    for n in (1, 2, 3):
        ad = BASELINES["angular_distance"](loaded, tokens, ScoreSettings(angular_n=n))
        for i in range(N_LAYER):
            j = min(i + n, N_LAYER)
            cos = torch.nn.functional.cosine_similarity(states[i][0].double(), states[j][0].double(), dim=-1)
            angle = torch.arccos(cos.clamp(-1, 1)) / math.pi
            assert ad.scores[i] == pytest.approx(float(angle.mean()), abs=1e-6)
            assert ad.uncertainty[i] == pytest.approx(float(angle.std()) / math.sqrt(angle.numel()), abs=1e-6)
            if n == 1:
                assert bi.scores[i] == pytest.approx(float(1 - cos.mean()), abs=1e-12)
                assert bi.uncertainty[i] == pytest.approx(float(cos.std()) / math.sqrt(cos.numel()), rel=1e-6,
                                                          abs=1e-15)
        assert ad.details["span"] == [min(n, N_LAYER - i) for i in range(N_LAYER)]
    with pytest.raises(QpsaError, match="--n"):
        BASELINES["angular_distance"](loaded, tokens, ScoreSettings(angular_n=N_LAYER + 1))


def q8_0_steps(record) -> torch.Tensor:
    """Per-weight grid steps of a Q8_0 tensor read straight from its bytes: each block's f16 scale."""
    d = np.asarray(record.raw).reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    return torch.from_numpy(np.repeat(d, 32, axis=1).reshape(record.shape))


def test_fisher_equals_direct_autograd(tiny, tmp_path, monkeypatch):
    from qpsa.scores.baselines import fisher

    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))
    loaded = tiny["loaded"]
    s = fisher(loaded, tiny["tokens"], ScoreSettings())
    # requires_grad is given back
    assert not any(t.requires_grad for t in loaded.model.weights.values())

    fresh = load_model(tiny["model"])  # a separate copy, so the check shares no state with fisher()
    w, ids = fresh.model.weights, tiny["tokens"].tokens
    layer, targets = 1, ids[0, 1:]
    leaf = w[f"blk.{layer}.attn_k.weight"].detach().clone().requires_grad_(True)
    w[f"blk.{layer}.attn_qkv.weight"] = torch.cat([w[f"blk.{layer}.attn_q.weight"], leaf, w[f"blk.{layer}.attn_v.weight"]])
    down = w[f"blk.{layer}.ffn_down.weight"].detach().clone().requires_grad_(True)
    w[f"blk.{layer}.ffn_down.weight"] = down
    logits = fresh.model.forward(ids)[0, :-1]
    torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
    for name, grad in (("attn_k", leaf.grad), ("ffn_down", down.grad)):
        step = q8_0_steps(fresh.file.tensors[f"blk.{layer}.{name}.weight"])
        expect = float((grad.double() * step.double()).square().sum())
        assert expect > 0
        assert s.details["per_matrix"][name][layer] == pytest.approx(expect, rel=1e-4)
    assert s.scores[layer] == pytest.approx(sum(s.details["per_matrix"][m][layer] for m in MATRICES), rel=1e-12)


def test_fisher_jackknife_equals_direct_group_gradients(tiny):
    """The jackknife from the shortcut (prefix passes, last group by difference) equals one from
    K explicit full-length backward passes."""
    from qpsa.scores.baselines import fisher

    loaded, ids = tiny["loaded"], tiny["tokens"].tokens
    s = fisher(loaded, tiny["tokens"], ScoreSettings())
    model, layer = loaded.model, 0
    n = ids.shape[1] - 1
    K = FISHER_GROUPS
    bounds = [round(k * n / K) for k in range(K + 1)]
    assert s.details["group_tokens"] == [bounds[k + 1] - bounds[k] for k in range(K)]
    fused = [model.weights[f"blk.{layer}.{f}.weight"] for f in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")]
    steps = {m: q8_0_steps(loaded.file.tensors[f"blk.{layer}.{m}.weight"]).double() for m in MATRICES}
    try:
        for p in fused:
            p.requires_grad_(True)
        logits = model.forward(ids)[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        groups = [torch.autograd.grad(nll[bounds[k] : bounds[k + 1]].sum(), fused, retain_graph=True) for k in range(K)]
    finally:
        for p in fused:
            p.requires_grad_(False)

    def per_matrix(g):  # fused grads -> {matrix: grad · step}
        qkv = g[0].double()
        q, kv = model.weights[f"blk.{layer}.attn_q.weight"].shape[0], model.weights[f"blk.{layer}.attn_k.weight"].shape[0]
        gate, up = g[2].double().chunk(2)
        parts = {"attn_q": qkv[:q], "attn_k": qkv[q : q + kv], "attn_v": qkv[q + kv :], "attn_output": g[1].double(),
                 "ffn_gate": gate, "ffn_up": up, "ffn_down": g[3].double()}
        return {m: parts[m] * steps[m] for m in MATRICES}

    pieces = [per_matrix(g) for g in groups]
    full = {m: sum(p[m] for p in pieces) for m in MATRICES}
    stat = sum(float(full[m].square().sum()) for m in MATRICES)
    assert s.scores[layer] == pytest.approx(stat, rel=1e-4)
    theta = np.array([sum(float((full[m] - p[m]).square().sum()) for m in MATRICES)
                      / (n - (bounds[k + 1] - bounds[k])) ** 2 for k, p in enumerate(pieces)])
    se = n**2 * math.sqrt((K - 1) / K * np.square(theta - theta.mean()).sum())
    assert s.uncertainty[layer] == pytest.approx(se, rel=1e-3)


# ---- conventions ---------------------------------------------------------------------------------


def test_seeds_and_uncertainty_conventions(tiny):
    a, b = run_all(tiny), run_all(tiny)
    for name in BASELINES:
        assert a[name].scores == b[name].scores, name
        assert len(a[name].scores) == len(a[name].uncertainty) == N_LAYER
        assert a[name].method == name
    other = BASELINES["random"](tiny["loaded"], tiny["tokens"], ScoreSettings(seed=43))
    assert other.scores != a["random"].scores
    assert sorted(a["random"].scores) == list(map(float, range(N_LAYER)))
    for name in ("weight_norm", "random"):
        assert a[name].uncertainty == [None] * N_LAYER
    for name in ("layer_ablation", "block_influence", "angular_distance", "fisher"):
        assert all(u is not None and math.isfinite(u) and u >= 0 for u in a[name].uncertainty), name


def test_progress_units_add_up(tiny):
    loaded, tokens = tiny["loaded"], tiny["tokens"]
    clear_cache()
    seen = []

    def advance(status="", steps=1):
        seen.append(steps)

    layer_states(loaded, tokens, advance)
    assert sum(seen) == N_LAYER
    for name, fn in BASELINES.items():
        seen.clear()
        fn(loaded, tokens, ScoreSettings(), advance)
        assert sum(seen) == work_units(name, loaded.config, tokens.tokens.shape[1]), name


def test_state_cache_follows_weight_changes(tiny):
    loaded, tokens = tiny["loaded"], tiny["tokens"]
    a = layer_states(loaded, tokens)
    assert layer_states(loaded, tokens) is a
    w = loaded.model.weights["blk.0.attn_v.weight"]  # a view into the fused q|k|v tensor
    saved = w.clone()
    try:
        w.mul_(2)
        b = layer_states(loaded, tokens)
        assert b is not a and not torch.equal(b.states[2], a.states[2])
    finally:
        w.copy_(saved)
    c = layer_states(loaded, tokens)
    assert c is not b and torch.equal(c.states[2], a.states[2])


def test_run_baselines_round_trips(tiny, tmp_path):
    run = run_baselines(tiny["loaded"], tiny["tokens"], ["random", "weight_norm", "random"], ScoreSettings())
    assert list(run.methods) == ["random", "weight_norm"]
    assert run.model["n_layer"] == N_LAYER and run.text["n_tokens"] == N_TOKENS
    run.save(tmp_path / "r.json")
    back = ScoreRun.load(tmp_path / "r.json")
    assert back.methods["weight_norm"].scores == run.methods["weight_norm"].scores
    with pytest.raises(QpsaError, match="unknown method 'nope'; known: layer_ablation"):
        run_baselines(tiny["loaded"], tiny["tokens"], ["nope"], ScoreSettings())


def test_cli_method_names_match_registry():
    from qpsa.cli.baseline import METHOD_NAMES

    assert list(METHOD_NAMES) == list(BASELINES)


# ---- the commands ----------------------------------------------------------------------------------


def test_cli_baseline_writes_results(cli_env, tmp_path, capsys):
    code = main(["baseline", cli_env["model"], "--methods", "layer_ablation", "weight_norm", "block_influence",
                 "--max-tokens", str(N_TOKENS), "--text", cli_env["text"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = tmp_path / "baseline-llama.json"  # default: baseline-<file stem>.json here
    run = ScoreRun.load(path)
    assert run.command == "baseline" and list(run.methods) == ["layer_ablation", "weight_norm", "block_influence"]
    assert run.settings["max_tokens"] == N_TOKENS and run.settings["seed"] == 42
    assert run.base["ppl"] == pytest.approx(math.exp(run.base["nll"]))
    assert run.methods["layer_ablation"].scores[IDENTITY] == 0.0
    csv_lines = path.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0] == "method,layer,score,uncertainty,rank" and len(csv_lines) == 1 + 3 * N_LAYER
    assert "Layer scores" in out and "Rank agreement" in out and "Spearman" in out
    assert "±" in out and f"wrote {path.name}" in out


@pytest.mark.parametrize("form", [
    ["--methods", "random", "weight_norm"],
    ["--methods", "random", "--methods", "weight_norm"],
    ["--methods", "random,weight_norm"],
    ["--methods", "random, weight_norm"],
])
def test_cli_methods_forms(cli_env, tmp_path, capsys, form):
    out = tmp_path / "r.json"
    code = main(["baseline", cli_env["model"], *form, "--max-tokens", "32", "--text", cli_env["text"],
                 "--out", str(out), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(stdout)
    assert list(d["methods"]) == ["random", "weight_norm"] and d["out"] == str(out)
    assert d["agreement"][0]["a"] == "random" and d["agreement"][0]["b"] == "weight_norm"


def test_split_methods_without_the_argv_rewrite():
    from qpsa.cli.baseline import split_methods

    # what click hands the command for `--methods a b c` when qpsa.cli.main has not rewritten argv
    assert split_methods(["random"], ["weight_norm", "fisher"]) == ["random", "weight_norm", "fisher"]
    assert split_methods(None, []) == list(BASELINES) == split_methods((), [])
    with pytest.raises(QpsaError, match="unexpected extra argument"):
        split_methods((), ["x"])
    with pytest.raises(QpsaError, match="--methods is empty"):
        split_methods([" , "], [])


def test_cli_all_methods_by_default(cli_env, tmp_path, capsys):
    code = main(["baseline", cli_env["model"], "--max-tokens", "64", "--text", cli_env["text"], "--seed", "3",
                 "--n", "2", "--out", str(tmp_path / "all.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    run = ScoreRun.load(tmp_path / "all.json")
    assert list(run.methods) == list(BASELINES)
    assert run.settings["angular_n"] == 2 and run.settings["seed"] == 3
    assert run.methods["angular_distance"].details["span"] == [2, 2, 2, 1]


@pytest.mark.parametrize("args, needle", [
    (["--methods", "layer_ablation", "bogus"], "unknown method 'bogus'; known: layer_ablation, weight_norm"),
    (["--methods", "layer_ablation,bogus"], "unknown method 'bogus'"),
    (["--max-tokens", "0"], "--max-tokens must be at least 2"),
    (["--max-tokens", "-5"], "--max-tokens must be at least 2"),
    (["--max-tokens", "300"], "exceeds the model's context length 256"),
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "9"], "--n 9 exceeds the model's 4 layers"),
    (["--out", "{model}"], "would overwrite the model file"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/x.csv"], "the CSV is written beside it"),
    (["--out", "{tmp}/missing/x.json"], "does not exist"),
    (["extra"], "unexpected extra argument"),
    (["--dataset", "wikitext-2"], "either --text or --dataset"),
])
def test_cli_bad_inputs(cli_env, tmp_path, capsys, args, needle):
    args = [a.format(model=cli_env["model"], tmp=tmp_path) for a in args]
    code = main(["baseline", cli_env["model"], "--text", cli_env["text"], "--max-tokens", "32", *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q-psa: error: "), err
    assert needle in lines[0]
    assert not list(tmp_path.glob("*.json"))


def test_cli_out_equal_to_model_is_refused_before_loading(cli_env, tmp_path, capsys):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"not a model")  # checking the out path must not need to read the model
    code = main(["baseline", str(model), "--out", str(model), "--text", cli_env["text"]])
    assert code == 2 and "would overwrite the model file" in capsys.readouterr().err
    assert model.read_bytes() == b"not a model"


def test_cli_agreement(cli_env, tmp_path, capsys):
    for name, methods in (("a", ["random", "weight_norm"]), ("b", ["block_influence"])):
        assert main(["baseline", cli_env["model"], "--methods", *methods, "--max-tokens", "32",
                     "--text", cli_env["text"], "--out", str(tmp_path / f"{name}.json"), "--json"]) == 0
    capsys.readouterr()
    assert main(["agreement", str(tmp_path / "a.json"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(r["a"], r["b"]) for r in d["agreement"]] == [("random", "weight_norm")]
    assert main(["agreement", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["methods"] == ["a:random", "a:weight_norm", "b:block_influence"] and len(d["agreement"]) == 3
    assert main(["agreement", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "Kendall" in capsys.readouterr().out
    assert main(["agreement", str(tmp_path / "b.json")]) == 2
    assert "needs at least two methods" in capsys.readouterr().err
    assert main(["agreement", str(tmp_path / "nope.json")]) == 2
    assert "no such results file" in capsys.readouterr().err


# ---- a real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_all_baselines(wikitext, tmp_path):
    bundled_path("smollm2-135m")
    loaded = load_model("smollm2-135m")
    tokens = eval_tokens(loaded, text_from_file(WIKITEXT), 500)
    run = run_baselines(loaded, tokens, list(BASELINES), ScoreSettings())
    clear_cache()
    L = 30
    assert 15 < run.base["ppl"] < 30  # 21.86 with q-psa's engine on these 500 tokens
    for name, s in run.methods.items():
        assert len(s.scores) == L and all(math.isfinite(x) for x in s.scores), name
        assert sorted(s.ranking()) == list(range(L))
    abl = run.methods["layer_ablation"]
    # the first layer is by far the most damaging to skip (ΔPPL ~5e4), then layers 1 and 29
    assert abl.ranking()[-1] == 0 and abl.scores[0] > 1000
    assert set(abl.ranking()[-4:]) >= {0, 1, 29}
    assert min(abl.scores) > -1.0  # no layer's removal helps by more than noise
    bi, ad = run.methods["block_influence"], run.methods["angular_distance"]
    assert bi.ranking()[-1] == 0 and ad.ranking()[-1] == 0
    assert all(0 <= x <= 2 for x in bi.scores) and all(0 <= x <= 1 for x in ad.scores)
    assert all(x > 0 for x in run.methods["fisher"].scores)
    assert all(u > 0 for u in run.methods["fisher"].uncertainty)
    rho = {(r["a"], r["b"]): r["spearman"] for r in rank_agreement(run.methods)}
    assert rho[("angular_distance", "block_influence")] > 0.9
    assert rho[("block_influence", "layer_ablation")] > 0.4
