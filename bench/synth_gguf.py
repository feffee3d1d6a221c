"""Write a GGUF file of a real large model's shape with random quantized weights (issue 14, part 4).

    python bench/synth_gguf.py llama3-8b --type Q4_0     # -> /root/.cache/qpsa/synth/llama3-8b-Q4_0.gguf
    python bench/synth_gguf.py qwen2.5-0.5b --type Q4_0 --out FILE.gguf

Shapes (from the models' own config.json): Llama-3-8B (llama: 32 layers, 4096 wide, 32/8 heads of
128, FFN 14336, 128,256 tokens, separate output head) and Qwen2.5-0.5B (qwen2: 24 layers, 896
wide, 14/2 heads of 64, FFN 4864, 151,936 tokens, q/k/v biases, tied embeddings).

The weights are random *quantized blocks*, generated directly (random integer codes, random block
scales), so an 8B file takes ~a minute and never more than one tensor in memory: the writer gets
every tensor's header first and then the tensors one by one (gguf's GGUFWriter streaming API).
Scales are chosen so every matrix has standard deviation gain/sqrt(fan_in) and mean ~0 (gain 1 for
the layers' matrices: the residual stream grows by O(1) per layer, RMS norms keep every layer's
input at unit scale; gain 2 for the output head, so the logits spread by ~2 nats and the output
distribution is far from uniform but not collapsed). Norm weights are 1 ± 0.1, biases ±0.02.

Q4_K needs rows that are multiples of 256; a tensor whose rows are not (Qwen2.5-0.5B's 896-wide
matrices) is written as Q4_0 instead, as llama-quantize falls back to a legacy type there.

Tokenizer: SmolLM2's (the bundled `smollm2-135m`: GPT-2 BPE, 49,152 tokens), with the list padded
to the target vocabulary by unused tokens `<|synth_pad_N|>` (token type 5, UNUSED: neither
llama.cpp nor q-psa produce them from text), as real checkpoints pad their vocabularies.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qpsa.gguf.read import open_gguf  # noqa: E402
from qpsa.sources.catalog import resolve_model  # noqa: E402

SYNTH_DIR = Path("/root/.cache/qpsa/synth")
Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    vocab: int
    rope_base: float
    eps: float
    ctx: int
    tied: bool
    qkv_bias: bool


SHAPES = {
    "llama3-8b": Shape("llama", 32, 4096, 32, 8, 14336, 128256, 500000.0, 1e-5, 8192, tied=False, qkv_bias=False),
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 14, 2, 4864, 151936, 1000000.0, 1e-6, 32768, tied=True, qkv_bias=True),
}


def tensor_plan(s: Shape) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape in numpy order (rows, row length), standard deviation) of every tensor; std 0 marks a norm."""
    d = s.n_embd // s.n_head
    q, kv = s.n_head * d, s.n_head_kv * d
    out = [("token_embd.weight", (s.vocab, s.n_embd), (2.0 if s.tied else 1.0) / math.sqrt(s.n_embd))]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (s.n_embd,), 0.0)]
        for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            out.append((p + name + ".weight", (rows, s.n_embd), 1 / math.sqrt(s.n_embd)))
            if s.qkv_bias:
                out.append((p + name + ".bias", (rows,), -0.02))  # negative std: a float bias
        out += [
            (p + "attn_output.weight", (s.n_embd, q), 1 / math.sqrt(q)),
            (p + "ffn_norm.weight", (s.n_embd,), 0.0),
            (p + "ffn_gate.weight", (s.n_ff, s.n_embd), 1 / math.sqrt(s.n_embd)),
            (p + "ffn_up.weight", (s.n_ff, s.n_embd), 1 / math.sqrt(s.n_embd)),
            (p + "ffn_down.weight", (s.n_embd, s.n_ff), 1 / math.sqrt(s.n_ff)),
        ]
    out.append(("output_norm.weight", (s.n_embd,), 0.0))
    if not s.tied:
        out.append(("output.weight", (s.vocab, s.n_embd), 2.0 / math.sqrt(s.n_embd)))
    return out


def tensor_type(shape: tuple[int, ...], std: float, qtype: Q) -> Q:
    if std <= 0:
        return Q.F32
    if qtype == Q.Q4_K and shape[-1] % 256:
        return Q.Q4_0
    return qtype


UNIFORM_NIBBLE_STD = math.sqrt((16**2 - 1) / 12)  # std of a uniform integer in 0..15


def random_q4_0(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    """Q4_0 blocks (18 bytes: f16 d, 16 bytes of nibbles q; w = d·(q − 8)) with std(w) ≈ std. The codes'
    mean is −0.5, so d's sign is random per block: the matrix has mean ~0, not a rank-one offset."""
    sign = rng.choice(np.array([-1.0, 1.0]), n_blocks)
    d = (std / UNIFORM_NIBBLE_STD * rng.uniform(0.8, 1.2, n_blocks) * sign).astype(np.float16)
    out = np.empty((n_blocks, 18), dtype=np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(n_blocks, 2)
    out[:, 2:] = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
    return out


def random_q4_k(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    """Q4_K super-blocks (144 bytes: f16 d, f16 dmin, 12 scale bytes, 128 bytes of nibbles;
    w = d·sc·q − dmin·m per 32-weight sub-block). sc = m in 8..15 (only the low 4 bits of each
    6-bit field used, which makes the packing plain) and dmin = 7.5·d: the sub-block's codes are
    centred, w = d·sc·(q − 7.5), std(w) ≈ std."""
    sc = rng.integers(8, 16, (n_blocks, 8), dtype=np.uint8)
    d = (std / (UNIFORM_NIBBLE_STD * 11.5) * rng.uniform(0.9, 1.1, n_blocks)).astype(np.float16)
    dmin = (d.astype(np.float32) * 7.5).astype(np.float16)
    out = np.empty((n_blocks, 144), dtype=np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(n_blocks, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(n_blocks, 2)
    out[:, 4:8] = sc[:, :4]  # scales of sub-blocks 0..3 (6 bits; upper two zero)
    out[:, 8:12] = sc[:, :4]  # their mins (= the scales)
    out[:, 12:16] = sc[:, 4:] | (sc[:, 4:] << 4)  # sub-blocks 4..7: low 4 bits of scale | of min
    out[:, 16:] = rng.integers(0, 256, (n_blocks, 128), dtype=np.uint8)
    return out


def tensor_bytes(rng: np.random.Generator, shape, std: float, qtype: Q) -> np.ndarray:
    n = int(np.prod(shape))
    if qtype == Q.F32:
        if std == 0:  # a norm: 1 ± 0.1
            return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32).reshape(shape)
        return (abs(std) * rng.standard_normal(n)).astype(np.float32).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    make = {Q.Q4_0: random_q4_0, Q.Q4_K: random_q4_k}[qtype]
    out = np.empty((rows, shape[-1] // block * size), dtype=np.uint8)
    step = max(1, (1 << 22) // shape[-1])  # ~4M weights at a time: a few tens of MB of temporaries
    for r in range(0, rows, step):
        chunk = out[r : r + step]
        chunk[:] = make(rng, chunk.size // size, std).reshape(chunk.shape)
    return out


def tokenizer_metadata(vocab: int) -> list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """SmolLM2's tokenizer keys, the token list padded to `vocab` with unused tokens."""
    source = open_gguf(resolve_model("smollm2-135m"))
    items = []
    for key, value in source.metadata.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        vtype, etype = source.layout.value_types[key]
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            if len(value) > vocab:
                raise SystemExit(f"the tokenizer has {len(value)} tokens, more than the target vocabulary {vocab}")
            pad = vocab - len(value)
            value = list(value) + ([f"<|synth_pad_{i}|>" for i in range(pad)] if key.endswith("tokens") else [5] * pad)
        items.append((key, value, gguf.GGUFValueType(vtype), gguf.GGUFValueType(etype) if etype is not None else None))
    return items


def write_synthetic(shape_name: str, qtype: Q, out: Path, seed: int = 0) -> Path:
    s = SHAPES[shape_name]
    rng = np.random.default_rng(seed)
    plan = [(name, shp, std, tensor_type(shp, std, qtype)) for name, shp, std in tensor_plan(s)]
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(tmp, s.arch, use_temp_file=False)
    a = s.arch
    writer.add_string("general.name", f"synthetic {shape_name} {qtype.name}")
    writer.add_uint32(f"{a}.block_count", s.n_layer)
    writer.add_uint32(f"{a}.context_length", s.ctx)
    writer.add_uint32(f"{a}.embedding_length", s.n_embd)
    writer.add_uint32(f"{a}.feed_forward_length", s.n_ff)
    writer.add_uint32(f"{a}.attention.head_count", s.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    writer.add_float32(f"{a}.rope.freq_base", s.rope_base)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", s.eps)
    writer.add_uint32(f"{a}.vocab_size", s.vocab)
    writer.add_uint32(f"{a}.rope.dimension_count", s.n_embd // s.n_head)
    writer.add_uint32("general.file_type", {Q.Q4_0: 2, Q.Q4_K: 15}[qtype])
    writer.add_uint32("general.quantization_version", 2)
    for key, value, vtype, etype in tokenizer_metadata(s.vocab):
        writer.add_key_value(key, value, vtype, sub_type=etype)
    for name, shp, _, t in plan:
        if t == Q.F32:
            writer.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[t]
            byte_shape = (*shp[:-1], shp[-1] // block * size)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shp, std, t in plan:
        writer.write_tensor_data(tensor_bytes(rng, shp, std, t))
    writer.close()
    tmp.replace(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q4_K"])
    parser.add_argument("--out", help=f"output file (default {SYNTH_DIR}/SHAPE-TYPE.gguf)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else SYNTH_DIR / f"{args.shape}-{args.type}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_synthetic(args.shape, Q[args.type], out, args.seed)
    print(f"{out}: {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
