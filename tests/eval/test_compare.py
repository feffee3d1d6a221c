"""`q-psa compare`: llama.cpp's KL-divergence statistics, the stored base, vocabulary checks, generations."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers.cli_run import assert_user_error, run
from helpers.tiny import PROSE, write_tiny_gguf

from qpsa.errors import QpsaError
from qpsa.eval.compare.kld import compare_stats, kld_stats, percentile, token_stats
from qpsa.eval.compare.logprobs import (
    CLIP_NATS,
    BaseLogProbsFile,
    BaseLogProbsWriter,
    decode_log_probs,
    encode_log_probs,
    row_width,
)
from qpsa.eval.compare.run import compare_windows
from qpsa.eval.generation import chat_format, first_divergence, prompt_ids, read_prompts, side_by_side
from qpsa.eval.perplexity import make_windows
from qpsa.model.load import load_model

CHATML = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
# ctx 64, 4 windows: 4 × 31 = 124 scored tokens (llama.cpp prints its final statistics from 100)
WINDOWS = ("--ctx", "64", "--chunks", "4")


def tiny(tmp_path, name="f32", qtype=Q.F32, **kw):
    # an untied head of std 0.1 keeps the logits moderate: with tiny random tied embeddings most
    # targets fall below llama.cpp's 16-nat storage floor
    return str(write_tiny_gguf(tmp_path / f"{name}.gguf", "llama", seed=3, qtype=qtype, tied=False, **kw))


@pytest.fixture
def pair(tmp_path):
    return tiny(tmp_path), tiny(tmp_path, "q4_0", Q.Q4_0)


def run_json(capsys, *args) -> dict:
    code, out, err = run(capsys, "compare", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# ---- the statistics against a direct computation ------------------------------------------------------


def random_logits(S=300, V=1001, seed=0, scale=1.5):
    """scale 1.5 keeps every log-prob above llama.cpp's 16-nat clip; 2.5 puts some under it."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((S, V)) * scale
    other = base + rng.standard_normal((S, V)) * 0.3
    targets = rng.integers(0, V, S)
    return base.astype(np.float32), other.astype(np.float32), targets


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def test_storage_round_trip_within_half_a_step():
    base, _, _ = random_logits(V=1001, scale=2.5)  # odd vocabulary: rows padded to even
    rows = encode_log_probs(torch.from_numpy(base))
    assert rows.shape == (300, row_width(1001)) == (300, 1002 + 4) and rows.dtype == np.uint16
    exact = log_softmax(base)
    stored = decode_log_probs(rows, 1001).double().numpy()
    step = (base.max(1) - np.maximum(base.min(1), base.max(1) - CLIP_NATS)) / 65535  # (S,)
    kept = exact > exact.max(1, keepdims=True) - CLIP_NATS + 1e-3
    err = np.abs(stored - exact)
    bound = np.broadcast_to(step[:, None] / 2 + 5e-6, err.shape)  # + float32 rounding at |log p| ~ 20
    assert np.all(err[kept] <= bound[kept])
    assert (~kept).any() and np.all(stored[~kept] <= -CLIP_NATS + 1e-3)  # clipped: at the floor, out of KLD
    assert step.max() <= CLIP_NATS / 65535 * 1.0001


def test_statistics_match_a_direct_numpy_computation():
    base, other, y = random_logits()
    s = kld_stats(torch.from_numpy(base), torch.from_numpy(other), y)
    lp, lq = log_softmax(base), log_softmax(other)
    n = len(y)
    nll, nll_b = -lq[np.arange(n), y], -lp[np.arange(n), y]
    kld = np.where(lp > -CLIP_NATS, np.exp(lp) * (lp - lq), 0).sum(1)
    dp = np.exp(-nll) - np.exp(-nll_b)
    se = lambda x: math.sqrt(np.var(x) / (n - 1))
    assert s.n_tokens == n
    assert s.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-9)
    assert s.ppl_base == pytest.approx(math.exp(nll_b.mean()), rel=1e-4)  # the stored base: ±1.2e-4 nats
    assert s.ppl_se == pytest.approx(math.exp(nll.mean()) * se(nll), rel=1e-9)
    assert s.ln_ratio == pytest.approx(nll.mean() - nll_b.mean(), abs=1e-4)
    assert s.ln_ratio_se == pytest.approx(se(nll - nll_b), rel=1e-3)
    assert s.cor_ln_ppl == pytest.approx(np.corrcoef(nll, nll_b)[0, 1], abs=1e-5)
    assert s.ppl_ratio == pytest.approx(math.exp(nll.mean() - nll_b.mean()), rel=1e-4)
    assert s.kld == pytest.approx(kld.mean(), rel=1e-3)
    assert s.kld_se == pytest.approx(se(kld), rel=1e-2)
    assert s.kld_quantiles["Median"] == pytest.approx(np.median(kld), rel=1e-2)
    assert s.kld_quantiles["99.0%"] == pytest.approx(np.quantile(kld, 0.99), rel=1e-2)
    assert s.kld_quantiles["Maximum"] == pytest.approx(kld.max(), rel=1e-2)
    assert s.p_diff == pytest.approx(dp.mean(), abs=1e-6)
    assert s.p_diff_rms == pytest.approx(math.sqrt((dp**2).mean()), rel=1e-3)
    assert s.p_diff_quantiles["25.0%"] == pytest.approx(np.quantile(dp, 0.25), abs=1e-6)
    same = (other.argmax(1) == base.argmax(1)).mean()
    assert s.same_top == pytest.approx(same, abs=1.5 / n)  # a near tie may round to one code
    assert s.same_top_se == pytest.approx(math.sqrt(s.same_top * (1 - s.same_top) / (n - 1)))
    assert list(s.kld_quantiles) == ["Maximum", "99.9%", "99.0%", "95.0%", "90.0%", "Median", "10.0%", "5.0%",
                                     "1.0%", "0.1%", "Minimum"]


def test_percentiles_are_llama_cpp_s_linear_interpolation():
    v = np.sort(np.random.default_rng(1).standard_normal(1234))
    for f in (0.001, 0.01, 0.1, 0.5, 0.9, 0.999):
        assert percentile(v, f) == pytest.approx(np.quantile(v, f, method="linear"), abs=1e-12)
    assert percentile(v, 0) == v[0] and percentile(v, 1) == v[-1]


def test_identical_distributions_give_zero():
    base, _, y = random_logits(S=50, V=300)
    s = kld_stats(torch.from_numpy(base), torch.from_numpy(base), y)
    assert abs(s.kld) < 1e-5 and abs(s.ln_ratio) < 1e-4 and s.same_top == 1.0 and s.p_diff_rms < 1e-4


def test_token_stats_refuses_mismatched_shapes():
    base, other, y = random_logits(S=10, V=100)
    with pytest.raises(QpsaError, match="do not match"):
        token_stats(encode_log_probs(torch.from_numpy(base)), torch.from_numpy(other[:, :98]), y)


# ---- models on the windows ----------------------------------------------------------------------------


def windows_for(loaded, ctx=64, chunks=4):
    return make_windows(loaded.tokenizer, PROSE, ctx, chunks)


def test_a_model_compared_with_itself(tmp_path):
    loaded = load_model(tiny(tmp_path))
    run = compare_windows(loaded.model, windows_for(loaded), loaded.model)
    s = run.stats
    assert run.n_scored == s.n_tokens == 4 * 31
    assert abs(s.kld) < 1e-5 and s.kld_quantiles["Maximum"] < 1e-4
    assert s.same_top == 1.0 and s.same_top_se == 0.0
    assert abs(s.ln_ratio) < 1e-4 and s.ppl == pytest.approx(s.ppl_base, rel=1e-4)
    assert s.cor_ln_ppl == pytest.approx(1.0, abs=1e-6)
    assert [r["window"] for r in run.running] == [1, 2, 3, 4]


def test_quantized_pair_differs_and_ppl_equals_perplexity(tmp_path, pair):
    from qpsa.eval.perplexity import perplexity

    base, other = load_model(pair[0]), load_model(pair[1])
    w = windows_for(base)
    s = compare_windows(other.model, w, base.model).stats
    assert s.kld > 1e-3 and s.same_top < 1.0 and s.kld_quantiles["Minimum"] <= s.kld <= s.kld_quantiles["Maximum"]
    assert s.ppl == pytest.approx(perplexity(other.model, w).ppl, rel=1e-5)  # Q: exact logits
    assert s.ppl_base == pytest.approx(perplexity(base.model, w).ppl, rel=1e-4)  # base: the stored log-probs


# ---- the base file -----------------------------------------------------------------------------------


def test_base_file_round_trip_gives_the_same_figures(capsys, tmp_path, pair, prose):
    saved = tmp_path / "base.logits"
    first = run_json(capsys, *pair, "--text", prose, *WINDOWS, "--save-base", saved, "--max-new-tokens", 0)
    bf = BaseLogProbsFile.open(saved)
    assert (bf.ctx, bf.n_chunk, bf.n_vocab) == (64, 4, 283) and bf.meta["text"]["sha256"] == first["text"]["sha256"]
    assert saved.stat().st_size > 20 + 4 * 4 * 64 + 4 * 31 * row_width(283) * 2
    assert not list(tmp_path.glob(".base.logits.*"))  # the temporary file was renamed, not left behind
    again = run_json(capsys, *pair, "--text", prose, "--base-logits", saved, "--max-new-tokens", 0)
    assert again["statistics"] == first["statistics"]  # ctx and chunks came from the file
    assert again["timings"]["base_windows_s"] == 0.0 and again["base_logits"]["read_from"] == str(saved)

    # llama.cpp's own file is the same without the q-psa trailer: read, checked by its tokens
    data = saved.read_bytes()
    (length,) = struct.unpack("<Q", data[-16:-8])
    bare = tmp_path / "llama.logits"
    bare.write_bytes(data[: len(data) - 16 - length])
    assert BaseLogProbsFile.open(bare).meta is None
    from_llama = run_json(capsys, *pair, "--text", prose, "--base-logits", bare, "--max-new-tokens", 0)
    assert from_llama["statistics"] == first["statistics"]


def test_base_file_mismatches_are_refused(capsys, tmp_path, pair, prose):
    saved = tmp_path / "base.logits"
    assert run(capsys, "compare", *pair, "--text", prose, *WINDOWS, "--save-base", saved, "--max-new-tokens", 0)[0] == 0
    other_text = tmp_path / "other.txt"
    other_text.write_text(PROSE.replace("fox", "cat"), encoding="utf-8")
    reuse = ("compare", *pair, "--base-logits", saved, "--max-new-tokens", 0)
    assert_user_error(*run(capsys, *reuse, "--text", other_text)[::2], "computed on the text prose.txt")
    assert_user_error(*run(capsys, *reuse, "--text", prose, "--ctx", 32)[::2], "--ctx 64, not 32")
    assert_user_error(*run(capsys, *reuse, "--text", prose, "--chunks", 3)[::2], "holds 4 windows, not --chunks 3")
    # another BASE (the Q4_0 file): the file names the model it was computed from
    assert_user_error(*run(capsys, "compare", pair[1], pair[0], "--base-logits", saved, "--text", prose,
                           "--max-new-tokens", 0)[::2], "computed from the model")
    truncated = tmp_path / "cut.logits"
    truncated.write_bytes(saved.read_bytes()[:5000])
    assert_user_error(*run(capsys, "compare", *pair, "--text", prose, "--base-logits", truncated)[::2], "truncated")
    garbage = tmp_path / "garbage.logits"
    garbage.write_bytes(b"not a base file at all")
    assert_user_error(*run(capsys, "compare", *pair, "--base-logits", garbage)[::2], "not a base log-probs file")
    assert_user_error(*run(capsys, *reuse, "--save-base", tmp_path / "x")[::2], "not both")


def test_a_llama_cpp_file_of_another_text_is_refused_by_its_tokens(tmp_path):
    loaded = load_model(tiny(tmp_path))
    w = windows_for(loaded)
    writer = BaseLogProbsWriter(tmp_path / "b.logits", w, loaded.config.vocab_size)
    for i in range(w.tokens.shape[0]):
        writer.write(np.zeros((31, row_width(loaded.config.vocab_size)), dtype=np.uint16))
    writer.finish({})
    from qpsa.eval.compare.run import check_base_file

    bf = BaseLogProbsFile.open(tmp_path / "b.logits")
    bf.meta = None  # as llama.cpp writes it: no metadata, only the tokens to go by
    other = make_windows(loaded.tokenizer, PROSE.replace("quick", "slow"), 64, 4)
    with pytest.raises(QpsaError, match="tokens differ from this text's at window 1"):
        check_base_file(bf, other, loaded.config.vocab_size, "0" * 64, {"name": "x", "sha256": "y"}, "z")


# ---- vocabulary, arguments, prompts ------------------------------------------------------------------


def test_different_vocabularies_are_refused(capsys, tmp_path, prose):
    base = tiny(tmp_path)
    padded = tiny(tmp_path, "padded", vocab=300)
    assert_user_error(*run(capsys, "compare", base, padded, "--text", prose)[::2], "different vocabularies", "283", "300")
    from helpers.tiny import bpe_vocab

    tokens = bpe_vocab()[0]
    tokens[200] = "zz"
    renamed = tiny(tmp_path, "renamed", **{"tokenizer.ggml.tokens": tokens})
    assert_user_error(*run(capsys, "compare", base, renamed, "--text", prose)[::2], "different token lists",
                      "token 200")
    gemma = str(write_tiny_gguf(tmp_path / "gemma.gguf", "gemma3"))
    code, _, err = run(capsys, "compare", base, gemma, "--text", prose)
    assert_user_error(code, err, "different")


def test_argument_errors_are_one_line(capsys, tmp_path, pair, prose):
    assert_user_error(*run(capsys, "compare", pair[0])[::2], "OTHER", "--type")
    assert_user_error(*run(capsys, "compare", *pair, "--type", "Q4_0")[::2], "one of them")
    assert_user_error(*run(capsys, "compare", pair[0], "--type", "Q9_9")[::2], "Q9_9")
    assert_user_error(*run(capsys, "compare", *pair, "--tensor-type", "ffn=q8_0")[::2], "--tensor-type needs --type")
    assert_user_error(*run(capsys, "compare", *pair, "--ctx", 0)[::2], "--ctx")
    assert_user_error(*run(capsys, "compare", *pair, "--max-new-tokens", -1)[::2], "--max-new-tokens")
    assert_user_error(*run(capsys, "compare", *pair, "--save-base", pair[0])[::2], "input model")
    assert_user_error(*run(capsys, "compare", pair[0], tmp_path / "none.gguf")[::2], "none.gguf")


def test_empty_prompts_are_refused(capsys, tmp_path, pair, prose):
    for content in ("", "\n  \n\t\n"):
        empty = tmp_path / "prompts.txt"
        empty.write_text(content, encoding="utf-8")
        assert_user_error(*run(capsys, "compare", *pair, "--prompts", empty, "--text", prose)[::2], "no prompts")
        with pytest.raises(QpsaError, match="no prompts"):
            read_prompts(empty)
    assert_user_error(*run(capsys, "compare", *pair, "--prompts", tmp_path / "missing.txt")[::2], "no such prompts")


# ---- generations -------------------------------------------------------------------------------------


def test_chat_formats_from_fixed_strings(tmp_path):
    chat = load_model(tiny(tmp_path, "chat", **{"tokenizer.chat_template": CHATML}))
    md, tok = chat.file.metadata, chat.tokenizer
    assert chat_format(md, tok) == "chatml"
    ids = prompt_ids(tok, "chatml", "hello world")
    assert tok.decode(ids) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(1) == 2 and ids.count(2) == 1  # the control tokens by id, not their spelling
    assert prompt_ids(tok, "raw", "hello world") == tok.encode("hello world")
    plain = load_model(tiny(tmp_path))
    assert chat_format(plain.file.metadata, plain.tokenizer) == "raw"
    gemma = load_model(str(write_tiny_gguf(tmp_path / "g.gguf", "gemma3", **{
        "tokenizer.chat_template": "{{ bos_token }}<start_of_turn>user ..."})))
    assert chat_format(gemma.file.metadata, gemma.tokenizer) == "raw"  # its tiny vocabulary lacks the turn tokens


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_side_by_side(tmp_path, pair):
    base, other = load_model(pair[0]), load_model(pair[1])
    fmt, same = side_by_side(base.model, base.model, base.tokenizer, base.file.metadata, ["hello"], 6)
    assert fmt == "raw" and same[0].diverges_at is None and same[0].first_step_kld == pytest.approx(0, abs=1e-12)
    assert len(same[0].base_tokens) == 6 and same[0].base_tokens == same[0].other_tokens
    _, rows = side_by_side(base.model, other.model, base.tokenizer, base.file.metadata,
                           ["hello world", "the and in", "What is the capital of France?"], 8)
    assert all(r.first_step_kld > 0 for r in rows)
    for r in rows:
        if r.diverges_at is not None:
            assert r.base_tokens[: r.diverges_at] == r.other_tokens[: r.diverges_at]


def test_cli_tables_and_json(capsys, tmp_path, pair, prose):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n\nthe and in\n", encoding="utf-8")
    code, out, err = run(capsys, "compare", *pair, "--text", prose, *WINDOWS, "--prompts", prompts,
                         "--max-new-tokens", 4)
    assert code == 0, err
    for label in ("Mean PPL(Q)", "Mean PPL(base)", "Cor(ln(PPL(Q)), ln(PPL(base)))", "Mean ln(PPL(Q)/PPL(base))",
                  "Mean KLD", "99.9% KLD", "Median KLD", "Minimum KLD", "Mean Δp", "RMS Δp", "Same top p",
                  "Greedy generations", "hello world"):
        assert label in out, label
    r = run_json(capsys, *pair, "--text", prose, *WINDOWS, "--prompts", prompts, "--max-new-tokens", 4)
    assert r["base"]["sha256"] != r["other"]["sha256"] and len(r["other"]["sha256"]) == 64
    assert r["text"]["name"] == "prose.txt" and (r["ctx"], r["chunks"], r["n_scored"]) == (64, 4, 124)
    assert {"load_base_s", "base_windows_s", "other_windows_s", "generation_s", "total_s"} <= set(r["timings"])
    assert [p["prompt"] for p in r["generations"]["prompts"]] == ["hello world", "the and in"]
    assert r["generations"]["format"] == "raw" and len(r["running"]) == 4
    s = r["statistics"]
    assert s["kld"] > 0 and 0 <= s["same_top"] <= 1 and s["kld_se"] > 0
    # --out: the same JSON in a file, and an HTML report beside it
    saved = tmp_path / "cmp.json"
    code, out, err = run(capsys, "compare", *pair, "--text", prose, *WINDOWS, "--max-new-tokens", 0, "--out", saved)
    assert code == 0, err
    assert json.loads(saved.read_text())["statistics"]["kld"] == s["kld"]
    assert f"{s['kld']:.6f}" in (tmp_path / "cmp.html").read_text()
    assert_user_error(*run(capsys, "compare", *pair, "--text", prose, "--out", tmp_path)[::2], "is a directory")


# ---- OTHER as BASE requantized in memory ------------------------------------------------------------


def test_type_requantizes_base_in_memory(capsys, tmp_path, prose):
    from qpsa.gguf.read import open_gguf
    from qpsa.quant.requantize import choose_types, write_requantized

    base = tiny(tmp_path)
    written = tmp_path / "q8.gguf"
    write_requantized(open_gguf(base), choose_types(open_gguf(base), "Q8_0"), written)
    live = run_json(capsys, base, "--type", "Q8_0", "--text", prose, *WINDOWS, "--max-new-tokens", 2)
    on_disk = run_json(capsys, base, written, "--text", prose, *WINDOWS, "--max-new-tokens", 2)
    assert live["other"]["sha256"] is None and live["other"]["requantized_from"] == live["base"]["sha256"]
    assert live["other"]["type"] == "Q8_0" and "Q8_0" in live["other"]["name"]
    for key in ("kld", "same_top", "ppl", "p_diff_rms"):
        assert live["statistics"][key] == pytest.approx(on_disk["statistics"][key], rel=1e-6, abs=1e-9)


# ---- against llama.cpp on a real model ---------------------------------------------------------------


@pytest.mark.slow
def test_kld_and_same_top_match_llama_cpp_on_smollm2(capsys, tmp_path, wikitext, llama_cpp):
    """q-psa's figures (both models through q-psa's engine) against llama.cpp's (both through
    llama.cpp, the same statistics function): mean KLD within 2 % relative, same top within 1 point."""
    from helpers.bundled import WIKITEXT, bundled_path

    from qpsa.gguf.read import open_gguf
    from qpsa.quant.requantize import choose_types, write_requantized
    from qpsa.reference.llamacpp import LlamaCpp

    base_path = bundled_path("smollm2-135m")
    other_path = tmp_path / "smollm2-q4_0.gguf"
    write_requantized(open_gguf(base_path), choose_types(open_gguf(base_path), "Q4_0"), other_path)
    ctx, chunks = 512, 3
    ours = run_json(capsys, base_path, other_path, "--text", WIKITEXT, "--ctx", ctx, "--chunks", chunks,
                    "--max-new-tokens", 0)["statistics"]

    loaded = load_model(str(base_path))
    windows = make_windows(loaded.tokenizer, wikitext, ctx, chunks)
    first = windows.score_from
    parts = []
    a, b = LlamaCpp(base_path, ctx), LlamaCpp(other_path, ctx)
    try:
        for window in windows.tokens.tolist():
            base_logits = torch.from_numpy(a.window_logits(window, first)[:-1])  # (S, V)
            other_logits = torch.from_numpy(b.window_logits(window, first)[:-1])
            parts.append(token_stats(encode_log_probs(base_logits), other_logits, window[first + 1 :]))
    finally:
        a.close()
        b.close()
    from qpsa.eval.compare.kld import TokenStats

    theirs = compare_stats(TokenStats.concat(parts))
    print(f"\nq-psa: KLD {ours['kld']:.6f} ± {ours['kld_se']:.6f}, same top {100 * ours['same_top']:.3f}%, "
          f"PPL(Q) {ours['ppl']:.4f}, PPL(base) {ours['ppl_base']:.4f}")
    print(f"llama.cpp: KLD {theirs.kld:.6f} ± {theirs.kld_se:.6f}, same top {100 * theirs.same_top:.3f}%, "
          f"PPL(Q) {theirs.ppl:.4f}, PPL(base) {theirs.ppl_base:.4f}")
    assert ours["kld"] == pytest.approx(theirs.kld, rel=0.02)
    assert abs(ours["same_top"] - theirs.same_top) <= 0.01
