"""llama-quantize's presets (its "types" Q4_K_M, Q3_K_S, Q4_0, …) and the rules by which each one
gives a tensor a type (llama.cpp b11434, src/llama-quant.cpp; tools/quantize/quantize.cpp).

    preset = find_preset("q4_k")                       # llama-quantize's alias of Q4_K_M
    mixture = Mixture(preset, ModelFacts.of(gguf_file))
    for name in llama_quantize_order(gguf_file.tensors):   # the rules count tensors in this order
        type_name = mixture.type_for(name, row_length)   # "Q6_K": the rules' choice, before any fallback

This module knows llama-quantize only; which of these types q-psa can write, the overrides
(--tensor-type, --pure, …) and the fallbacks are applied in `qpsa.quant.requantize.choose_types`.

A preset is a file type (`general.file_type`, llama.cpp's LLAMA_FTYPE_MOSTLY_*), a base type every
weight matrix starts from, and rules that raise some matrices above it, in plain words:

* the output head (`output.weight`, or `token_embd.weight` where the head is tied to it): Q6_K, or
  Q8_0 when the preset is Q8_0, the arch is falcon, or the base type's blocks do not divide the row;
* attn_v (and attn_qkv, attn_kv_b), counted in layer order as i of n: Q2_K -> Q4_K where the model
  has 4 or more query heads per KV head (GQA), else Q3_K; Q2_K_S -> Q4_K with GQA >= 4;
  Q3_K_M -> Q5_K for the first two, Q4_K after; Q3_K_L -> Q5_K; Q4_K_M, Q5_K_M -> Q6_K where
  `use_more_bits(i, n)`; Q4_K_S -> Q5_K for the first four. Then a 70B llama/qwen2 lifts Q3_K/Q4_K
  to Q5_K, and a model with 8 experts takes Q8_0;
* ffn_down of layer i of n (n = block_count; i counted in layer order, or read from the name in a
  mixture-of-experts model): Q2_K -> Q3_K; Q2_K_S -> Q4_K for i < n/8; Q3_K_M -> Q5_K for
  i < n/16, else Q4_K (falcon: Q4_K only where use_more_bits); Q3_K_L -> Q5_K (falcon Q4_K);
  Q4_K_M -> Q6_K where use_more_bits (falcon: Q6_K for i < n/16, Q5_K where use_more_bits);
  Q5_K_M -> Q6_K where use_more_bits; Q4_K_S -> Q5_K for i < n/8 (not falcon); and, only with an
  importance matrix, Q4_0 -> Q4_1 and Q5_0 -> Q5_1 for i < n/8;
* attn_output: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K; with 8 experts Q5_K for Q2_K, Q3_K_S,
  Q3_K_M, Q4_K_S and Q4_K_M; falcon: Q3_K_L -> Q4_K;
* attn_k: Q8_0 in a model with 8 experts;
* everything else: the base type.

`use_more_bits(i, n)` is true for the first eighth of the layers, the last eighth, and every third
layer in between: i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division), so with 30 layers
it picks 0-2, 5, 8, 11, 14, 17, 20, 23, 26-29.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qpsa.errors import QpsaError


@dataclass(frozen=True)
class Preset:
    name: str  # as llama-quantize spells it: "Q4_K_M"
    file_type: int  # general.file_type, llama.cpp's LLAMA_FTYPE_MOSTLY_*
    base: str  # the type every weight matrix starts from (a ggml type name)
    alias_of: str | None = None  # "Q4_K" is llama-quantize's alias of "Q4_K_M"
    uniform: bool = False  # q-psa's own: the base type everywhere but the head, no mixture rules


# llama-quantize's table of names, in its order (tools/quantize/quantize.cpp): name, file type, base type.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("Q1_0", 40, "Q1_0"), Preset("Q2_0", 41, "Q2_0"),
    Preset("Q4_0", 2, "Q4_0"), Preset("Q4_1", 3, "Q4_1"), Preset("MXFP4_MOE", 38, "MXFP4"),
    Preset("Q5_0", 8, "Q5_0"), Preset("Q5_1", 9, "Q5_1"),
    Preset("IQ2_XXS", 19, "IQ2_XXS"), Preset("IQ2_XS", 20, "IQ2_XS"), Preset("IQ2_S", 28, "IQ2_XS"),
    Preset("IQ2_M", 29, "IQ2_S"), Preset("IQ1_S", 24, "IQ1_S"), Preset("IQ1_M", 31, "IQ1_M"),
    Preset("TQ1_0", 36, "TQ1_0"), Preset("TQ2_0", 37, "TQ2_0"),
    Preset("Q2_K", 10, "Q2_K"), Preset("Q2_K_S", 21, "Q2_K"),
    Preset("IQ3_XXS", 23, "IQ3_XXS"), Preset("IQ3_S", 26, "IQ3_S"), Preset("IQ3_M", 27, "IQ3_S"),
    Preset("Q3_K", 12, "Q3_K", alias_of="Q3_K_M"), Preset("IQ3_XS", 22, "IQ3_S"),
    Preset("Q3_K_S", 11, "Q3_K"), Preset("Q3_K_M", 12, "Q3_K"), Preset("Q3_K_L", 13, "Q3_K"),
    Preset("IQ4_NL", 25, "IQ4_NL"), Preset("IQ4_XS", 30, "IQ4_XS"),
    Preset("Q4_K", 15, "Q4_K", alias_of="Q4_K_M"), Preset("Q4_K_S", 14, "Q4_K"), Preset("Q4_K_M", 15, "Q4_K"),
    Preset("Q5_K", 17, "Q5_K", alias_of="Q5_K_M"), Preset("Q5_K_S", 16, "Q5_K"), Preset("Q5_K_M", 17, "Q5_K"),
    Preset("Q6_K", 18, "Q6_K"), Preset("Q8_0", 7, "Q8_0"),
    Preset("F16", 1, "F16"), Preset("BF16", 32, "BF16"), Preset("F32", 0, "F32"),
)}
_FLOAT = ("F32", "F16", "BF16")
# The tensors whose Q2_K llama-quantize refuses to write without an importance matrix: all but the
# embedding and the head, in a Q2_K_S file (the IQ1/IQ2/IQ3_XXS types need one too; q-psa writes none).
NEEDS_IMATRIX = {"Q2_K_S": "Q2_K"}


def find_preset(name: str) -> Preset:
    """llama-quantize's preset of that name (any case) or file-type number, an alias resolved
    ("Q4_K" -> Q4_K_M); else a one-line error listing the names."""
    key = name.strip().upper()
    if key.isdigit():
        key = next((p.name for p in PRESETS.values() if p.file_type == int(key) and not p.alias_of), key)
    if key not in PRESETS:
        raise QpsaError(f"unknown type {name!r}; llama-quantize's types are {', '.join(PRESETS)}")
    preset = PRESETS[key]
    return PRESETS[preset.alias_of] if preset.alias_of else preset


@dataclass(frozen=True)
class ModelFacts:
    """What llama-quantize's rules read from a model, besides tensor names and row lengths."""

    arch: str
    n_layer: int  # block_count
    n_gqa: int  # query heads per KV head in layer 0 (0 when the model has no KV heads)
    n_expert: int  # 0 without experts
    is_70b: bool  # llama.cpp's model type 70B: a llama with 80 layers and GQA, or a qwen2 with 80 layers
    tied: bool  # no output.weight: token_embd.weight is the head
    n_attention_wv: int  # tensors whose rules are attn_v's

    @classmethod
    def of(cls, gguf_file) -> ModelFacts:
        md, arch = gguf_file.metadata, gguf_file.arch or ""

        def first(key, default):
            value = md.get(f"{arch}.{key}", default)  # a per-layer array: layer 0's, as llama.cpp reads it
            return int(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)

        n_layer = first("block_count", 0)
        n_head = first("attention.head_count", 0)
        n_head_kv = first("attention.head_count_kv", n_head)
        n_expert = first("expert_count", 0)
        is_70b = n_layer == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))
        return cls(arch, n_layer, n_head // n_head_kv if n_head_kv else 0, n_expert if n_expert > 1 else 0,
                   is_70b, "output.weight" not in gguf_file.tensors,
                   sum(category(n) == "attn_v" for n in gguf_file.tensors))


def category(name: str) -> str:
    """llama-quantize's broad role of a tensor, by name: output, token_embd, attn_v (attn_qkv and
    attn_kv_b share its rules), attn_k, attn_q, attn_output, ffn_up, ffn_gate, ffn_down, other."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, role in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                       ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                       ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                       ("ffn_down", "ffn_down")):
        if part in name:
            return role
    return "other"


def layer_of(name: str) -> int | None:
    """N of a name "blk.N.…", else None."""
    m = re.match(r"blk\.([+-]?\d+)", name)
    return int(m.group(1)) if m else None


def llama_quantize_order(names: Iterable[str]) -> list[str]:
    """The order llama-quantize visits tensors in: by layer (tensors outside layers first), then name."""
    return sorted(names, key=lambda n: (-1 if layer_of(n) is None else layer_of(n), n))


def use_more_bits(i: int, n: int) -> bool:
    """The layers the K-quant mixtures give more bits: first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class Mixture:
    """A preset's per-tensor rules on one model. `type_for` counts the tensors it is asked about
    (attn_v and ffn_down by their order), so ask it in `llama_quantize_order`, and only about the
    tensors llama-quantize applies its rules to: quantizable, no --tensor-type match, not --pure,
    not set by --output-tensor-type or --token-embedding-type, and a quantized base type."""

    def __init__(self, preset: Preset, facts: ModelFacts, has_imatrix: bool = False,
                 output_type: str | None = None):
        self.preset, self.facts, self.has_imatrix, self.output_type = preset, facts, has_imatrix, output_type
        self.i_attention_wv = self.i_ffn_down = 0

    def type_for(self, name: str, row: int) -> str:
        """The type name the rules give tensor `name` (rows of `row` weights), before any fallback."""
        p, f, role = self.preset.name, self.facts, category(name)
        base = self.preset.base
        if role == "output" or (f.tied and role == "token_embd"):
            if self.output_type is not None:  # --output-tensor-type, for a head tied to the embedding
                return self.output_type
            if f.arch == "falcon" or row % GGML_QUANT_SIZES[GGMLQuantizationType[base]][0]:
                return "Q8_0"
            return base if base == "Q8_0" else "Q6_K"
        if self.preset.uniform:
            return base
        if role == "attn_v":
            return self._attn_v(p, f, base)
        if role == "attn_k":
            return "Q8_0" if f.n_expert == 8 else base
        if role == "ffn_down":
            return self._ffn_down(p, f, base, name)
        if role == "attn_output":
            if f.arch == "falcon":
                return "Q4_K" if p == "Q3_K_L" else base
            if f.n_expert == 8:
                return "Q5_K" if p in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else base
            return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(p, base)
        return base

    def _attn_v(self, p: str, f: ModelFacts, new: str) -> str:
        i, n = self.i_attention_wv, f.n_attention_wv
        self.i_attention_wv += 1
        if p == "Q2_K":
            new = "Q4_K" if f.n_gqa >= 4 else "Q3_K"
        elif p == "Q2_K_S" and f.n_gqa >= 4:
            new = "Q4_K"
        elif p == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif p == "Q3_K_L":
            new = "Q5_K"
        elif p in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = "Q6_K"
        elif p == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if f.is_70b and new in ("Q3_K", "Q4_K"):  # 8 heads share attn_v: more bits cost little
            new = "Q5_K"
        return "Q8_0" if f.n_expert == 8 else new

    def _ffn_down(self, p: str, f: ModelFacts, new: str, name: str) -> str:
        i, n = self.i_ffn_down, f.n_layer
        self.i_ffn_down += 1
        if f.n_expert > 1:  # experts' tensors are not in layer order: read the layer from the name
            i = layer_of(name)
            if i is None or not 0 <= i < n:
                raise QpsaError(f"{name}: cannot tell its layer (0 to {n - 1}), which llama-quantize's rules need")
        falcon = f.arch == "falcon"
        if p == "Q2_K":
            return "Q3_K"
        if p == "Q2_K_S":
            return "Q4_K" if i < n // 8 else new
        if p == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K" if not falcon or use_more_bits(i, n) else "Q3_K"
        if p == "Q3_K_L":
            return "Q4_K" if falcon else "Q5_K"
        if p == "Q4_K_M":
            if falcon:
                return "Q6_K" if i < n // 16 else "Q5_K" if use_more_bits(i, n) else "Q4_K"
            return "Q6_K" if use_more_bits(i, n) else new
        if p == "Q5_K_M" and use_more_bits(i, n):
            return "Q6_K"
        if p == "Q4_K_S" and not falcon and i < n // 8:
            return "Q5_K"
        if p in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:
            return "Q4_1" if p == "Q4_0" else "Q5_1"
        return new


def is_float(type_name: str) -> bool:
    """F32, F16, BF16: llama-quantize applies no rule, override or fallback to a preset of these."""
    return type_name in _FLOAT
