"""Re-encoding a GGUF model's weights into other quantization types, on disk or in memory.

    choices = choose_types(gguf_file, "Q4_0")                      # which type each tensor gets, and why
    write_requantized(gguf_file, choices, "model-q4_0.gguf")      # a GGUF that llama.cpp and q-psa load
    loaded_q4 = requantize_model(loaded, "Q4_0")                  # the same weights, in memory only

Type choice follows llama-quantize without an importance matrix (src/llama-quant.cpp), so
`q-psa requantize m.gguf --type Q4_0` and `llama-quantize --allow-requantize m.gguf Q4_0` pick the
same type for every tensor:

* Only tensors llama-quantize quantizes change: 2-D or larger, name ending in "weight", not a
  norm, not an expert router or position/token-type embedding. The rest are copied.
* The output head (`output.weight`, or `token_embd.weight` where the head is tied to it) gets
  Q6_K, or Q8_0 when the type is Q8_0 or its rows do not fit Q6_K's 256-weight blocks, unless
  `output_type` says otherwise. `pure=True` gives every tensor the one type instead.
* `overrides` are llama-quantize's `--tensor-type REGEX=TYPE`: the first regex found anywhere in
  the tensor's name (Python `re.search`) sets its type, and the output-head rule no longer applies.
* A tensor whose type is unchanged is copied byte for byte (llama-quantize does the same).
* The K-quant presets' per-layer bumps (Q4_K_M's Q6_K attn_v and ffn_down in some layers) are not
  applied: `--type Q4_K` is Q4_K everywhere but the head. Use `q-psa plan` for a measured mixture.

A type whose block does not divide a tensor's row length (K-quants need multiples of 256) is an
error naming the tensor, unless `fallback=True`, which takes llama-quantize's fallback types:
Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and F16 where even those do not fit.

With an importance matrix (`imatrix`, a `qpsa.quant.imatrix.Imatrix` checked against the model),
every tensor that has an entry is quantized with its weights (in_sum2 / count per column, per expert
for 3-D tensors), as llama-quantize --imatrix does; a tensor without an entry (the token embedding,
the output head) is quantized without. The one type choice an imatrix changes for the types q-psa
writes: with `Q4_0` (`Q5_0`), ffn_down of the first n_layer/8 layers gets Q4_1 (Q5_1), unless `pure`
or an override names it. (The types llama-quantize refuses without an imatrix, IQ1/IQ2/IQ3_XXS, and
Q2_K within a Q2_K_S mixture, are not types q-psa writes.) The output records the file as
llama-quantize does (`quantize.imatrix.file`, `.dataset`, `.entries_count`, `.chunks_count`) and its
sha256 (`quantize.imatrix.sha256`, q-psa's addition).

Requantizing an already quantized model dequantizes its weights exactly and quantizes those
values: the result carries both quantization errors (Q4_1 -> Q8_0 is not Q8_0 of the original
float weights), as with llama-quantize --allow-requantize.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qpsa.errors import QpsaError
from qpsa.gguf.read import GGUFFile
from qpsa.progress import Advance, no_progress

if TYPE_CHECKING:
    from qpsa.quant.imatrix import Imatrix

Q = GGMLQuantizationType

# The types q-psa can write, from most to fewest bits per weight.
WRITABLE = (Q.F32, Q.BF16, Q.F16, Q.Q8_0, Q.Q6_K, Q.Q5_1, Q.Q5_K, Q.Q5_0, Q.Q4_1, Q.Q4_K, Q.Q4_0, Q.Q3_K, Q.Q2_K)
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# general.file_type written for each base type (llama.cpp's LLAMA_FTYPE_MOSTLY_*)
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
}
_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight")


def qtype_named(name: str) -> GGMLQuantizationType:
    """'q4_k' -> Q4_K; anything q-psa cannot write is a one-line error listing what it can."""
    try:
        qtype = Q[name.strip().upper()]
    except KeyError:
        qtype = None
    if qtype not in WRITABLE:
        raise QpsaError(f"unknown or unsupported type {name!r}; q-psa writes {', '.join(t.name for t in WRITABLE)}")
    return qtype


def parse_tensor_type(spec: str) -> tuple[str, GGMLQuantizationType]:
    """llama-quantize's --tensor-type syntax, REGEX=TYPE -> (regex, type)."""
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise QpsaError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'ffn_down=q6_k'")
    try:
        re.compile(pattern)
    except re.error as e:
        raise QpsaError(f"--tensor-type {spec!r}: bad regular expression: {e}") from None
    return pattern, qtype_named(type_name)


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


@dataclass
class TensorChoice:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, row length)
    source: GGMLQuantizationType
    target: GGMLQuantizationType
    why: str  # "type", "output head", "override REGEX", "fallback from Q4_K", "not quantized", ...

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.target]
        return self.n_elements // block * size

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "source": self.source.name,
                "target": self.target.name, "why": self.why, "bytes": self.n_bytes}


def is_quantizable(name: str, shape: Sequence[int]) -> bool:
    """Would llama-quantize quantize this tensor? (2-D+, a weight, not a norm/router/position table)."""
    return len(shape) >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)


def choose_types(
    gguf_file: GGUFFile,
    base: str | GGMLQuantizationType,
    overrides: Sequence[tuple[str, GGMLQuantizationType]] = (),
    output_type: GGMLQuantizationType | None = None,
    token_embedding_type: GGMLQuantizationType | None = None,
    pure: bool = False,
    fallback: bool = False,
    imatrix: Imatrix | None = None,
) -> list[TensorChoice]:
    """The type of every tensor of `gguf_file`, by the rules in this module's docstring; QpsaError for an
    `imatrix` that does not fit the model (`Imatrix.check_against`)."""
    base = qtype_named(base) if isinstance(base, str) else base
    if imatrix is not None:
        imatrix.check_against(gguf_file)
    tied = "output.weight" not in gguf_file.tensors
    ffn_down = []  # indices of the ffn_down choices llama-quantize may move up with an imatrix
    choices = []
    for name, t in gguf_file.tensors.items():
        if not is_quantizable(name, t.shape):
            choices.append(TensorChoice(name, t.shape, t.qtype, t.qtype, "not quantized"))
            continue
        is_head = name == "output.weight" or (tied and name == "token_embd.weight")
        target, why, explicit = base, "type", True
        if token_embedding_type is not None and name == "token_embd.weight":
            target, why = token_embedding_type, "--token-embedding-type"
        elif output_type is not None and is_head:
            target, why = output_type, "--output-tensor-type"
        else:
            for pattern, qtype in overrides:
                if re.search(pattern, name):
                    target, why = qtype, f"override {pattern}"
                    break
            else:
                if is_head and not pure and base not in (Q.F32, Q.F16, Q.BF16):
                    target, why, explicit = _head_type(base, t.shape[-1]), "output head", False
                elif imatrix is not None and not pure and "ffn_down" in name:
                    ffn_down.append(len(choices))
        target, why = _fit(name, t.shape[-1], target, why, fallback or not explicit)
        choices.append(TensorChoice(name, t.shape, t.qtype, target, why))
    if base in IMATRIX_FFN_DOWN:
        _imatrix_ffn_down(gguf_file, choices, ffn_down, IMATRIX_FFN_DOWN[base])
    return choices


# llama-quantize with an imatrix: ffn_down of the first n_layer/8 layers one type up (llama_tensor_get_type_impl)
IMATRIX_FFN_DOWN = {Q.Q4_0: Q.Q4_1, Q.Q5_0: Q.Q5_1}


def _imatrix_ffn_down(gguf_file: GGUFFile, choices: list[TensorChoice], indices: list[int], up) -> None:
    """Move ffn_down of layers < n_layer/8 to `up`, where layer is llama-quantize's: the tensor's rank
    among the ffn_down tensors in its order (blk.N, then name), or its blk.N in an expert model."""
    arch = gguf_file.metadata.get("general.architecture", "")
    n_layer = int(gguf_file.metadata.get(f"{arch}.block_count", 0))
    by_name = int(gguf_file.metadata.get(f"{arch}.expert_count", 0) or 0) > 1
    ordered = sorted(indices, key=lambda i: (_block_number(choices[i].name), choices[i].name))
    for rank, i in enumerate(ordered):
        layer = max(_block_number(choices[i].name), 0) if by_name else rank
        if layer < n_layer // 8 and choices[i].why == "type":  # (a fallback type stays: up has the same blocks)
            choices[i] = dataclasses.replace(choices[i], target=up,
                                             why=f"imatrix: ffn_down of layer {layer} < {n_layer}/8")


def _block_number(name: str) -> int:
    """N of a blk.N. name, -1 for other names (llama.cpp's weight order puts them first)."""
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _head_type(base: GGMLQuantizationType, row: int) -> GGMLQuantizationType:
    """llama-quantize's default for the output head: Q6_K, Q8_0 if the type is Q8_0 or rows do not fit."""
    if row % GGML_QUANT_SIZES[base][0] or base == Q.Q8_0:
        return Q.Q8_0
    return Q.Q6_K


def _fit(name: str, row: int, target, why: str, fallback: bool):
    block = GGML_QUANT_SIZES[target][0]
    if row % block == 0:
        return target, why
    if not fallback:
        raise QpsaError(
            f"{name}: {target.name} cannot encode rows of {row} weights (its blocks hold {block}); "
            f"choose another type, or --fallback for llama-quantize's fallback types"
        )
    new = FALLBACK.get(target, Q.F16)
    if row % GGML_QUANT_SIZES[new][0]:
        new = Q.F16
    return new, f"{why}, fallback from {target.name}"


def size_summary(choices: Sequence[TensorChoice]) -> dict:
    """Counts per type, total bytes of tensor data and bits per weight over all tensors."""
    n_bytes = sum(c.n_bytes for c in choices)
    n_elements = sum(c.n_elements for c in choices)
    by_type = Counter(c.target.name for c in choices)
    changed = sum(c.target != c.source for c in choices)
    return {"tensors": len(choices), "changed": changed, "by_type": dict(by_type.most_common()),
            "tensor_bytes": n_bytes, "bits_per_weight": 8.0 * n_bytes / n_elements}


def requantized_tensors(
    gguf_file: GGUFFile, choices: Sequence[TensorChoice], advance: Advance = no_progress, imatrix: Imatrix | None = None
) -> Iterator[tuple[str, GGMLQuantizationType, tuple[int, ...], np.ndarray]]:
    """(name, type, shape, raw bytes) of every tensor in its chosen type; unchanged ones are the file's bytes.
    With an `imatrix`, a tensor that has an entry is quantized with its weights, one row of them per matrix."""
    from qpsa.gguf.quants import quantize

    for c in choices:
        t = gguf_file.tensors[c.name]
        if c.target == t.qtype:
            raw = t.raw
        else:
            values = t.to_torch().numpy()
            n = values.shape[-1]
            if imatrix is not None and c.name in imatrix.in_sum2:
                weights = imatrix.mean(c.name).reshape(-1, n)  # (n_mat, n): experts of a 3-D tensor, else one
                matrices = values.reshape(len(weights), -1, n)  # (n_mat, rows, n)
                raw = np.concatenate([quantize(m, c.target, w).reshape(-1) for m, w in zip(matrices, weights)])
            else:
                raw = quantize(values.reshape(-1, n), c.target).reshape(-1)
        advance(c.name)
        yield c.name, c.target, c.shape, raw


def write_requantized(
    gguf_file: GGUFFile, choices: Sequence[TensorChoice], out: str | os.PathLike,
    advance: Advance = no_progress, imatrix: Imatrix | None = None,
) -> Path:
    """Write the model with every tensor in its chosen type (metadata copied, file type updated); with an
    `imatrix`, quantized with its weights and recorded in the metadata (module docstring)."""
    from qpsa.gguf.write import check_output_path, write_gguf

    out = check_output_path(out, gguf_file.path)
    metadata = dict(gguf_file.metadata)
    types = dict(gguf_file.layout.value_types)
    base = _base_type(choices)
    if base in FILE_TYPES:
        metadata["general.file_type"] = int(FILE_TYPES[base])
        types["general.file_type"] = (gguf.GGUFValueType.UINT32, None)
    if any(qtype not in (Q.F32, Q.F16, Q.BF16) for qtype in (c.target for c in choices)):
        metadata["general.quantization_version"] = gguf.GGML_QUANT_VERSION
        types["general.quantization_version"] = (gguf.GGUFValueType.UINT32, None)
    if imatrix is not None:
        for key, (value, value_type) in imatrix_metadata(imatrix).items():
            metadata[key] = value
            types[key] = (value_type, None)
    return write_gguf(gguf_file, metadata, types, requantized_tensors(gguf_file, choices, advance, imatrix), out)


def imatrix_metadata(imatrix: Imatrix) -> dict[str, tuple[object, gguf.GGUFValueType]]:
    """The keys llama-quantize --imatrix writes (the file as given and the first dataset, each cut at 127
    bytes; the number of entries; the chunk count when known), and the file's sha256."""
    from qpsa.gguf.read import file_sha256

    def cut(text: str) -> str:
        return text.encode("utf-8")[:127].decode("utf-8", errors="ignore")

    string, uint32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    keys = {"quantize.imatrix.file": (cut(str(imatrix.path)), string)}
    if imatrix.datasets:
        keys["quantize.imatrix.dataset"] = (cut(imatrix.datasets[0]), string)
    keys["quantize.imatrix.entries_count"] = (len(imatrix.in_sum2), uint32)
    if imatrix.chunk_count > 0:
        keys["quantize.imatrix.chunks_count"] = (imatrix.chunk_count, uint32)
    keys["quantize.imatrix.sha256"] = (file_sha256(Path(imatrix.path)), string)
    return keys


def _base_type(choices: Sequence[TensorChoice]) -> GGMLQuantizationType | None:
    """The type most quantized tensors got (by count), as llama.cpp's file type names it."""
    counts = Counter(c.target for c in choices if c.why == "type" or c.why.startswith("override"))
    return counts.most_common(1)[0][0] if counts else None


def requantize_model(loaded, base: str | GGMLQuantizationType, overrides=(), advance: Advance = no_progress,
                     imatrix: Imatrix | None = None, **options):
    """A LoadedModel whose weights are `loaded`'s requantized (see choose_types for the options; `imatrix`
    weights the quantizers); same config and tokenizer, nothing written to disk. `.name` says what was done."""
    from qpsa.gguf.quants import dequantize
    from qpsa.model.transformer import Transformer

    start = time.perf_counter()
    choices = choose_types(loaded.file, base, overrides, imatrix=imatrix, **options)
    weights = {}
    for name, qtype, shape, raw in requantized_tensors(loaded.file, choices, advance, imatrix):
        weights[name] = dequantize(np.asarray(raw), qtype, shape)
    model = Transformer(loaded.config, weights, dtype=loaded.model.dtype)
    label = base.name if isinstance(base, GGMLQuantizationType) else qtype_named(base).name
    label += "".join(f", {p}={t.name}" for p, t in overrides) + (" with imatrix" if imatrix is not None else "")
    seconds = time.perf_counter() - start
    return dataclasses.replace(loaded, name=f"{loaded.name} requantized to {label}", model=model,
                               load_seconds=seconds, requantized=choices)
