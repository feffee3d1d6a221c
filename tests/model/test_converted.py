"""q-psa on files made by llama.cpp's own converter: logits against llama.cpp and transformers.

Each family's tiny random transformers model is converted by convert_hf_to_gguf.py of llama.cpp
release b11434 (tests/helpers/converted.py; cached, so a rerun converts nothing). On one sequence,
q-psa's logits must match llama.cpp's on the same file (mean KL divergence per token ≤ 0.01 nats,
the same top token at ≥ 95% of positions) and transformers' on the weights the file came from
(float32 both: to rounding).
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
    assert figures["entropy"] < figures["uniform_entropy"] - 1.0, figures  # a model with opinions
    assert figures["kld_llamacpp"] <= 0.01 and figures["top1_llamacpp"] >= 0.95, figures
    assert figures["kld_transformers"] <= 1e-6 and figures["top1_transformers"] == 1.0, figures
    assert figures["max_abs_diff_transformers"] < 1e-3, figures


def test_quantized_conversion_matches_llamacpp(llama_cpp):
    """The converter's own Q8_0: llama.cpp quantizes activations to 8 bits there, q-psa does not."""
    figures = compare_all("llama3", outtype="q8_0")
    assert figures["kld_llamacpp"] <= 0.01 and figures["top1_llamacpp"] >= 0.95, figures
