"""`q-psa noise`: embedding noise and typos on tiny models the tests write; one slow run on SmolLM2-135M."""

from __future__ import annotations

import json
import math
import random

import pytest
from helpers.cli_run import run
from helpers.tiny import PROSE, write_tiny_gguf

from qpsa.eval.generation import QUESTION_PROMPTS
from qpsa.eval.noise.embedding import embedding_noise
from qpsa.eval.noise.settings import NoiseSettings
from qpsa.eval.noise.typos import QWERTY_NEIGHBOURS, add_typos, typo_sensitivity
from qpsa.eval.perplexity import make_windows
from qpsa.model.load import load_model


@pytest.fixture
def tiny(tmp_path):
    return str(write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", n_layer=3))


@pytest.fixture
def loaded(tiny):
    return load_model(tiny)


@pytest.fixture
def windows(loaded):
    return make_windows(loaded.tokenizer, PROSE, ctx=64, chunks=2)


# ---- embedding noise ----------------------------------------------------------------------------


def test_vanishing_noise_changes_nothing(loaded, windows):
    r = embedding_noise(loaded.model, windows, [1e-7], samples=2, seed=0)
    s = r.sigmas[0]
    assert s.kl.mean < 1e-9 and s.kl.max < 1e-8
    assert s.flip_pct == 0.0 and s.flip_pct_se == 0.0
    # float32's floor: this model's logits (up to ~28) move by ~1e-5 under a 1e-7 input change, so
    # the mean NLL over 2 × 62 tokens moves by ~1e-6 either way (measured: 1e-7 to 1.1e-6 with
    # torch's ops or the compiled kernels, on AMD and Intel CPUs); σ = 1e-4 moves it by 4e-5.
    assert s.ppl_ratio == pytest.approx(1.0, abs=5e-6)
    assert s.ppl == pytest.approx(r.clean_ppl, rel=5e-6)


def test_kl_and_flips_grow_with_sigma(loaded, windows):
    r = embedding_noise(loaded.model, windows, [0.01, 0.1, 1.0], samples=2, seed=1)
    kl = [s.kl.mean for s in r.sigmas]
    assert kl[0] < kl[1] < kl[2] and kl[0] > 0
    assert r.sigmas[0].flip_pct <= r.sigmas[2].flip_pct
    assert all(s.kl.se > 0 and s.kl.median <= s.kl.p99 <= s.kl.max for s in r.sigmas)
    assert r.n_scored == 2 * (64 - 1 - 32) and r.samples == 2


def test_layer_curve_starts_at_the_input_perturbation(loaded, windows):
    L = loaded.config.n_layer
    r = embedding_noise(loaded.model, windows, [0.02, 0.2], samples=1, seed=2)
    for s in r.sigmas:
        assert [x.depth for x in s.layers] == list(range(L + 1))
        assert s.input_rel == s.layers[0].rel
        assert s.layers[0].rel == pytest.approx(s.sigma, rel=0.15)  # ‖σ·RMS·z_t‖ / ‖E_t‖ ≈ σ
        assert s.layers[0].amplification == 1.0 and s.layers[0].amplification_se == 0.0
        for x in s.layers:
            assert x.amplification == pytest.approx(x.rel / s.layers[0].rel)
            assert x.rel > 0 and x.rel_se > 0 and x.amplification_se >= 0
    # the perturbation is linear in σ for small σ: the same z, scaled
    a, b = r.sigmas
    assert b.layers[0].rel == pytest.approx(10 * a.layers[0].rel, rel=1e-5)


def test_input_perturbation_definition(loaded, windows):
    """σ·RMS with RMS over every entry of the embedded window, checked by hand for one window."""
    import torch

    from qpsa.eval.noise.settings import NOISE_STREAM
    from qpsa.eval.noise.summary import draw_seed

    one = make_windows(loaded.tokenizer, PROSE, ctx=64, chunks=2)
    one.tokens = one.tokens[:1]
    r = embedding_noise(loaded.model, one, [0.05], samples=1, seed=3)
    e = loaded.model.embed(one.tokens)  # (1, T, C)
    rms = float(e.double().pow(2).mean().sqrt())
    assert r.rms == [pytest.approx(rms)]
    z = torch.randn(e.shape, generator=torch.Generator().manual_seed(draw_seed(3, NOISE_STREAM, 0, 0)))
    expected = ((0.05 * rms) * z[0].double().norm(dim=-1) / e[0].double().norm(dim=-1)).mean()
    assert r.sigmas[0].layers[0].rel == pytest.approx(float(expected), rel=1e-5)


def test_same_seed_same_results(loaded, windows):
    a = embedding_noise(loaded.model, windows, [0.05], samples=2, seed=7)
    b = embedding_noise(loaded.model, windows, [0.05], samples=2, seed=7)
    c = embedding_noise(loaded.model, windows, [0.05], samples=2, seed=8)
    strip = lambda r: {**r.__dict__, "seconds": 0, "sigmas": [s.__dict__ | {"layers": s.layers} for s in r.sigmas]}
    assert strip(a) == strip(b)
    assert a.sigmas[0].kl.mean != c.sigmas[0].kl.mean
    # a σ's result does not depend on which other σ were asked for
    d = embedding_noise(loaded.model, windows, [0.01, 0.05], samples=2, seed=7)
    assert d.sigmas[1].kl == a.sigmas[0].kl and d.sigmas[1].layers == a.sigmas[0].layers


def test_gemma_embedding_scale_is_inside_the_rms(tmp_path):
    m = load_model(str(write_tiny_gguf(tmp_path / "g.gguf", "gemma3", n_layer=2)))
    w = make_windows(m.tokenizer, PROSE, ctx=64, chunks=1)
    r = embedding_noise(m.model, w, [0.03], samples=1, seed=0)
    assert r.rms[0] == pytest.approx(float(m.model.embed(w.tokens).double().pow(2).mean().sqrt()))
    assert r.sigmas[0].layers[0].rel == pytest.approx(0.03, rel=0.15)


# ---- typos ----------------------------------------------------------------------------------------


def test_typos_rate_one_edits_every_letter():
    for k in range(20):
        rng = random.Random(k)
        for prompt in QUESTION_PROMPTS:
            text, edits = add_typos(prompt, 1.0, rng)
            assert text != prompt and edits > 0
    text, edits = add_typos("12 + 34 = ?!", 1.0, random.Random(0))
    assert (text, edits) == ("12 + 34 = ?!", 0)  # only letters are edited
    for k in range(50):
        assert add_typos("a", 1.0, random.Random(k))[0] in set(QWERTY_NEIGHBOURS["a"]) | {"aa"}  # never empty


def test_typo_rate_is_per_letter():
    text = "abcdefghijklmnopqrstuvwxyz" * 40
    rng = random.Random(5)
    edits = [add_typos(text, 0.1, rng)[1] for _ in range(20)]
    per_letter = sum(edits) / (20 * len(text))
    assert 0.08 < per_letter < 0.12  # a swap consumes the next letter, so a little under 0.1


def test_qwerty_neighbours():
    assert set(QWERTY_NEIGHBOURS["a"]) == set("qwsz")
    assert set(QWERTY_NEIGHBOURS["g"]) == set("tyfhvb")
    assert set(QWERTY_NEIGHBOURS["m"]) == set("njk")
    assert all(ch not in near and near for ch, near in QWERTY_NEIGHBOURS.items())


def test_typos_change_every_prompt_at_rate_one(loaded):
    r = typo_sensitivity(loaded.model, loaded.tokenizer, QUESTION_PROMPTS[:3], 1.0, samples=2, seed=0, new_tokens=4)
    assert r.kl.n == 6 and r.unchanged_draws == 0
    for p in r.prompts:
        assert len(p.draws) == 2
        for d in p.draws:
            assert d.text != p.prompt and d.n_edits > 0 and d.kl > 0
    assert 0 <= r.flip_pct <= 100 and 0 <= r.same_continuation_pct <= 100


def test_typos_seeded_and_unedited_draws_score_zero(loaded):
    a = typo_sensitivity(loaded.model, loaded.tokenizer, ["hello world"], 0.3, samples=3, seed=4, new_tokens=3)
    b = typo_sensitivity(loaded.model, loaded.tokenizer, ["hello world"], 0.3, samples=3, seed=4, new_tokens=3)
    assert [d.__dict__ for d in a.prompts[0].draws] == [d.__dict__ for d in b.prompts[0].draws]
    r = typo_sensitivity(loaded.model, loaded.tokenizer, ["1234"], 0.5, samples=2, seed=0, new_tokens=3)
    assert r.unchanged_draws == 2 and r.kl.max == 0.0 and r.flip_pct == 0.0 and r.same_continuation_pct == 100.0


# ---- the command ----------------------------------------------------------------------------------


def test_noise_command_json_and_files(capsys, tiny, prose, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "noise", tiny, "--text", prose, "--ctx", 64, "--chunks", 2, "--sigma", 0.01, 0.1,
                            "--samples", 1, "--typo-rate", 0.2, "--new-tokens", 3, "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert [s["sigma"] for s in report["embedding"]["sigmas"]] == [0.01, 0.1]
    assert len(report["embedding"]["sigmas"][0]["layers"]) == 3 + 1
    assert len(report["model"]["sha256"]) == 64 and report["text"]["name"] == "prose.txt"
    assert len(report["text"]["sha256"]) == 64
    assert report["settings"]["seed"] == 42 and report["settings"]["prompts"] == "built-in"
    assert report["typos"]["prompts"][0]["prompt"] == "What is the capital of France?"
    assert json.loads((out / "noise.json").read_text()) == report
    assert (out / "noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noise_command_tables(capsys, tiny, prose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\nhello world\n\n  the [bold]answer[/] is  \n", encoding="utf-8")
    code, stdout, err = run(capsys, "noise", tiny, "--text", prose, "--ctx", 64, "--chunks", 1, "--sigma", 0.05,
                            "--samples", 2, "--prompts", prompts, "--new-tokens", 2)
    assert code == 0, err
    assert "KL nats mean ± se" in stdout and "top-1 flip %" in stdout and "0 (emb)" in stdout
    assert "hello world" in stdout and "[bold]answer[/]" in stdout  # prompts shown literally
    assert (tmp_path / "noise-tiny-llama" / "noise.json").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sigma", 0], "--sigma"),
        (["--sigma", 0.1, -0.5], "--sigma"),
        (["--sigma", "nan"], "--sigma"),
        (["--sigma", "inf"], "--sigma"),
        (["--typo-rate", 0], "--typo-rate"),
        (["--typo-rate", 1.5], "--typo-rate"),
        (["--typo-rate", "nan"], "--typo-rate"),
        (["--samples", 0], "--samples"),
        (["--chunks", 0], "--chunks"),
        (["--ctx", -1], "--ctx"),
        (["--seed", -1], "--seed"),
        (["--chunks", 10**5], "fewer than --chunks"),
        (["--prompts", "no-such-prompts.txt"], "no such"),
        (["--text", "no-such-text.txt"], "no such"),
    ],
)
def test_bad_input_is_one_line(capsys, tiny, prose, args, needle):
    code, _, err = run(capsys, "noise", tiny, "--text", prose, "--ctx", 64, *args)
    _assert_user_error(code, err, needle)


@pytest.mark.parametrize("content", [b"", b"\n   \n\t\n"])
def test_empty_prompts_file(capsys, tiny, prose, tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    code, _, err = run(capsys, "noise", tiny, "--text", prose, "--ctx", 64, "--prompts", path)
    _assert_user_error(code, err, "empty")


def test_out_is_a_file(capsys, tiny, prose, tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    code, _, err = run(capsys, "noise", tiny, "--text", prose, "--ctx", 64, "--out", path)
    _assert_user_error(code, err, "not a folder")


def test_settings_validate_in_the_library():
    with pytest.raises(Exception, match="--sigma"):
        NoiseSettings(sigmas=(math.inf,))
    assert NoiseSettings(sigmas=(0.1, 0.01, 0.1)).sigmas == (0.01, 0.1)


def _assert_user_error(code, err, needle):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("q-psa: error: "), err
    assert needle in lines[0], err


# ---- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_noise(capsys, tmp_path):
    from helpers.bundled import bundled_path

    path = bundled_path("smollm2-135m")
    code, stdout, err = run(capsys, "noise", path, "--chunks", 1, "--samples", 1, "--sigma", 0.1,
                            "--out", tmp_path / "out", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    s = r["embedding"]["sigmas"][0]
    assert len(s["layers"]) == 30 + 1
    assert s["layers"][0]["rel"] == pytest.approx(0.1, rel=0.3)
    assert 0 < s["kl"]["mean"] < 5 and 0 <= s["flip_pct"] <= 100
    assert r["embedding"]["clean_ppl"] > 1 and s["ppl_ratio"] > 0.9
    paris = r["typos"]["prompts"][0]
    assert paris["prompt"] == "What is the capital of France?" and len(paris["draws"]) == 1


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_greedy_equals_one_prompt_at_a_time(tmp_path, arch):
    """Right padding is invisible to causal attention (and to gemma3's sliding window)."""
    import torch

    from qpsa.eval.generation import greedy

    m = load_model(str(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, n_layer=2)))
    prompts = [m.tokenizer.encode(p, bos=m.tokenizer.add_bos) for p in ("hello world and the", "hi", "the world is")]
    logits, conts = greedy(m.model, prompts, 5)
    for i, ids in enumerate(prompts):
        one_logits, one_conts = greedy(m.model, [ids], 5)
        assert conts[i] == one_conts[0] and len(conts[i]) == 5
        torch.testing.assert_close(logits[i], one_logits[0], rtol=1e-4, atol=1e-5)
        full = m.model(torch.tensor([ids]))[0, -1]  # the plain forward
        torch.testing.assert_close(logits[i], full, rtol=1e-4, atol=1e-5)


def test_progress_counts_every_pass(loaded):
    from qpsa.eval.noise.run import run_noise
    from qpsa.sources.texts import EvalText

    settings = NoiseSettings(sigmas=(0.01, 0.1), samples=2, ctx=64, chunks=2, new_tokens=3)
    prompts = [f"prompt number {i} about the world" for i in range(13)]  # 13 × 3 rows: two batches
    calls = []
    report = run_noise(loaded, EvalText("prose", PROSE, "test"), prompts, settings, advance=calls.append)
    assert len(calls) == settings.passes(2, len(prompts)) == 2 * (1 + 2 * 2) + 2 * 3
    assert [p.prompt for p in report.typos.prompts] == prompts
    assert report.text["windows"].startswith("2 windows of 64 tokens")
