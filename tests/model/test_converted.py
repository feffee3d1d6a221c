"""q-psa on files made by llama.cpp's own converter: logits against llama.cpp and transformers.

Each family's tiny random transformers model is converted by convert_hf_to_gguf.py of llama.cpp
release b11434 (tests/helpers/converted.py; cached, so a rerun converts nothing). On one sequence,
q-psa's logits must match llama.cpp's on the same file (mean KL divergence per token ≤ 0.01 nats,
the same top token at ≥ 95% of positions) and transformers' on the weights the file came from
(float32 both: to rounding). llama.cpp runs with float32 keys and values and without flash
attention (its defaults round them to float16, which costs up to ~1e-3 nats here: also bounded).
"""

from __future__ import annotations

import pytest
from helpers.converted import ARCH_OF, RECIPES, compare_all, converted

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

FAMILIES = list(RECIPES)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_file_matches_llamacpp_and_transformers(family, llama_cpp):
    from qpsa.gguf.read import open_gguf

    figures = compare_all(family)
    assert open_gguf(converted(family)).metadata["general.architecture"] == ARCH_OF[family]
    assert 0.5 < figures["entropy"] < figures["uniform_entropy"] - 1.0, figures  # opinions, not certainties
    assert figures["kld_llamacpp"] <= 0.01 and figures["top1_llamacpp"] >= 0.95, figures
    assert figures["kld_llamacpp_default"] <= 0.01, figures  # llama.cpp's own float16 keys and values
    assert figures["kld_transformers"] <= 1e-6 and figures["top1_transformers"] == 1.0, figures
    assert figures["max_abs_diff_transformers"] < 1e-3, figures


@pytest.mark.parametrize("family", ["llama3", "gemma2", "phi3"])
def test_f16_conversion_matches_llamacpp(family, llama_cpp):
    """The converter's F16 output: q-psa dequantizes exactly; llama.cpp rounds activations to F16 for
    its matmuls. (On its Q8_0 output llama.cpp rounds activations to 8 bits: with these tiny models'
    large random weights that alone costs ~0.012 nats of KLD, as much as the weights' rounding.)"""
    figures = compare_all(family, outtype="f16")
    assert figures["kld_llamacpp"] <= 0.01 and figures["top1_llamacpp"] >= 0.95, figures


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3", "phi3-long", "mistral"])
def test_forward_paths_agree_on_converted_file(family, monkeypatch):
    """The autograd path (Fisher), the inference path with the compiled kernels and without them
    (torch's ops, blocked attention) give the float64 forward's logits to float32 rounding on the
    new architectures (phi3-long's attention factor, squared on q·k, magnifies it most: ~1e-3)."""
    import torch
    from helpers.converted import sample_tokens

    from qpsa.model import transformer
    from qpsa.model.load import load_model

    path = str(converted(family))
    model = load_model(path, tokenizer=False).model
    tokens = torch.tensor([sample_tokens(family, 48), sample_tokens(family, 48, seed=1)])
    reference = load_model(path, tokenizer=False, dtype=torch.float64).model(tokens).float()

    def close(logits):
        torch.testing.assert_close(logits, reference, atol=3e-3, rtol=0)

    close(model(tokens))  # grad enabled: scaled_dot_product_attention (or capped scores), out of place
    monkeypatch.setattr(transformer, "ATTENTION_BLOCK", 7)
    with torch.inference_mode():
        close(model(tokens))
        monkeypatch.setenv("QPSA_KERNEL", "0")
        close(model(tokens))
