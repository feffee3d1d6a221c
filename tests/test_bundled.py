"""Integration tests on the two bundled real models, against llama.cpp's figures and llama.cpp itself."""

from __future__ import annotations

import pytest
import torch

from conftest import bundled_path
from qpsa.eval.perplexity import make_windows, perplexity
from qpsa.model.load import load_model

pytestmark = pytest.mark.slow

# llama.cpp's llama-perplexity on ../shared/data/wikitext-2-raw-test.txt, ctx 512 (../shared/reference/llamacpp.md)
SMOLLM2_LLAMACPP = {4: 24.0552, 20: 29.2716}


@pytest.fixture(scope="module")
def smollm2():
    return load_model(str(bundled_path("smollm2-135m")))


@pytest.fixture(scope="module")
def gemma3():
    return load_model(str(bundled_path("gemma3-270m")))


@pytest.mark.parametrize("chunks", [4, 20])
def test_smollm2_perplexity_matches_llamacpp(smollm2, wikitext, chunks):
    windows = make_windows(smollm2.tokenizer, wikitext, ctx=512, chunks=chunks)
    result = perplexity(smollm2.model, windows)
    assert result.n_scored == chunks * 255
    assert abs(result.ppl / SMOLLM2_LLAMACPP[chunks] - 1) < 0.01, result.ppl


def test_gemma3_perplexity_matches_llamacpp(gemma3, wikitext, llama_cpp):
    from qpsa.reference.llamacpp import LlamaCpp

    reference = LlamaCpp(gemma3.path, ctx=512, threads=2).perplexity(wikitext, chunks=4)
    windows = make_windows(gemma3.tokenizer, wikitext, ctx=512, chunks=4)
    assert int(windows.tokens[0, 0]) == gemma3.tokenizer.bos_id  # gemma's vocabulary adds BOS
    result = perplexity(gemma3.model, windows)
    assert abs(result.ppl / reference.ppl - 1) < 0.01, (result.ppl, reference.ppl)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_tokenizer_matches_llamacpp_on_wikitext(name, wikitext, llama_cpp, request):
    from qpsa.reference.llamacpp import LlamaCpp

    loaded = request.getfixturevalue(name.split("-")[0])
    reference = LlamaCpp(loaded.path, ctx=64, threads=1)
    assert reference.add_bos == loaded.tokenizer.add_bos
    ours = loaded.tokenizer.encode(wikitext, bos=loaded.tokenizer.add_bos)
    theirs = reference.tokenize(wikitext, add_bos=reference.add_bos)
    assert ours == theirs


def test_special_token_lookalikes_are_plain_text(gemma3):
    tok = gemma3.tokenizer
    ids = tok.encode("a <bos> b <start_of_turn> c")
    assert tok.bos_id not in ids
    assert tok.decode(ids) == "a <bos> b <start_of_turn> c"


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_dequantized_weights_equal_gguf_package(name):
    """Every tensor the engine uses equals the gguf package's own dequantize, exactly."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = bundled_path(name)
    loaded = load_model(str(path), tokenizer=False)
    reader = GGUFReader(path)
    for t in reader.tensors:
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(loaded.file.tensors[t.name].shape).copy())
        assert torch.equal(loaded.model.weights[t.name], ref.float()), t.name


def test_second_load_uses_tokenizer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path))
    path = str(bundled_path("smollm2-135m"))
    first = load_model(path)
    second = load_model(path)
    assert list((tmp_path / "tokenizers").glob("*.json")), "tokenizer was not cached"
    assert first.tokenizer.encode("Hello, world 123") == second.tokenizer.encode("Hello, world 123")
