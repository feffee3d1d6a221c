"""Tiny random GGUF models for tests (a library: no tests in here).

    path = write_tiny_gguf(tmp_path / "tiny.gguf", "gemma3", qtype=GGMLQuantizationType.Q8_0)

writes a complete, loadable model of architecture "llama", "qwen2", "gemma3" or "qwen3moe" with every
metadata key the engine and transformers' GGUF loader read, random weights in GGUF layout
(llama's attn_q/attn_k are, as in llama.cpp files, in the layout of the "norm" rope: whoever
loads them for a rotate-half rope must un-permute them, as transformers does), and a small
tokenizer:

* llama, qwen2, qwen3moe: a `gpt2` byte-level BPE vocabulary (3 control tokens, GPT-2's 256 byte symbols,
  then tokens merged by `TINY_MERGES`), `tokenizer.ggml.pre` "smollm" / "qwen2".
* gemma3: a `llama` (sentencepiece) vocabulary: `<pad> <eos> <bos> <unk> <mask>`, `<0x00>`..`<0xFF>`,
  single characters and some `▁` pieces with scores; add_bos_token True, add_space_prefix False.

qwen3moe (Qwen3's mixture of experts): per-head q/k norms, a router `ffn_gate_inp` (F32, as llama-quantize
leaves it) and `n_expert` experts of width `n_ff_exp` stacked in 3-D tensors `ffn_{gate,up,down}_exps`,
`n_expert_used` per token; `expert_qtype` (default `qtype`) stores the experts in any type q-psa can
quantize, K-quants included (rows of 256: n_embd=256, n_ff_exp=256).

Any other `arch` string (e.g. "falcon") gets llama's tensors and tokenizer under that name, for
testing how unsupported architectures are refused.

The 2-D matrices (token_embd, output, attention and FFN weights) are stored in `qtype` (anything
`gguf.quants.quantize` can write: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; every row length is
a multiple of 32 with the default sizes). Norms and biases stay F32. Gemma3 norms hold 1 + noise,
as llama.cpp's converter stores them. K-quants (block 256) cannot be written: gguf-py has no
quantizer for them.

`**overrides` replace metadata: a key "general.*" or "tokenizer.*" is taken whole, any other is
prefixed with "{arch}." (`context_length=64`, `**{"attention.sliding_window": 4}`); the value
None removes the key; a `gguf.gguf_writer.GGUFValue` is written with its type (`GGUFValue(5,
GGUFValueType.UINT32)`; an array: `GGUFValue(ids, GGUFValueType.ARRAY, GGUFValueType.INT32)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.gguf_writer import GGUFValue
from gguf.quants import quantize

ARCHS = ("llama", "qwen2", "gemma3", "qwen3moe")

# Quantization types gguf-py can write (and so that tests can round-trip).
WRITABLE_QTYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
)

# -- tokenizers ---------------------------------------------------------------------------------

# byte-level BPE: control tokens first (ids 0, 1, 2), as in SmolLM2's vocabulary
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# merges in priority order, written in GPT-2's byte alphabet ("Ġ" is the space byte)
TINY_MERGES = [
    "h e", "l l", "he ll", "hell o",
    "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
    "Ġ t", "Ġt he",
    "i n", "Ġ in",
    "Ġ a", "a n", "an d", "Ġ and",
    "Ġ h", "Ġ hello",
    "e r", "o n", "a t", "e s",
    "1 2",  # llama.cpp's "smollm" and "qwen2" pre-tokenizers split digits apart, so it never applies
]


# English prose for tiny models' texts: enough tokens for a few windows of 64 with their byte-level vocabularies
PROSE = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine, and 42 apples fell. "
    "Perplexity measures how surprised a model is by a text; lower means better predictions. "
) * 30


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tiny byte-level vocabulary."""
    tokens = list(BPE_SPECIALS)
    types = [3] * len(tokens)  # CONTROL
    tokens += list(bytes_to_unicode().values())
    types += [1] * 256  # NORMAL
    have = set(tokens)
    for merge in TINY_MERGES:
        a, b = merge.split(" ")
        assert a in have and b in have, f"tiny BPE merge {merge!r} joins a piece that is not a token"
        if a + b not in have:
            tokens.append(a + b)
            types.append(1)
            have.add(a + b)
    return tokens, types, list(TINY_MERGES)


# ids 0..4, as in Gemma's vocabulary (transformers' GemmaTokenizer adds a "<mask>" where there is none)
SP_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
SP_CHARS = "▁abcdefghijklmnopqrstuvwxyzTHW,.!?'"
SP_PIECES = [
    "▁t", "he", "▁the", "▁h", "ll", "llo", "ello", "hello", "▁hello", "▁w", "or", "orl", "orld", "▁world",
    "in", "▁in", "an", "nd", "and", "▁and", "er", "on", "at", "es", "▁a", "▁s", "is", "▁is",
]


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of the tiny sentencepiece vocabulary."""
    tokens = list(SP_SPECIALS)
    types = [3, 3, 3, 2, 3]  # CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # BYTE
    tokens += list(SP_CHARS) + SP_PIECES
    types += [1] * (len(SP_CHARS) + len(SP_PIECES))
    assert len(set(tokens)) == len(tokens)
    # scores: pieces above single characters, earlier pieces first (transformers' Gemma builder
    # derives the merges from the file's order instead; both agree here)
    n = len(SP_SPECIALS) + 256
    scores = [0.0] * n + [-100.0 - i for i in range(len(SP_CHARS))] + [-float(i) for i in range(len(SP_PIECES))]
    return tokens, scores, types


# -- the model ----------------------------------------------------------------------------------


def write_tiny_gguf(
    path,
    arch: str,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    head_dim: int | None = None,
    vocab: int | None = None,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    seed: int = 0,
    identity_layer: int | None = None,
    tied: bool = True,
    std: float = 0.08,
    n_expert: int = 8,
    n_expert_used: int = 2,
    n_ff_exp: int = 64,
    expert_qtype: GGMLQuantizationType | None = None,
    **overrides,
) -> Path:
    """Write a tiny random model to `path` and return it (see the module docstring).

    head_dim: defaults to n_embd // n_head, except gemma3 where it is 32 (≠ 64 // 4).
    vocab: the number of token_embd rows; defaults to the tokenizer's size (else it must be at
        least that; extra rows are unnamed padding tokens).
    identity_layer: that layer's attn_output and ffn_down are zero, so it leaves the residual
        stream unchanged.
    tied: False writes a separate output.weight.
    std: the scale of most matrices (q/k use 0.2 so that attention is far from uniform, the
        embeddings 0.5, or 0.1 for gemma3, which multiplies them by sqrt(n_embd)).
    """
    path = Path(path)
    qtype = GGMLQuantizationType(qtype)
    moe = arch == "qwen3moe"
    expert_qtype = qtype if expert_qtype is None else GGMLQuantizationType(expert_qtype)
    rng = np.random.default_rng(seed)
    gemma = arch == "gemma3"
    if head_dim is None:
        head_dim = 32 if gemma else n_embd // n_head
    if qtype not in WRITABLE_QTYPES:
        raise ValueError(f"gguf-py cannot quantize to {qtype.name}; writable: {[q.name for q in WRITABLE_QTYPES]}")
    block = GGML_QUANT_SIZES[qtype][0]
    for width in (n_embd, n_head * head_dim, *((n_ff_exp,) if moe else (n_ff,))):
        if width % block:
            raise ValueError(f"{qtype.name} needs row lengths that are multiples of {block}; got {width}")

    # tokenizer
    md: dict[str, tuple[object, GGUFValueType | None]] = {}
    if gemma:
        tokens, scores, types = sentencepiece_vocab()
        md["tokenizer.ggml.model"] = ("llama", GGUFValueType.STRING)
        md["tokenizer.ggml.pre"] = ("default", GGUFValueType.STRING)
        md["tokenizer.ggml.scores"] = (scores, GGUFValueType.FLOAT32)
        md["tokenizer.ggml.bos_token_id"] = (2, GGUFValueType.UINT32)
        md["tokenizer.ggml.eos_token_id"] = (1, GGUFValueType.UINT32)
        md["tokenizer.ggml.unknown_token_id"] = (3, GGUFValueType.UINT32)
        md["tokenizer.ggml.padding_token_id"] = (0, GGUFValueType.UINT32)
        md["tokenizer.ggml.add_bos_token"] = (True, GGUFValueType.BOOL)
        md["tokenizer.ggml.add_eos_token"] = (False, GGUFValueType.BOOL)
        md["tokenizer.ggml.add_space_prefix"] = (False, GGUFValueType.BOOL)  # as Gemma's files say
    else:
        tokens, types, merges = bpe_vocab()
        md["tokenizer.ggml.model"] = ("gpt2", GGUFValueType.STRING)
        md["tokenizer.ggml.pre"] = ("qwen2" if arch in ("qwen2", "qwen3moe") else "smollm", GGUFValueType.STRING)
        md["tokenizer.ggml.merges"] = (merges, GGUFValueType.STRING)
        bos, eos = (0, 0) if arch in ("qwen2", "qwen3moe") else (1, 2)
        md["tokenizer.ggml.bos_token_id"] = (bos, GGUFValueType.UINT32)
        md["tokenizer.ggml.eos_token_id"] = (eos, GGUFValueType.UINT32)
        md["tokenizer.ggml.padding_token_id"] = (0, GGUFValueType.UINT32)
        md["tokenizer.ggml.add_bos_token"] = (False, GGUFValueType.BOOL)
    md["tokenizer.ggml.tokens"] = (tokens, GGUFValueType.STRING)
    md["tokenizer.ggml.token_type"] = (types, GGUFValueType.INT32)
    n_vocab = len(tokens) if vocab is None else vocab
    if n_vocab < len(tokens):
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer ({len(tokens)} tokens)")

    # hyperparameters
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    md[f"{arch}.context_length"] = (256, u32)
    md[f"{arch}.embedding_length"] = (n_embd, u32)
    md[f"{arch}.block_count"] = (n_layer, u32)
    md[f"{arch}.feed_forward_length"] = (n_ff, u32)
    md[f"{arch}.attention.head_count"] = (n_head, u32)
    md[f"{arch}.attention.head_count_kv"] = (n_head_kv, u32)
    md[f"{arch}.attention.layer_norm_rms_epsilon"] = (1e-6 if gemma else 1e-5, f32)
    md[f"{arch}.rope.freq_base"] = (1_000_000.0 if arch in ("gemma3", "qwen2", "qwen3moe") else 10_000.0, f32)
    if moe:
        md[f"{arch}.expert_count"] = (n_expert, u32)
        md[f"{arch}.expert_used_count"] = (n_expert_used, u32)
        md[f"{arch}.expert_feed_forward_length"] = (n_ff_exp, u32)
        md[f"{arch}.attention.key_length"] = (head_dim, u32)
        md[f"{arch}.attention.value_length"] = (head_dim, u32)
    if gemma:
        md[f"{arch}.attention.key_length"] = (head_dim, u32)
        md[f"{arch}.attention.value_length"] = (head_dim, u32)
        md[f"{arch}.attention.sliding_window"] = (8, u32)
    else:
        md[f"{arch}.rope.dimension_count"] = (head_dim, u32)
    md["general.name"] = ("tiny", GGUFValueType.STRING)
    md["general.file_type"] = (1 if qtype == GGMLQuantizationType.F16 else 0, u32)

    for key, value in overrides.items():
        full = key if key.split(".")[0] in ("general", "tokenizer") else f"{arch}.{key}"
        if value is None:
            md.pop(full, None)
        elif isinstance(value, GGUFValue):  # a value with its GGUF type (for arrays: the element type)
            md[full] = (value.value, value.sub_type or value.type)
        else:
            md[full] = (value, None)

    # tensors, in numpy order (rows, row length)
    q, kv = n_head * head_dim, n_head_kv * head_dim

    def matrix(rows, cols, scale=std):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n):  # near 1 for every arch (gemma3's GGUF norms hold 1 + w: this is that sum)
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    tensors: dict[str, np.ndarray] = {"token_embd.weight": matrix(n_vocab, n_embd, 0.1 if gemma else 0.5)}
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = norm(n_embd)
        tensors[p + "attn_q.weight"] = matrix(q, n_embd, 0.2)
        tensors[p + "attn_k.weight"] = matrix(kv, n_embd, 0.2)
        tensors[p + "attn_v.weight"] = matrix(kv, n_embd)
        if arch == "qwen2":
            tensors[p + "attn_q.bias"] = matrix(1, q, 0.1)[0]
            tensors[p + "attn_k.bias"] = matrix(1, kv, 0.1)[0]
            tensors[p + "attn_v.bias"] = matrix(1, kv, 0.1)[0]
        tensors[p + "attn_output.weight"] = matrix(n_embd, q)
        tensors[p + "ffn_norm.weight"] = norm(n_embd)
        if moe:  # a router with spread-out logits, so that routing differs from token to token
            tensors[p + "ffn_gate_inp.weight"] = matrix(n_expert, n_embd, 0.3)
            tensors[p + "ffn_gate_exps.weight"] = np.stack([matrix(n_ff_exp, n_embd) for _ in range(n_expert)])
            tensors[p + "ffn_up_exps.weight"] = np.stack([matrix(n_ff_exp, n_embd) for _ in range(n_expert)])
            tensors[p + "ffn_down_exps.weight"] = np.stack([matrix(n_embd, n_ff_exp) for _ in range(n_expert)])
        else:
            tensors[p + "ffn_gate.weight"] = matrix(n_ff, n_embd)
            tensors[p + "ffn_up.weight"] = matrix(n_ff, n_embd)
            tensors[p + "ffn_down.weight"] = matrix(n_embd, n_ff)
        if gemma or moe:
            tensors[p + "attn_q_norm.weight"] = norm(head_dim)
            tensors[p + "attn_k_norm.weight"] = norm(head_dim)
        if gemma:
            tensors[p + "post_attention_norm.weight"] = norm(n_embd)
            tensors[p + "post_ffw_norm.weight"] = norm(n_embd)
        if i == identity_layer:
            tensors[p + "attn_output.weight"][:] = 0
            tensors[p + ("ffn_down_exps.weight" if moe else "ffn_down.weight")][:] = 0
    tensors["output_norm.weight"] = norm(n_embd)
    if not tied:
        tensors["output.weight"] = matrix(n_vocab, n_embd, 0.1)

    writer = GGUFWriter(path, arch)
    for key, (value, vtype) in md.items():
        if key == "general.architecture":
            continue
        if isinstance(value, (list, tuple)):
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(key, value, vtype or GGUFValueType.get_type(value))
    for name, data in tensors.items():
        target = expert_qtype if "_exps." in name else qtype
        if data.ndim >= 2 and target != GGMLQuantizationType.F32 and "ffn_gate_inp" not in name:
            if target in WRITABLE_QTYPES:
                writer.add_tensor(name, quantize(data, target), raw_dtype=target)
            else:  # K-quants: q-psa's own quantizer (gguf-py has none)
                from qpsa.gguf.quants import quantize as qpsa_quantize

                writer.add_tensor(name, qpsa_quantize(data, target), raw_dtype=target)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wide_gguf(path, n_layer: int = 3):
    """A tiny llama in F32 whose rows are 256 wide, so the K-quants fit, with a separate output head."""
    return write_tiny_gguf(path, "llama", n_layer=n_layer, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, tied=False)
