"""The PyTorch transformer against transformers' model of the same GGUF file, on tiny random models.

Each test writes a tiny GGUF (tests/tiny.py), loads it with q-psa and builds the reference from the
same file with transformers' GGUF loader (its own dequantization, and llama's q/k un-permuted for
its rotate-half rope, as llama.cpp's converter permuted them). transformers would need `accelerate`
for `from_pretrained(gguf_file=...)`, so the reference model is made from the config it reads
from the file and filled with `load_gguf_checkpoint`, which is what `from_pretrained` does.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers.tiny import write_tiny_gguf

from qpsa.errors import QpsaError
from qpsa.model import transformer
from qpsa.model.load import load_model
from qpsa.model.transformer import Transformer, causal_attention, token_nll_

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

T = 24  # tokens per sequence; gemma3's tiny sliding window is 8, so it matters
ATOL = RTOL = 1e-4


def tokens_for(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def hf_model(path, layers=None):
    """transformers' model of the GGUF file at `path` (float32, eval), running `layers` in order."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    kwargs = {}
    loaded = load_model(str(path), tokenizer=False)
    if loaded.config.arch == "gemma3":
        # llama.cpp scales gemma3's q·k by 1/sqrt(head_dim) (all sizes but 27B); transformers'
        # default query_pre_attn_scalar (256) is the head_dim of the 1B/4B checkpoints.
        kwargs["query_pre_attn_scalar"] = loaded.config.head_dim
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert missing == (["lm_head.weight"] if config.tie_word_embeddings else []), missing
    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if layers is not None:
        blocks = model.model.layers
        model.model.layers = torch.nn.ModuleList([blocks[i] for i in layers])
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in layers]
        config.num_hidden_layers = len(layers)
    return model.eval()


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def manual(model: Transformer, tokens, layers) -> torch.Tensor:
    """The forward spelled out from the public pieces."""
    positions = torch.arange(tokens.shape[1])
    h = model.embed(tokens)
    for i in layers:
        h = model.block(i, h, positions)
    return model.logits(h)


# -- logits against transformers ---------------------------------------------------------------

CASES = [
    *[("llama", q, True) for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)],
    ("llama", Q.F32, False),
    *[("qwen2", q, True) for q in (Q.F32, Q.Q8_0)],
    ("qwen2", Q.Q4_1, False),
    *[("gemma3", q, True) for q in (Q.F32, Q.Q8_0)],
    ("gemma3", Q.Q5_0, False),
]


@pytest.mark.parametrize(
    "arch, qtype, tied", CASES, ids=[f"{a}-{q.name}{'' if t else '-untied'}" for a, q, t in CASES]
)
def test_logits_match_transformers(tmp_path, arch, qtype, tied, monkeypatch):
    """Both forward paths: the autograd one (as here, grad enabled) and the inference one, with
    the compiled kernels and without them (blocked torch attention with blocks of 7 queries, so a
    sequence spans several blocks and a ragged last one, and in-place elementwise work).
    gemma3 with 6 layers: layers 0-4 sliding-window (local rope base), layer 5 global."""
    n_layer = 6 if arch == "gemma3" else 2
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, qtype=qtype, tied=tied, n_layer=n_layer, seed=1)
    loaded = load_model(str(path))
    if arch == "gemma3":
        assert loaded.config.swa_layers == (True,) * 5 + (False,)
        assert loaded.config.head_dim * loaded.config.n_head != loaded.config.n_embd
    assert ("output.weight" in loaded.file.tensors) == (not tied)
    tokens = tokens_for(loaded.config.vocab_size)
    logits = loaded.model(tokens)
    assert logits.shape == (2, T, loaded.config.vocab_size) and logits.dtype == torch.float32
    assert logits.std() > 0.5  # not a degenerate model
    reference = hf_logits(hf_model(path), tokens)
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=RTOL)
    monkeypatch.setattr(transformer, "ATTENTION_BLOCK", 7)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(tokens), reference, atol=ATOL, rtol=RTOL)  # compiled kernels
        monkeypatch.setenv("QPSA_KERNEL", "0")  # torch's ops, as where no C compiler is
        torch.testing.assert_close(loaded.model(tokens), reference, atol=ATOL, rtol=RTOL)


def test_sliding_window_matters(tmp_path):
    narrow = load_model(str(write_tiny_gguf(tmp_path / "a.gguf", "gemma3")))
    wide = load_model(str(write_tiny_gguf(tmp_path / "b.gguf", "gemma3", **{"attention.sliding_window": 64})))
    tokens = tokens_for(narrow.config.vocab_size)
    a, b = narrow.model(tokens), wide.model(tokens)
    window = narrow.config.sliding_window
    torch.testing.assert_close(a[:, :window], b[:, :window], atol=1e-5, rtol=1e-5)
    assert (a[:, window:] - b[:, window:]).abs().amax(-1).min() > 1e-3  # every later position


# -- layer lists ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("layers", [[0, 2], [0, 1, 1, 2], [2, 0]], ids=["skip1", "repeat1", "reorder"])
def test_layer_list(tmp_path, arch, layers):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, n_layer=3, qtype=Q.Q8_0)
    model = load_model(str(path)).model
    tokens = tokens_for(model.config.vocab_size, seed=2)
    logits = model(tokens, layers=layers)
    torch.testing.assert_close(logits, manual(model, tokens, layers), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, hf_logits(hf_model(path, layers), tokens), atol=ATOL, rtol=RTOL)
    assert (logits - model(tokens)).abs().max() > 1e-2  # the change is visible


def test_repeated_layer_is_block_applied_twice(tmp_path):
    model = load_model(str(write_tiny_gguf(tmp_path / "m.gguf", "llama"))).model
    tokens = tokens_for(model.config.vocab_size)
    positions = torch.arange(T)
    h = model.block(0, model.embed(tokens), positions)
    h = model.block(1, model.block(1, h, positions), positions)
    torch.testing.assert_close(model(tokens, layers=[0, 1, 1]), model.logits(h), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "arch, qtype", [("llama", Q.F32), ("llama", Q.Q4_1), ("qwen2", Q.Q5_0), ("gemma3", Q.Q8_0)]
)
def test_identity_layer_removed_changes_nothing(tmp_path, arch, qtype):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, n_layer=3, qtype=qtype, identity_layer=1)
    loaded = load_model(str(path))
    assert not loaded.model.weights["blk.1.ffn_down.weight"].any()
    assert not loaded.model.weights["blk.1.attn_output.weight"].any()
    tokens = tokens_for(loaded.config.vocab_size)
    full = loaded.model(tokens)
    torch.testing.assert_close(loaded.model(tokens, layers=[0, 2]), full, atol=1e-6, rtol=0)
    assert (loaded.model(tokens, layers=[0]) - full).abs().max() > 1e-2  # layer 2 is no identity


# -- logits_from, dtype --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_logits_from(tmp_path, arch):
    model = load_model(str(write_tiny_gguf(tmp_path / "m.gguf", arch))).model
    tokens = tokens_for(model.config.vocab_size)
    full = model(tokens)
    for k in (0, 1, 12, T - 1):
        part = model(tokens, logits_from=k)
        assert part.shape == (2, T - k, model.config.vocab_size)
        torch.testing.assert_close(part, full[:, k:], atol=1e-5, rtol=1e-5)  # other matmul blocking


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_float64_matches_float32(tmp_path, arch):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, qtype=Q.Q4_0)
    f32 = load_model(str(path))
    f64 = load_model(str(path), dtype=torch.float64, tokenizer=False)
    assert f64.tokenizer is None
    tokens = tokens_for(f32.config.vocab_size)
    out32, out64 = f32.model(tokens), f64.model(tokens)
    assert out64.dtype == torch.float64
    assert all(w.dtype == torch.float64 for w in f64.model.weights.values())
    torch.testing.assert_close(out32.double(), out64, atol=1e-5, rtol=1e-5)
    # the constructor, from the file's float32 weights
    weights = {name: t.to_torch() for name, t in f32.file.tensors.items()}
    again = Transformer(f32.config, weights, dtype=torch.float64)(tokens)
    torch.testing.assert_close(again, out64, atol=1e-12, rtol=1e-12)


def test_weights_are_views_into_the_fused_matrices(tmp_path):
    model = load_model(str(write_tiny_gguf(tmp_path / "m.gguf", "qwen2", n_layer=1))).model
    tokens = tokens_for(model.config.vocab_size)
    before = model(tokens)
    model.weights["blk.0.attn_k.weight"].mul_(0.5)
    model.weights["blk.0.attn_v.bias"].add_(0.5)
    model.weights["blk.0.ffn_up.weight"].mul_(2.0)
    assert (model(tokens) - before).abs().max() > 1e-2


# -- tokenizer -----------------------------------------------------------------------------------

TEXTS = ["hello world", "the hello and world", "Hello, World! the end.", "héllo wörld — ok?", "  two  spaces\n"]


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tokenizer_matches_transformers(tmp_path, arch):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch)
    tok = load_model(str(path)).tokenizer
    ref = hf_tokenizer(path)
    assert len(tok.encode("hello world")) == 2  # the merges are used
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.add_bos == (arch == "gemma3")
    if arch == "gemma3":
        assert tok.bos_id == 2 and tok.eos_id == 1
        assert tok.encode("hello world", bos=True) == ref("hello world").input_ids
    # the second load reads the cached tokenizer and gives the same ids
    cached = load_model(str(path)).tokenizer
    assert [cached.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_smollm_splits_digits_like_llama_cpp(tmp_path):
    # llama.cpp's "smollm" pre-tokenizer cuts every digit apart before the BPE merges
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama")
    tok = load_model(str(path)).tokenizer
    vocab = tok.backend.get_vocab()
    assert "12" in vocab
    assert tok.encode("x12") == [vocab["x"], vocab["1"], vocab["2"]]


@pytest.mark.parametrize(
    "arch, lookalike, special_id", [("gemma3", "<bos>", 2), ("gemma3", "<eos>", 1), ("llama", "<|im_start|>", 1)]
)
def test_control_token_lookalikes_are_text(tmp_path, arch, lookalike, special_id):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch)
    tok = load_model(str(path)).tokenizer
    text = f"{lookalike}hello world"
    assert special_id in hf_tokenizer(path).encode(text, add_special_tokens=False)  # it is a control token
    ids = tok.encode(text)
    assert special_id not in ids
    assert len(ids) > 3 and tok.decode(ids) == text
    assert tok.encode(text, bos=True).count(tok.bos_id) == 1


# -- refusals ------------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", "falcon")
    with pytest.raises(QpsaError) as e:
        load_model(str(path))
    message = str(e.value)
    assert "falcon" in message
    assert all(arch in message for arch in ("llama", "qwen2", "gemma3"))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_perplexity_does_not_depend_on_the_window_batch(tmp_path, arch):
    """Windows batched through the layers give the same token NLLs as one window at a time, and
    as torch.logsumexp − target logit over the full logits."""
    import qpsa.eval.perplexity as P

    path = write_tiny_gguf(tmp_path / "m.gguf", arch, qtype=Q.Q8_0, n_layer=2, seed=3)
    model = load_model(str(path)).model
    gen = torch.Generator().manual_seed(0)
    windows = P.Windows(torch.randint(0, model.config.vocab_size, (5, 24), generator=gen), 12, "test")
    one = P.perplexity(model, windows, batch_size=1)
    per_window = model.logits(model.run_layers(model.embed(windows.tokens), range(2), torch.arange(24)))
    z = per_window[:, 12:-1]
    expected = (torch.logsumexp(z, -1) - z.gather(-1, windows.tokens[:, 13:, None])[..., 0]).double()
    got = torch.stack(P.window_nlls(model, windows.tokens, 12))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for batch in (2, 4, 5):
        r = P.perplexity(model, windows, batch_size=batch)
        assert r.ppl == pytest.approx(one.ppl, rel=1e-6)
        assert [w["window"] for w in r.running] == [1, 2, 3, 4, 5]


# -- the inference path's kernels ----------------------------------------------------------------


@pytest.mark.parametrize(
    "B, T, H, K, D", [(2, 70, 9, 3, 16), (1, 33, 4, 1, 32), (3, 40, 4, 4, 8), (1, 1, 2, 1, 4), (2, 64, 6, 2, 8)]
)
def test_causal_attention_matches_sdpa(B, T, H, K, D):
    """Blocks of 32 queries (ragged last block, a single block, one token), G = 1, 3 and 4
    query heads per key/value head, inputs with the strides the layer hands over."""
    gen = torch.Generator().manual_seed(T)
    qkv = torch.randn(B, T, (H + 2 * K) * D, generator=gen)
    q, k, v = (t.unflatten(-1, (-1, D)) for t in qkv.split([H * D, K * D, K * D], dim=-1))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.3, enable_gqa=True
    ).transpose(1, 2).reshape(B, T, H * D)
    with torch.inference_mode():
        got = causal_attention(q, k, v, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["kernel", "torch"])
@pytest.mark.parametrize("chunk", [7, 64, 10_000])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_head_nll_matches_logsumexp_over_the_full_logits(tmp_path, monkeypatch, chunk, softcap, kernel):
    """Vocabulary chunks that do not divide the vocabulary, one chunk for all of it, Gemma 2's
    logit soft-capping, and logits spread far enough (h × 30) that exp underflows; with the
    compiled chunk logsumexp and with torch's."""
    monkeypatch.setenv("QPSA_KERNEL", kernel)
    model = load_model(str(write_tiny_gguf(tmp_path / "m.gguf", "llama"))).model
    model.config = dataclasses.replace(model.config, final_logit_softcap=softcap)
    monkeypatch.setattr(transformer, "HEAD_CHUNK", chunk)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, model.config.n_embd, generator=gen) * torch.tensor([1.0, 30.0])[:, None, None]
    targets = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    z = model.logits(h).double()
    expected = torch.logsumexp(z, -1) - z.gather(-1, targets[..., None])[..., 0]
    with torch.inference_mode():
        got = model.head_nll(h, targets)
    assert got.shape == (2, 9) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(model.head_nll(h, targets), token_nll_(model.logits(h), targets))  # autograd path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_inference_path_leaves_its_input_alone(tmp_path, arch):
    """The in-place work writes only into the layer's own buffers: the hidden state handed in
    (here an expanded view, as Q-PSA's evaluator passes) is unchanged."""
    model = load_model(str(write_tiny_gguf(tmp_path / "m.gguf", arch, n_layer=1))).model
    h = torch.randn(1, T, model.config.n_embd).expand(3, -1, -1)
    before = h.clone()
    with torch.inference_mode():
        out = model.block(0, h, torch.arange(T))
    assert torch.equal(h, before)
    torch.testing.assert_close(out, model.block(0, h, torch.arange(T)), atol=1e-5, rtol=1e-5)
