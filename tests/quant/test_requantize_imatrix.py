"""`requantize --imatrix`: each tensor quantized with its importance weights, llama-quantize's type choice
with an imatrix, the metadata it records, the refusals, and (slow) byte identity with llama-quantize --imatrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers.bundled import WIKITEXT, bundled_path
from helpers.cli_run import assert_user_error
from helpers.cli_run import run as cli
from helpers.llamacpp_tools import requires, run_tool
from helpers.tiny import PROSE, write_tiny_gguf

from qpsa.eval.perplexity import make_windows
from qpsa.gguf.quants import quantize
from qpsa.gguf.read import file_sha256, open_gguf
from qpsa.model.load import load_model
from qpsa.quant.imatrix import compute_imatrix, read_imatrix
from qpsa.quant.requantize import choose_types, requantize_model, requantized_tensors, write_requantized

N_LAYER = 8  # llama-quantize moves ffn_down of layers < n_layer / 8 = 1 up a type


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf", "llama", n_layer=N_LAYER)


@pytest.fixture
def imatrix_file(tiny, tmp_path):
    loaded = load_model(tiny)
    im = compute_imatrix(loaded.model, make_windows(loaded.tokenizer, PROSE, 32, 3).tokens, "prose")
    return im.write(tmp_path / "imatrix.gguf")


def test_ffn_down_of_the_first_layers_moves_up_for_q4_0_and_q5_0(tiny, imatrix_file):
    f, im = open_gguf(tiny), read_imatrix(imatrix_file)
    for base, up in (("Q4_0", Q.Q4_1), ("Q5_0", Q.Q5_1)):  # llama-quantize's presets (a rule of theirs)
        types = {c.name: (c.target, c.why) for c in choose_types(f, base, imatrix=im)}
        assert types["blk.0.ffn_down.weight"] == (up, f"{base} rule")
        assert all(types[f"blk.{i}.ffn_down.weight"] == (Q[base], "type") for i in range(1, N_LAYER))
        assert {c.name: c.target for c in choose_types(f, base)}["blk.0.ffn_down.weight"] == Q[base]  # no imatrix
        assert types["blk.0.ffn_up.weight"][0] == Q[base]
    # --pure, an override, the other types and a uniform type (not a preset) keep the type
    assert {c.name: c.target for c in choose_types(f, "Q4_0", imatrix=im, pure=True)}["blk.0.ffn_down.weight"] == Q.Q4_0
    named = choose_types(f, "Q4_0", [("ffn_down", Q.Q8_0)], imatrix=im)
    assert {c.name: c.target for c in named}["blk.0.ffn_down.weight"] == Q.Q8_0
    assert {c.name: c.target for c in choose_types(f, "Q4_1", imatrix=im)}["blk.0.ffn_down.weight"] == Q.Q4_1
    assert {c.name: c.target for c in choose_types(f, Q.Q4_0, imatrix=im)}["blk.0.ffn_down.weight"] == Q.Q4_0


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1, Q.Q8_0])
def test_tensors_with_an_entry_are_weighted(tiny, imatrix_file, qtype, llama_cpp):
    """Every tensor the imatrix has: ggml's bytes with in_sum2 / count as weights; the rest (embedding,
    head): ggml's bytes without."""
    from qpsa.reference.llamacpp import ggml_quantize

    f, im = open_gguf(tiny), read_imatrix(imatrix_file)
    choices = choose_types(f, qtype, imatrix=im, pure=True)
    weighted = 0
    for name, target, _, raw in requantized_tensors(f, choices, imatrix=im):
        if target == f.tensors[name].qtype:
            continue
        values = f.tensors[name].to_torch().numpy()
        weights = im.mean(name)[0] if name in im.in_sum2 else None
        assert np.array_equal(raw, ggml_quantize(values, target, weights).reshape(-1)), name
        weighted += weights is not None
        if weights is not None and qtype != Q.Q8_0:
            assert not np.array_equal(raw, quantize(values, target).reshape(-1)), name
    assert weighted == 7 * N_LAYER


def test_expert_tensors_take_one_row_of_weights_per_expert(tmp_path):
    """A 3-D tensor (experts, rows, n) with an entry of n_expert rows: expert e is quantized with row e."""
    from qpsa.quant.imatrix import Imatrix
    from qpsa.quant.requantize import TensorChoice

    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 4, 64)).astype(np.float32)
    sums = rng.random((3, 64)).astype(np.float32) * 10

    class Tensor:  # the two things requantized_tensors reads of a GGUF tensor
        qtype = Q.F32
        raw = values.view(np.uint8).reshape(-1)

        @staticmethod
        def to_torch():
            import torch

            return torch.from_numpy(values)

    class File:
        def __init__(self):
            self.tensors = {"blk.0.ffn_down_exps.weight": Tensor()}

    im = Imatrix({"blk.0.ffn_down_exps.weight": sums}, {"blk.0.ffn_down_exps.weight": np.array([5, 6, 7])}, [], 1, 1)
    choice = TensorChoice("blk.0.ffn_down_exps.weight", (3, 4, 64), Q.F32, Q.Q4_0, "type")
    (_, _, _, raw), = requantized_tensors(File(), [choice], imatrix=im)
    expected = [quantize(values[e], Q.Q4_0, sums[e] / np.float32(c)) for e, c in enumerate((5, 6, 7))]
    assert np.array_equal(raw, np.concatenate(expected).reshape(-1))


def test_metadata_records_the_imatrix(tiny, imatrix_file, tmp_path):
    f, im = open_gguf(tiny), read_imatrix(imatrix_file)
    out = write_requantized(f, choose_types(f, "Q4_0", imatrix=im), tmp_path / "out.gguf", imatrix=im)
    meta = open_gguf(out).metadata
    assert meta["quantize.imatrix.file"] == str(imatrix_file)
    assert meta["quantize.imatrix.dataset"] == "prose"
    assert meta["quantize.imatrix.entries_count"] == 7 * N_LAYER
    assert meta["quantize.imatrix.chunks_count"] == im.chunk_count == 3
    assert meta["quantize.imatrix.sha256"] == file_sha256(imatrix_file)
    loaded = load_model(out)  # q-psa reads what it wrote
    assert loaded.config.n_layer == N_LAYER


def test_requantize_model_in_memory_uses_the_weights(tiny, imatrix_file):
    loaded, im = load_model(tiny), read_imatrix(imatrix_file)
    with_im = requantize_model(loaded, "Q4_0", imatrix=im)
    plain = requantize_model(loaded, "Q4_0")
    assert "with imatrix" in with_im.name
    name = "blk.3.attn_q.weight"
    assert not np.array_equal(with_im.model.weights[name].numpy(), plain.model.weights[name].numpy())


def test_cli_writes_and_reports(capsys, tiny, imatrix_file, tmp_path):
    out = tmp_path / "q.gguf"
    code, stdout, err = cli(capsys, "requantize", tiny, "--type", "Q4_0", "--imatrix", imatrix_file, "--output", out,
                            "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["imatrix"]["entries"] == 7 * N_LAYER and r["imatrix"]["weighted"] == 7 * N_LAYER
    assert r["imatrix"]["unweighted"] == sorted({"token_embd.weight", "output.weight"} & set(open_gguf(tiny).tensors))
    assert r["imatrix"]["sha256"] == file_sha256(imatrix_file)
    assert {t["name"]: t["target"] for t in r["tensors"]}["blk.0.ffn_down.weight"] == "Q4_1"
    code, stdout, err = cli(capsys, "requantize", tiny, "--type", "Q4_0", "--imatrix", imatrix_file, "--dry-run")
    assert code == 0, err
    assert "importance matrix" in stdout and "56 tensors weighted" in stdout


def test_cli_refuses_a_bad_imatrix(capsys, tiny, imatrix_file, tmp_path):
    out = tmp_path / "q.gguf"

    def refused(path, *needles):
        code, _, err = cli(capsys, "requantize", tiny, "--type", "Q4_0", "--imatrix", path, "--output", out)
        assert_user_error(code, err, *needles)
        assert not out.exists()

    refused(tmp_path / "none.gguf", "no such imatrix file")
    refused(tiny, "not an importance matrix")
    im = read_imatrix(imatrix_file)
    other = write_tiny_gguf(tmp_path / "wide.gguf", "llama", n_layer=N_LAYER, n_ff=256)
    code, _, err = cli(capsys, "requantize", other, "--type", "Q4_0", "--imatrix", imatrix_file, "--output", out)
    assert_user_error(code, err, "blk.0.ffn_down.weight", "another model")
    fewer = write_tiny_gguf(tmp_path / "short.gguf", "llama", n_layer=2)
    code, _, err = cli(capsys, "requantize", fewer, "--type", "Q4_0", "--imatrix", imatrix_file, "--output", out)
    assert_user_error(code, err, "blk.2.", "is not in the model")
    im.counts["blk.1.ffn_up.weight"] = np.array([0])
    refused(im.write(tmp_path / "zero.gguf"), "blk.1.ffn_up.weight has a count of 0")
    im = read_imatrix(imatrix_file)
    im.in_sum2["blk.0.attn_k.weight"][0, 3] = np.inf
    refused(im.write(tmp_path / "inf.gguf"), "blk.0.attn_k.weight", "not finite")


# --- llama-quantize itself ---------------------------------------------------------------------


@pytest.mark.slow
@requires("llama-imatrix", "llama-quantize")
@pytest.mark.skipif(not WIKITEXT.exists(), reason=f"needs the WikiText-2 test text at {WIKITEXT}")
def test_smollm2_byte_identical_to_llama_quantize_imatrix(tmp_path, capsys):
    """llama-imatrix on SmolLM2 (2 windows of 512), then llama-quantize --imatrix and q-psa requantize
    --imatrix: Q4_0 (its default mixture: ffn_down of layers 0-2 Q4_1, the tied head Q8_0 unweighted) and
    Q4_K --pure (Q4_K where rows fit, 1536-wide ffn_down; Q5_0 fallback elsewhere): every tensor's type
    and bytes equal, and the imatrix metadata llama-quantize writes too."""
    source = bundled_path("smollm2-135m")
    imatrix = tmp_path / "imatrix.gguf"
    run_tool("llama-imatrix", "-m", source, "-f", WIKITEXT, "-c", 512, "--chunks", 2, "-t", 2, "--no-ppl",
             "-o", imatrix, timeout=300)
    for preset, qtype, pure in (("Q4_0", "Q4_0", ()), ("Q4_K_S", "Q4_K", ("--pure",))):
        theirs, ours = tmp_path / f"llama-{qtype}.gguf", tmp_path / f"qpsa-{qtype}.gguf"
        run_tool("llama-quantize", "--allow-requantize", *pure, "--imatrix", imatrix, source, theirs, preset, 2,
                 timeout=300)
        code, _, err = cli(capsys, "requantize", source, "--type", qtype, *pure, "--fallback", "--imatrix", imatrix,
                           "--output", ours, "--json")
        assert code == 0, err
        a, b = open_gguf(ours), open_gguf(theirs)
        assert {n: t.qtype.name for n, t in a.tensors.items()} == {n: t.qtype.name for n, t in b.tensors.items()}
        differ = [n for n in a.tensors if not np.array_equal(np.asarray(a.tensors[n].raw), np.asarray(b.tensors[n].raw))]
        assert not differ, f"{qtype}: {len(differ)} of {len(a.tensors)} tensors differ, e.g. {differ[:3]}"
        for key in ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                    "quantize.imatrix.chunks_count"):
            assert a.metadata[key] == b.metadata[key], key
        assert "quantize.imatrix.sha256" not in b.metadata  # q-psa's addition
