"""bench/synth_gguf.py: GGUFs of a large model's shape with random quantized weights. Here on small
shapes of the same two architectures: the file loads in q-psa, its matrices have the scale asked
for, its output distribution is neither uniform nor collapsed, and llama.cpp agrees on its PPL."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qpsa.eval.perplexity import make_windows, perplexity
from qpsa.model.load import load_model
from tests.helpers.bundled import WIKITEXT

spec = importlib.util.spec_from_file_location("synth_gguf", Path(__file__).resolve().parents[1] / "bench" / "synth_gguf.py")
synth = importlib.util.module_from_spec(spec)
sys.modules["synth_gguf"] = synth  # dataclasses look their module up there
spec.loader.exec_module(synth)

SMALL = {
    "llama": synth.Shape("llama", 2, 256, 4, 2, 512, 50000, 500000.0, 1e-5, 4096, tied=False, qkv_bias=False),
    "qwen2": synth.Shape("qwen2", 2, 224, 7, 1, 512, 50000, 1000000.0, 1e-6, 4096, tied=True, qkv_bias=True),
}


@pytest.fixture(params=[("llama", Q.Q4_K), ("qwen2", Q.Q4_0), ("qwen2", Q.Q4_K)], ids=lambda p: f"{p[0]}-{p[1].name}")
def synthetic(request, tmp_path, monkeypatch):
    arch, qtype = request.param
    monkeypatch.setitem(synth.SHAPES, f"small-{arch}", SMALL[arch])
    return synth.write_synthetic(f"small-{arch}", qtype, tmp_path / f"{arch}.gguf"), SMALL[arch], qtype


def test_synthetic_model_is_sane(synthetic):
    path, shape, qtype = synthetic
    loaded = load_model(str(path))
    assert loaded.config.n_layer == shape.n_layer and loaded.config.vocab_size == shape.vocab
    assert loaded.tokenizer.vocab_size == shape.vocab  # SmolLM2's tokens, padded
    types = {t.qtype for t in loaded.file.tensors.values() if len(t.shape) == 2}
    assert types == ({Q.Q4_K} if shape.n_embd % 256 == 0 else {Q.Q4_K, Q.Q4_0}) if qtype == Q.Q4_K else types == {Q.Q4_0}
    w = loaded.model.weights["blk.0.ffn_down.weight"]
    assert abs(float(w.std()) * math.sqrt(shape.n_ff) - 1) < 0.1 and abs(float(w.mean())) < 0.1 * float(w.std())
    tokens = torch.tensor([loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.inference_mode():
        p = loaded.model(tokens).softmax(-1)
    top = p.max(-1).values
    assert 2.0 / shape.vocab < float(top.median()) < 0.9  # neither uniform nor collapsed


@pytest.mark.slow
def test_synthetic_model_ppl_matches_llamacpp(synthetic):
    pytest.importorskip("llama_cpp")
    from qpsa.reference.llamacpp import LlamaCpp

    path, _, _ = synthetic
    text = Path(WIKITEXT).read_text()[:20000]
    loaded = load_model(str(path))
    ours = perplexity(loaded.model, make_windows(loaded.tokenizer, text, ctx=128, chunks=2))
    theirs = LlamaCpp(path, ctx=128, threads=2).perplexity(text, chunks=2)
    assert abs(ours.ppl / theirs.ppl - 1) < 0.01, (ours.ppl, theirs.ppl)
