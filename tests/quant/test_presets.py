"""llama-quantize's presets in `q-psa requantize --type`: the names, each preset's per-tensor rules
on tiny models the tests write, the precedence of --pure, --tensor-type, --output-tensor-type and
--token-embedding-type, the fallbacks and the errors; and (slow) byte-identical files against
llama.cpp's own llama-quantize on both bundled models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers.cli_run import assert_user_error
from helpers.cli_run import run as cli
from helpers.llamacpp_tools import requires, run_tool, tool
from helpers.tiny import write_tiny_gguf

from qpsa.errors import QpsaError
from qpsa.gguf.read import open_gguf
from qpsa.quant.presets import PRESETS, llama_quantize_order, use_more_bits
from qpsa.quant.requantize import WRITABLE_PRESETS, choose_types, parse_tensor_type, preset_named

# rows of 256 so that every K-quant fits; 2 query heads per KV head unless a test says otherwise
WIDE = {"n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 256, "tied": False}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Wide tiny llamas of 8 and 32 layers (rows of 256, separate output head), opened."""
    folder = tmp_path_factory.mktemp("wide")
    return {n: open_gguf(write_tiny_gguf(folder / f"l{n}.gguf", "llama", n_layer=n, **WIDE)) for n in (8, 32)}


def types(gguf_file, preset, **options) -> dict[str, Q]:
    return {c.name: c.target for c in choose_types(gguf_file, preset, **options)}


def layers_with(got: dict, role: str, qtype: Q) -> list[int]:
    return sorted(int(n.split(".")[1]) for n, t in got.items() if n.endswith(f"{role}.weight") and t == qtype)


# -- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("Q4_K_M", "Q4_K_M"), ("q4_k_m", "Q4_K_M"), ("Q4_K", "Q4_K_M"), ("Q5_K", "Q5_K_M"), ("Q3_K", "Q3_K_M"),
    ("15", "Q4_K_M"), ("2", "Q4_0"), ("q8_0", "Q8_0"), ("bf16", "BF16"), ("Q2_K_S", "Q2_K_S"),
])
def test_preset_names_as_llama_quantize_reads_them(name, expected):
    assert preset_named(name).name == expected


def test_file_types_are_llama_cpps():
    assert {n: preset_named(n).file_type for n in ("Q4_0", "Q8_0", "Q2_K", "Q3_K_S", "Q4_K_M", "Q5_K_S", "Q6_K",
                                                  "F32", "F16", "BF16")} == {
        "Q4_0": 2, "Q8_0": 7, "Q2_K": 10, "Q3_K_S": 11, "Q4_K_M": 15, "Q5_K_S": 16, "Q6_K": 18, "F32": 0, "F16": 1,
        "BF16": 32}
    assert WRITABLE_PRESETS == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q2_K_S", "Q3_K", "Q3_K_S", "Q3_K_M",
                                "Q3_K_L", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
                                "F16", "BF16", "F32"]


def test_unknown_or_unwritable_presets_are_one_line():
    with pytest.raises(QpsaError, match="unknown type 'Q4_K_X'; llama-quantize's types are Q1_0, .*Q4_K_M"):
        preset_named("Q4_K_X")
    for name, missing in (("IQ4_NL", "IQ4_NL"), ("IQ2_M", "IQ2_S"), ("TQ1_0", "TQ1_0"), ("MXFP4_MOE", "MXFP4")):
        with pytest.raises(QpsaError, match=f"{name} needs the type {missing}, which q-psa cannot write"):
            preset_named(name)
    assert set(PRESETS) - set(WRITABLE_PRESETS) == {"Q1_0", "Q2_0", "MXFP4_MOE", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
                                                    "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "IQ3_XXS", "IQ3_S", "IQ3_M",
                                                    "IQ3_XS", "IQ4_NL", "IQ4_XS"}


def test_tensor_order_is_llama_quantizes():
    names = ["blk.10.attn_v.weight", "output.weight", "blk.9.ffn_down.weight", "blk.9.attn_v.weight", "token_embd.weight"]
    assert llama_quantize_order(names) == ["output.weight", "token_embd.weight", "blk.9.attn_v.weight",
                                           "blk.9.ffn_down.weight", "blk.10.attn_v.weight"]


def test_use_more_bits_pattern():
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


# -- the rules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, bumped", [(8, [0, 3, 6, 7]), (32, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31])])
def test_q4_k_m_gives_q6_k_to_attn_v_and_ffn_down_of_some_layers(wide, n, bumped):
    got = types(wide[n], "Q4_K_M")
    for role in ("attn_v", "ffn_down"):
        assert layers_with(got, role, Q.Q6_K) == bumped
        assert layers_with(got, role, Q.Q4_K) == sorted(set(range(n)) - set(bumped))
    for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert layers_with(got, role, Q.Q4_K) == list(range(n))
    assert got["output.weight"] == Q.Q6_K and got["token_embd.weight"] == Q.Q4_K
    assert got == types(wide[n], "Q4_K")  # llama-quantize's alias
    q5 = types(wide[n], "Q5_K_M")
    assert layers_with(q5, "attn_v", Q.Q6_K) == layers_with(q5, "ffn_down", Q.Q6_K) == bumped


def test_other_k_quant_mixtures(wide):
    f = wide[32]
    got = types(f, "Q3_K_M")  # attn_v: Q5_K for the first two, then Q4_K; ffn_down Q5_K below n/16, else Q4_K
    assert layers_with(got, "attn_v", Q.Q5_K) == [0, 1] and layers_with(got, "attn_v", Q.Q4_K) == list(range(2, 32))
    assert layers_with(got, "ffn_down", Q.Q5_K) == [0, 1] and layers_with(got, "ffn_down", Q.Q4_K) == list(range(2, 32))
    assert layers_with(got, "attn_output", Q.Q4_K) == list(range(32)) and layers_with(got, "attn_q", Q.Q3_K) == list(range(32))
    got = types(f, "Q3_K_L")
    assert all(layers_with(got, r, Q.Q5_K) == list(range(32)) for r in ("attn_v", "ffn_down", "attn_output"))
    got = types(f, "Q3_K_S")
    assert {t for n, t in got.items() if n.startswith("blk.") and "norm" not in n} == {Q.Q3_K}
    got = types(f, "Q4_K_S")  # attn_v Q5_K for the first four, ffn_down Q5_K below n/8
    assert layers_with(got, "attn_v", Q.Q5_K) == [0, 1, 2, 3] and layers_with(got, "ffn_down", Q.Q5_K) == [0, 1, 2, 3]
    got = types(f, "Q5_K_S")
    assert {t for n, t in got.items() if n.startswith("blk.") and "norm" not in n} == {Q.Q5_K}
    assert got["output.weight"] == Q.Q6_K
    got = types(f, "Q2_K")  # GQA 2: attn_v Q3_K; ffn_down and attn_output Q3_K; the rest Q2_K
    assert all(layers_with(got, r, Q.Q3_K) == list(range(32)) for r in ("attn_v", "ffn_down", "attn_output"))
    assert layers_with(got, "ffn_up", Q.Q2_K) == list(range(32)) and got["token_embd.weight"] == Q.Q2_K
    assert types(f, "Q6_K")["output.weight"] == Q.Q6_K and types(f, "Q8_0")["output.weight"] == Q.Q8_0


def test_q2_k_attn_v_with_four_query_heads_per_kv_head(tmp_path):
    f = open_gguf(write_tiny_gguf(tmp_path / "g.gguf", "llama", n_layer=2, **{**WIDE, "n_head_kv": 1}))
    got = types(f, "Q2_K")
    assert layers_with(got, "attn_v", Q.Q4_K) == [0, 1]
    # Q2_K_S: its Q2_K tensors need an importance matrix in llama-quantize; with one, ffn_down Q4_K below n/8
    with pytest.raises(QpsaError, match="Q2_K_S gives blk.0.attn_k.weight the type Q2_K, which llama-quantize "
                                        "writes only with an importance matrix"):
        choose_types(f, "Q2_K_S")
    got = types(f, "Q2_K_S", has_imatrix=True)
    assert layers_with(got, "attn_v", Q.Q4_K) == [0, 1] and layers_with(got, "ffn_down", Q.Q2_K) == [0, 1]


def test_q4_0_ffn_down_with_an_importance_matrix(wide):
    got = types(wide[8], "Q4_0", has_imatrix=True)
    assert layers_with(got, "ffn_down", Q.Q4_1) == [0] and layers_with(got, "ffn_down", Q.Q4_0) == list(range(1, 8))
    assert layers_with(types(wide[8], "Q4_0"), "ffn_down", Q.Q4_0) == list(range(8))


def test_eight_experts(tmp_path):
    f = open_gguf(write_tiny_gguf(tmp_path / "e.gguf", "llama", n_layer=2, expert_count=8, **WIDE))
    got = types(f, "Q4_K_M")
    assert layers_with(got, "attn_v", Q.Q8_0) == layers_with(got, "attn_k", Q.Q8_0) == [0, 1]
    assert layers_with(got, "attn_output", Q.Q5_K) == [0, 1]


# -- options and their precedence ----------------------------------------------------------------

def test_overridden_tensors_do_not_advance_the_rules_count(wide):
    """llama-quantize counts attn_v only where its rules run: an override on layer 0's attn_v makes
    layers 1 and 2 the 'first two' of Q3_K_M."""
    got = types(wide[8], "Q3_K_M", overrides=[parse_tensor_type("blk\\.0\\.attn_v=q8_0")])
    assert got["blk.0.attn_v.weight"] == Q.Q8_0
    assert layers_with(got, "attn_v", Q.Q5_K) == [1, 2]


def test_precedence_of_the_options(tmp_path, wide):
    tied = open_gguf(write_tiny_gguf(tmp_path / "t.gguf", "llama", n_layer=2, **{**WIDE, "tied": True}))
    # --token-embedding-type beats --tensor-type; --tensor-type beats the rules
    got = types(tied, "Q4_K_M", overrides=[parse_tensor_type("token_embd|attn_q=q8_0")], token_embedding_type=Q.Q5_0)
    assert got["token_embd.weight"] == Q.Q5_0 and got["blk.1.attn_q.weight"] == Q.Q8_0
    # a tied head takes --output-tensor-type, unless an override names it, or --pure (llama-quantize skips it then)
    assert types(tied, "Q4_K_M", output_type=Q.Q4_1)["token_embd.weight"] == Q.Q4_1
    assert types(tied, "Q4_K_M", output_type=Q.Q4_1,
                 overrides=[parse_tensor_type("token_embd=q5_1")])["token_embd.weight"] == Q.Q5_1
    assert types(tied, "Q4_K_M", output_type=Q.Q4_1, pure=True)["token_embd.weight"] == Q.Q4_K
    # a separate head: --output-tensor-type first of all
    assert types(wide[8], "Q4_K_M", output_type=Q.Q8_0,
                 overrides=[parse_tensor_type("output=q4_0")])["output.weight"] == Q.Q8_0
    # --pure: the base type everywhere, the head included
    pure = types(wide[8], "Q4_K_M", pure=True)
    assert {t for n, t in pure.items() if "norm" not in n} == {Q.Q4_K}
    # F16, BF16, F32: no override applies (llama-quantize uses them for quantized base types only)
    assert set(types(wide[8], "F16", overrides=[parse_tensor_type("attn=q4_0")]).values()) == {Q.F16, Q.F32}
    # --tensor-type's regex is lower-cased and split at the first '='
    assert parse_tensor_type("BLK\\.0\\.ATTN_Q=Q8_0") == ("blk\\.0\\.attn_q", Q.Q8_0)


def test_fallbacks_where_rows_do_not_fit(tmp_path):
    f = open_gguf(write_tiny_gguf(tmp_path / "n.gguf", "llama", n_layer=1))  # rows of 64 and 128
    got = {c.name: c for c in choose_types(f, "Q4_K_M")}
    assert got["blk.0.attn_q.weight"].target == Q.Q5_0 and got["blk.0.attn_q.weight"].why == "type, fallback from Q4_K"
    assert got["blk.0.attn_v.weight"].target == Q.Q8_0 and "Q4_K_M rule, fallback from Q6_K" == got["blk.0.attn_v.weight"].why
    assert got["blk.0.ffn_down.weight"].target == Q.Q8_0  # rows of 128: the rule's Q6_K falls back too
    assert types(f, "Q5_K_S")["blk.0.attn_q.weight"] == Q.Q5_1 and types(f, "Q3_K_S")["blk.0.attn_q.weight"] == Q.Q4_0
    with pytest.raises(QpsaError, match="blk.0.attn_k.weight: Q4_K cannot encode rows of 64 .*--no-fallback"):
        choose_types(f, "Q4_K_M", fallback=False)
    with pytest.raises(QpsaError, match="Q6_K cannot encode rows of 64"):
        choose_types(f, "Q4_0", token_embedding_type=Q.Q6_K)  # llama-quantize has no fallback for these
    odd = open_gguf(write_tiny_gguf(tmp_path / "o.gguf", "llama", n_layer=1, n_embd=48, n_ff=48))
    assert types(odd, "Q4_0")["blk.0.attn_q.weight"] == Q.F16  # not even 32-weight blocks fit


# -- the command ---------------------------------------------------------------------------------

def test_requantize_cli_with_a_preset(capsys, wide, tmp_path):
    out = tmp_path / "m.gguf"
    code, stdout, err = cli(capsys, "requantize", wide[8].path, "--type", "q4_k", "--output", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["type"] == "Q4_K_M" and report["file_type"] == 15
    assert report["after"]["by_type"] == {"Q4_K": 7 * 8 - 8 + 1, "Q6_K": 8 + 1, "F32": 2 * 8 + 1}
    written = open_gguf(out)
    assert written.metadata["general.file_type"] == 15 and written.metadata["general.quantization_version"] == 2
    assert {n: t.qtype for n, t in written.tensors.items()} == types(wide[8], "Q4_K_M")


@pytest.mark.parametrize("type_, needles", [
    ("Q4_K_X", ["unknown type 'Q4_K_X'", "Q4_K_M", "IQ2_XXS"]),
    ("IQ2_XXS", ["IQ2_XXS needs the type IQ2_XXS, which q-psa cannot write", "Q4_K_M"]),
])
def test_requantize_cli_bad_preset(capsys, wide, tmp_path, type_, needles):
    code, _, err = cli(capsys, "requantize", wide[8].path, "--type", type_, "--output", tmp_path / "x.gguf")
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "x.gguf").exists()


# -- against llama.cpp's llama-quantize ----------------------------------------------------------

# Presets per bundled model, chosen to cover each rule at least once in ~3 minutes on 2 cores
# (q-psa's numpy quantizers take 10-25 s per preset and model, llama-quantize ~3 s): SmolLM2
# (30 layers, 3 query heads per KV head, rows of 576 and 1536) and Gemma 3 (18 layers, 4 per KV
# head, rows of 640 and 2048; its file is Q4_K_M, so Q4_K_M copies every tensor).
AGAINST_LLAMA_QUANTIZE = [("smollm2-135m", p) for p in ("Q4_K_M", "Q3_K_M", "Q4_0")] + [
    ("gemma3-270m", p) for p in ("Q4_K_M", "Q5_K_S", "Q6_K", "Q2_K")]


@pytest.mark.slow
@requires("llama-quantize")
@pytest.mark.parametrize("model, preset", AGAINST_LLAMA_QUANTIZE)
def test_bundled_models_byte_identical_to_llama_quantize(capsys, tmp_path, model, preset):
    from helpers.bundled import bundled_path

    source = bundled_path(model)
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    run_tool("llama-quantize", "--allow-requantize", source, theirs, preset, 2)
    code, _, err = cli(capsys, "requantize", source, "--type", preset, "--output", ours, "--json")
    assert code == 0, err
    a, b = open_gguf(ours), open_gguf(theirs)
    assert set(a.tensors) == set(b.tensors)
    wrong_type = {n: (a.tensors[n].qtype.name, t.qtype.name) for n, t in b.tensors.items() if a.tensors[n].qtype != t.qtype}
    assert not wrong_type, f"q-psa's type, llama-quantize's: {wrong_type}"
    differ = [n for n, t in b.tensors.items() if not np.array_equal(np.asarray(a.tensors[n].raw), np.asarray(t.raw))]
    print(f"{model} {preset}: {len(b.tensors) - len(differ)} of {len(b.tensors)} tensors byte-identical")
    assert not differ
    for key in ("general.file_type", "general.quantization_version"):
        assert a.metadata[key] == b.metadata[key], key


@pytest.mark.slow
@requires("llama-quantize")
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_q2_k_s_stops_where_llama_quantize_does(capsys, tmp_path, model):
    """Without an importance matrix both refuse Q2_K_S, naming the same first tensor."""
    import re
    import subprocess

    from helpers.bundled import bundled_path

    source = bundled_path(model)
    proc = subprocess.run([str(tool("llama-quantize")), "--allow-requantize", str(source), str(tmp_path / "x.gguf"),
                           "Q2_K_S", "2"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    offending = re.search(r"offending tensor: (\S+)", proc.stdout + proc.stderr).group(1)
    code, _, err = cli(capsys, "requantize", source, "--type", "Q2_K_S", "--output", tmp_path / "ours.gguf")
    assert_user_error(code, err, f"gives {offending} the type Q2_K", "importance matrix")
