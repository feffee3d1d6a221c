"""`q-psa requantize`, `sensitivity` and `plan`: type choice as llama-quantize makes it, written files,
KL-divergence measurements against the unmodified model, and the budgeted choice of types."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from helpers.cli_run import run as cli
from helpers.tiny import write_tiny_gguf, write_wide_gguf

from qpsa.errors import QpsaError
from qpsa.eval.perplexity import make_windows
from qpsa.gguf.read import open_gguf
from qpsa.model.load import load_model
from qpsa.quant.requantize import choose_types, parse_tensor_type, requantize_model, write_requantized
from qpsa.quant.sensitivity import Option, Reference, choose_mixture, group_variant, quant_groups

PROSE = ("Quantization moves every weight to the nearest point of a grid; some layers mind more than others. "
         "The model reads this text and predicts each next token from the ones before it, 9 times over. ") * 60


@pytest.fixture
def tiny(tmp_path):
    """A 3-layer llama in F32 with rows of 256 (so K-quants fit) and a separate output head, and a text."""
    path = write_wide_gguf(tmp_path / "tiny.gguf")
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    return path, text


def test_types_follow_llama_quantize(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", "llama", n_layer=2, qtype=Q.Q8_0)  # rows of 64, tied head
    f = open_gguf(path)
    got = {c.name: (c.target, c.why) for c in choose_types(f, "q4_0")}
    assert got["blk.0.attn_q.weight"] == (Q.Q4_0, "type")
    assert got["blk.1.ffn_down.weight"][0] == Q.Q4_0
    assert got["token_embd.weight"][0] == Q.Q8_0  # the tied head: Q6_K cannot encode rows of 64 -> Q8_0
    assert got["blk.0.attn_norm.weight"] == (Q.F32, "not quantized")
    pure = {c.name: c.target for c in choose_types(f, "q4_0", pure=True)}
    assert pure["token_embd.weight"] == Q.Q4_0
    over = {c.name: c.target for c in choose_types(f, "q4_0", [parse_tensor_type("ffn_down=q8_0"),
                                                              parse_tensor_type("blk\\.1\\.=q5_1")])}
    assert over["blk.1.ffn_down.weight"] == Q.Q8_0  # the first matching pattern wins
    assert over["blk.1.attn_q.weight"] == Q.Q5_1
    assert over["blk.0.attn_q.weight"] == Q.Q4_0


def test_head_gets_q6_k_when_rows_fit(tiny):
    f = open_gguf(tiny[0])
    got = {c.name: c.target for c in choose_types(f, "q4_k")}
    assert got["output.weight"] == Q.Q6_K and got["token_embd.weight"] == Q.Q4_K
    assert {c.name: c.target for c in choose_types(f, "q8_0")}["output.weight"] == Q.Q8_0


def test_types_that_cannot_encode_rows_are_refused_or_fall_back(tmp_path):
    f = open_gguf(write_tiny_gguf(tmp_path / "t.gguf", "llama", n_layer=1))
    with pytest.raises(QpsaError, match="Q4_K cannot encode rows of 64"):
        choose_types(f, "q4_k", fallback=False)
    got = {c.name: c for c in choose_types(f, "q4_k")}  # llama-quantize falls back, and so does q-psa by default
    assert got["blk.0.attn_q.weight"].target == Q.Q5_0 and "fallback from Q4_K" in got["blk.0.attn_q.weight"].why
    assert {c.name: c.target for c in choose_types(f, "q3_k", fallback=True)}["blk.0.ffn_up.weight"] == Q.Q4_0


@pytest.mark.parametrize("spec", ["noequals", "=q4_0", "[bad=q4_0", "ffn=q9_9", "ffn=iq2_xxs"])
def test_bad_tensor_type_specs(spec):
    with pytest.raises(QpsaError):
        parse_tensor_type(spec)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k", "q6_k", "q2_k"])
def test_written_file_loads_and_holds_requantized_values(tiny, tmp_path, qtype):
    source = open_gguf(tiny[0])
    choices = choose_types(source, qtype)
    out = write_requantized(source, choices, tmp_path / "out.gguf")
    written = open_gguf(out)
    assert list(written.tensors) == list(source.tensors)
    for c in choices:
        t = written.tensors[c.name]
        assert t.qtype == c.target and t.shape == c.shape
        if c.target == c.source:
            assert np.array_equal(np.asarray(t.raw), np.asarray(source.tensors[c.name].raw))
    # the requantized values are what the gguf package's dequantizer reads, and close to the source
    t = written.tensors["blk.1.ffn_down.weight"]
    values = gguf_dequantize(np.asarray(t.blocks), t.qtype).reshape(t.shape)
    x = source.tensors["blk.1.ffn_down.weight"].dequantize()
    rel = np.sqrt(((values - x) ** 2).mean() / (x**2).mean())
    assert 0 < rel < 0.6
    assert written.metadata["general.file_type"] > 0
    # in memory the same weights, bit for bit
    in_memory = requantize_model(load_model(str(tiny[0])), qtype)
    loaded = load_model(str(out))
    for name in ("blk.0.attn_q.weight", "output.weight", "token_embd.weight"):
        assert torch.equal(in_memory.model.weights[name], loaded.model.weights[name])


def test_requantize_cli(capsys, tiny, tmp_path):
    out = tmp_path / "q.gguf"
    code, stdout, err = cli(capsys, "requantize", tiny[0], "--type", "q4_0", "--output", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["after"]["by_type"]["Q4_0"] == 7 * 3 + 1 and report["after"]["by_type"]["Q6_K"] == 1
    assert report["after"]["bits_per_weight"] < report["before"]["bits_per_weight"]
    assert out.exists()
    code, stdout, _ = cli(capsys, "requantize", tiny[0], "--type", "q8_0", "--dry-run")
    assert code == 0 and "dry run" in stdout


@pytest.mark.parametrize("args, needle", [
    (["--type", "q4_0"], "--output"),
    (["--type", "q7_0", "--dry-run"], "unknown type"),
    (["--type", "q4_0", "--tensor-type", "x", "--dry-run"], "REGEX=TYPE"),
    (["--type", "q4_0", "--output", "{model}"], "is the input model"),
    (["--type", "q4_0", "--output", "{tmp}/nowhere/x.gguf"], "does not exist"),
])
def test_requantize_bad_input(capsys, tiny, tmp_path, args, needle):
    args = [a.format(model=tiny[0], tmp=tmp_path) for a in args]
    code, _, err = cli(capsys, "requantize", tiny[0], *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


def test_k_quant_on_narrow_rows_is_one_line(capsys, tmp_path):
    model = write_tiny_gguf(tmp_path / "t.gguf", "llama", n_layer=1)
    code, _, err = cli(capsys, "requantize", model, "--type", "q4_k", "--no-fallback", "--output", tmp_path / "o.gguf")
    assert code == 2 and "cannot encode rows of 64" in err and not (tmp_path / "o.gguf").exists()


def _reference(tiny, chunks=2, ctx=64):
    loaded = load_model(str(tiny[0]))
    windows = make_windows(loaded.tokenizer, tiny[1].read_text(), ctx, chunks)
    return loaded, Reference(loaded.model, windows)


def test_reference_measures_kl_and_restores_weights(tiny):
    loaded, ref = _reference(tiny)
    same = ref.measure({}, 0)
    assert same.kld == 0 and same.same_top == 1 and same.dnll == 0
    before = {n: w.clone() for n, w in loaded.model.weights.items()}
    group = quant_groups(loaded, "layer")[2]  # layer 1
    values, info = group_variant(loaded, group, Q.Q2_K)
    stats = ref.measure(values, group.first_layer)
    assert stats.kld > 0 and stats.n_tokens == 2 * 31
    assert info["bytes"] < info["bytes_before"]
    # rerunning every layer from the embedding gives the same figures as starting at the layer
    assert ref.measure(values, 0).kld == pytest.approx(stats.kld, rel=1e-9, abs=1e-12)
    for n, w in loaded.model.weights.items():
        assert torch.equal(w, before[n]), n
    # an unchanged re-encoding is the identity
    identical = {"blk.0.attn_q.weight": loaded.model.weights["blk.0.attn_q.weight"].clone()}
    assert ref.measure(identical, 0).kld == 0


def test_more_bits_less_divergence(tiny):
    loaded, ref = _reference(tiny)
    group = quant_groups(loaded, "layer")[1]
    klds = [ref.measure(group_variant(loaded, group, q)[0], group.first_layer).kld for q in (Q.Q8_0, Q.Q4_K, Q.Q2_K)]
    assert klds[0] < klds[1] < klds[2]


def test_groups_cover_every_quantizable_tensor_once(tiny):
    loaded = load_model(str(tiny[0]))
    for granularity, n in (("layer", 3 + 2), ("tensor", 7 * 3 + 2)):
        groups = quant_groups(loaded, granularity)
        assert len(groups) == n
        names = [t for g in groups for t in g.tensors]
        assert len(names) == len(set(names)) == 7 * 3 + 2
        assert groups[0].tensors == ["token_embd.weight"] and groups[0].first_layer == 0
        assert groups[-1].tensors == ["output.weight"] and groups[-1].first_layer == 3


def test_choose_mixture_is_the_exact_optimum():
    rng = np.random.default_rng(0)
    for _ in range(20):
        options = {f"g{i}": [Option(f"t{k}", int(b), float(c), 0.0)
                             for k, (b, c) in enumerate(zip(rng.integers(10, 100, 3), rng.random(3)))]
                   for i in range(4)}
        budget = int(rng.integers(60, 300))
        best = min((sum(o.kld for o in combo), combo) for combo in itertools.product(*options.values())
                   if sum(o.bytes for o in combo) <= budget)[0] if any(
            sum(o.bytes for o in combo) <= budget for combo in itertools.product(*options.values())) else None
        if best is None:
            with pytest.raises(QpsaError):
                choose_mixture(options, budget, resolution=budget)
            continue
        chosen, total = choose_mixture(options, budget, resolution=budget)
        assert sum(o.bytes for o in chosen.values()) <= budget
        assert total == pytest.approx(best)


def test_sensitivity_cli(capsys, tiny, tmp_path):
    out = tmp_path / "sens"
    code, stdout, err = cli(capsys, "sensitivity", tiny[0], "--to", "q4_0", "--text", tiny[1], "--ctx", 64,
                            "--chunks", 2, "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert len(result["rows"]) == 5 and all(r["kld"] > 0 for r in result["rows"])
    assert (out / "sensitivity-Q4_0-layer.png").exists() and (out / "sensitivity-Q4_0-layer.csv").exists()
    assert str(out / "sensitivity-Q4_0-layer.html") in result["files"]
    assert "output.weight" in (out / "sensitivity-Q4_0-layer.html").read_text()  # the report beside the JSON
    # a resumed run takes the finished groups as they are
    code, stdout2, _ = cli(capsys, "sensitivity", tiny[0], "--to", "q4_0", "--text", tiny[1], "--ctx", 64,
                           "--chunks", 2, "--out", out, "--json", "--resume")
    assert [r["kld"] for r in json.loads(stdout2)["rows"]] == [r["kld"] for r in result["rows"]]


def test_plan_cli_fits_the_budget_and_writes_a_recipe(capsys, tiny, tmp_path):
    out = tmp_path / "plan"
    args = ["plan", tiny[0], "--types", "q8_0", "q4_0", "--text", tiny[1], "--ctx", 64, "--chunks", 2, "--out", out]
    code, _, err = cli(capsys, *args, "--target-bpw", 99)
    assert code == 2 and "--target-bpw" in err
    code, _, err = cli(capsys, *args, "--target-bpw", 1.0)
    assert code == 2 and "outside what these types can reach" in err
    code, stdout, err = cli(capsys, *args, "--target-bpw", 6.0, "--json", "--output", tmp_path / "p.gguf")
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["plan"]["bits_per_weight"] <= 6.0
    assert plan["plan"]["predicted_kld"] >= 0 and plan["plan"]["kld"] > 0
    assert plan["uniform"], "the plan is compared with a uniform type"
    recipe = (out / "recipe.txt").read_text()
    assert "llama-quantize" in recipe and "$=Q" in recipe
    written = open_gguf(tmp_path / "p.gguf")
    assert 8 * sum(t.raw.nbytes for t in written.tensors.values()) / sum(
        t.n_elements for t in written.tensors.values()) == pytest.approx(plan["plan"]["bits_per_weight"])
    assert math.isfinite(plan["plan"]["ppl"])
    # the llama-quantize command reproduces the plan: its preset's rules plus the --tensor-type overrides
    command = plan["llama_quantize"]
    overrides = [parse_tensor_type(command[i + 1]) for i, a in enumerate(command) if a == "--tensor-type"]
    source = open_gguf(tiny[0])
    by_command = {c.name: c.target.name for c in choose_types(source, command[-1], overrides=overrides)}
    assert by_command == {name: t.qtype.name for name, t in written.tensors.items() if name in by_command}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_smollm2_requantized_like_llama_quantize(tmp_path, wikitext, llama_cpp, qtype):
    """q-psa's file and llama.cpp's own llama-quantize of SmolLM2: the same type for every tensor, and
    perplexities in llama.cpp within 1% (4 windows of 512 tokens of WikiText-2)."""
    from helpers.bundled import bundled_path

    from qpsa.quant.requantize import FILE_TYPES
    from qpsa.reference.llamacpp import LlamaCpp, llama_quantize

    source = bundled_path("smollm2-135m")
    ours = write_requantized(open_gguf(source), choose_types(open_gguf(source), qtype), tmp_path / "ours.gguf")
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(source, theirs, FILE_TYPES[Q[qtype]])
    a, b = open_gguf(ours), open_gguf(theirs)
    assert {n: t.qtype for n, t in a.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}
    same = sum(np.array_equal(np.asarray(a.tensors[n].raw), np.asarray(b.tensors[n].raw)) for n in a.tensors)
    print(f"{qtype}: {same} of {len(a.tensors)} tensors byte-identical to llama-quantize's")
    ppl = {}
    for name, path in (("ours", ours), ("theirs", theirs)):
        ref = LlamaCpp(path, ctx=512)
        ppl[name] = ref.perplexity(wikitext, chunks=4).ppl
        ref.close()
    print(f"{qtype}: llama.cpp PPL of q-psa's file {ppl['ours']:.4f}, of llama-quantize's {ppl['theirs']:.4f}")
    assert ppl["ours"] == pytest.approx(ppl["theirs"], rel=0.01)
    # and q-psa's engine reads q-psa's file to the same perplexity as llama.cpp does (engine accuracy)
    loaded = load_model(str(ours))
    from qpsa.eval.perplexity import perplexity

    ours_in_qpsa = perplexity(loaded.model, make_windows(loaded.tokenizer, wikitext, 512, 4)).ppl
    assert ours_in_qpsa == pytest.approx(ppl["ours"], rel=0.01)


@pytest.mark.slow
def test_smollm2_plan_beats_the_uniform_type_of_equal_or_larger_size(capsys, tmp_path, wikitext):
    """The issue's check: a plan at a budget has a lower measured mean KLD (held-out windows) than
    llama-quantize's uniform type whose file is at least as large."""
    from helpers.bundled import bundled_path

    text = tmp_path / "wiki.txt"
    text.write_text(wikitext[:200_000])
    code, stdout, err = cli(capsys, "plan", bundled_path("smollm2-135m"), "--target-bpw", 5.3, "--types", "q8_0",
                            "q4_0", "--text", text, "--chunks", 1, "--out", tmp_path / "plan", "--json")
    assert code == 0, err
    plan = json.loads(stdout)
    larger = [u for u in plan["uniform"] if u["bytes"] >= plan["plan"]["bytes"]]
    assert larger, "a uniform type at least as large as the plan is measured"
    print(f"plan {plan['plan']['bits_per_weight']:.3f} bpw KLD {plan['plan']['kld']:.4f}; "
          + "; ".join(f"{u['label']} {u['bits_per_weight']:.3f} bpw KLD {u['kld']:.4f}" for u in plan["uniform"]))
    assert plan["plan"]["bits_per_weight"] <= 5.3
    assert all(plan["plan"]["kld"] < u["kld"] for u in larger)


def test_choose_mixture_keeps_everything_when_the_budget_is_the_models_own_size():
    """Keeping every group (KLD 0) at exactly the budget: sizes rounded up to the DP's resolution would
    no longer fit, so the exact unconstrained optimum is taken first."""
    options = {f"g{i}": [Option("keep", 1001, 0.0, 0.0), Option("Q4_K", 700, 1e-4, 0.0)] for i in range(7)}
    chosen, total = choose_mixture(options, 7007, resolution=10)
    assert {o.qtype for o in chosen.values()} == {"keep"} and total == 0.0
    chosen, total = choose_mixture(options, 7006, resolution=7006)  # one byte short: one group must give way
    assert sum(o.qtype == "Q4_K" for o in chosen.values()) == 1 and total == pytest.approx(1e-4)
