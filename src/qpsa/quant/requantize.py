"""Re-encoding a GGUF model's weights into other quantization types, on disk or in memory.

    choices = choose_types(gguf_file, "Q4_K_M")                    # which type each tensor gets, and why
    write_requantized(gguf_file, choices, "model-q4_k_m.gguf", file_type=preset_named("Q4_K_M").file_type)
    loaded_q4 = requantize_model(loaded, "Q4_0")                  # the same weights, in memory only

`choose_types` takes llama-quantize's type names (its presets: Q4_K_M, Q3_K_S, Q4_0, …, and the
aliases Q3_K, Q4_K, Q5_K of Q3_K_M, Q4_K_M, Q5_K_M) and gives every tensor the type
`llama-quantize --allow-requantize m.gguf out.gguf TYPE` gives it (src/llama-quant.cpp,
`llama_tensor_get_type`), in this order of precedence:

1. Only tensors llama-quantize quantizes change: 2-D or larger, name ending in "weight", not a
   norm, an expert router, a position/token-type embedding or one of its small special tables.
   The rest are copied byte for byte, as is any tensor whose type does not change.
2. `token_embedding_type` (--token-embedding-type) sets token_embd.weight; `output_type`
   (--output-tensor-type) sets output.weight. No fallback: a type that cannot encode the rows is
   an error.
3. F32, F16 and BF16 presets give every other quantizable tensor that type (no override applies).
4. `overrides` (--tensor-type REGEX=TYPE): the first regex found anywhere in the tensor's name
   (Python `re.search`) sets its type.
5. Otherwise the preset's rules (`qpsa.quant.presets`: the head in Q6_K or Q8_0, and the
   per-layer bumps of the K-quant mixtures), or with `pure=True` the preset's base type for all,
   the head included. A head tied to the embedding takes `output_type` here.
6. Fallback where a type's blocks do not divide the row length (K-quants need multiples of 256):
   Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; F16 where even those do not fit
   (and for 32-weight types). `fallback=False` refuses instead, with one line naming the tensor,
   where the type is the preset's base type or an override (the head and the rules' bumps always
   fall back, as llama-quantize's do).

A GGMLQuantizationType instead of a name is a "uniform" choice, not a llama-quantize preset: that
type for every weight matrix, the head rule, the fallbacks (what `q-psa plan` compares with).
Q2_K_S's Q2_K tensors need an importance matrix (`has_imatrix`), as in llama-quantize.

With an importance matrix (`imatrix`, a `qpsa.quant.imatrix.Imatrix` checked against the model),
every tensor that has an entry is quantized with its weights (in_sum2 / count per column, per expert
for 3-D tensors), as llama-quantize --imatrix does; a tensor without an entry (the token embedding,
the output head) is quantized without. The type choices an imatrix changes for the types q-psa
writes are the presets' rules with `has_imatrix` (`qpsa.quant.presets`): with `Q4_0` (`Q5_0`),
ffn_down of the first n_layer/8 layers gets Q4_1 (Q5_1), unless `pure` or an override names it. (The types llama-quantize refuses without an imatrix, IQ1/IQ2/IQ3_XXS, and
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
from qpsa.quant.presets import (
    NEEDS_IMATRIX,
    PRESETS,
    Mixture,
    ModelFacts,
    Preset,
    category,
    find_preset,
    is_float,
    llama_quantize_order,
)

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
# llama-quantize's presets whose base type q-psa writes, in llama-quantize's order
WRITABLE_PRESETS = [p.name for p in PRESETS.values() if p.base in {t.name for t in WRITABLE}]
# names llama-quantize never quantizes (parts of the name), besides 1-D tensors and non-"weight" names
_NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "position_embd.weight", "token_types.weight",
    "altup", "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "attn_rel_b.weight", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    *(f"time_mix_{part}.weight" for part in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1",
                                              "g2", "decay_w1", "decay_w2", "lerp_fused")),
)


def qtype_named(name: str) -> GGMLQuantizationType:
    """'q4_k' -> Q4_K; anything q-psa cannot write is a one-line error listing what it can."""
    try:
        qtype = Q[name.strip().upper()]
    except KeyError:
        qtype = None
    if qtype not in WRITABLE:
        raise QpsaError(f"unknown or unsupported type {name!r}; q-psa writes {', '.join(t.name for t in WRITABLE)}")
    return qtype


def preset_named(name: str | Preset) -> Preset:
    """llama-quantize's preset of that name ('q4_k_m', 'Q4_K', '15'); an unknown name, or a preset
    whose base type q-psa cannot write (IQ*, TQ*, MXFP4…), is a one-line error."""
    if isinstance(name, Preset):
        return name
    preset = find_preset(name)
    if preset.name not in WRITABLE_PRESETS:
        raise QpsaError(f"{preset.name} needs the type {preset.base}, which q-psa cannot write; "
                        f"q-psa writes {', '.join(WRITABLE_PRESETS)}")
    return preset


def uniform_preset(qtype: GGMLQuantizationType) -> Preset:
    """Not a llama-quantize preset: `qtype` for every weight matrix, the head rule and the fallbacks."""
    return Preset(qtype.name, int(FILE_TYPES[qtype]), qtype.name, uniform=True)


def parse_tensor_type(spec: str) -> tuple[str, GGMLQuantizationType]:
    """llama-quantize's --tensor-type syntax, REGEX=TYPE -> (regex, type); like llama-quantize,
    the regex is lower-cased (tensor names are)."""
    pattern, sep, type_name = spec.partition("=")
    pattern = pattern.lower()
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
    preset: str | Preset | GGMLQuantizationType,
    overrides: Sequence[tuple[str, GGMLQuantizationType]] = (),
    output_type: GGMLQuantizationType | None = None,
    token_embedding_type: GGMLQuantizationType | None = None,
    pure: bool = False,
    fallback: bool = True,
    has_imatrix: bool = False,
    imatrix: Imatrix | None = None,
) -> list[TensorChoice]:
    """The type of every tensor of `gguf_file`, in file order, by the rules in this module's docstring;
    QpsaError for an `imatrix` that does not fit the model (`Imatrix.check_against`)."""
    if imatrix is not None:
        imatrix.check_against(gguf_file)
        has_imatrix = True
    preset = uniform_preset(preset) if isinstance(preset, GGMLQuantizationType) else preset_named(preset)
    facts = ModelFacts.of(gguf_file)
    mixture = Mixture(preset, facts, has_imatrix, output_type.name if output_type is not None else None)
    chosen = {}
    for name in llama_quantize_order(gguf_file.tensors):  # the rules count attn_v and ffn_down in this order
        t = gguf_file.tensors[name]
        if not is_quantizable(name, t.shape):
            chosen[name] = TensorChoice(name, t.shape, t.qtype, t.qtype, "not quantized")
            continue
        target, why = _choose_one(name, t.shape[-1], preset, mixture, overrides, output_type, token_embedding_type,
                                  pure, fallback)
        if NEEDS_IMATRIX.get(preset.name) == target.name and category(name) not in ("token_embd", "output") \
                and not has_imatrix:
            raise QpsaError(f"{preset.name} gives {name} the type {target.name}, which llama-quantize writes only "
                            f"with an importance matrix; choose Q2_K or Q3_K_S")
        chosen[name] = TensorChoice(name, t.shape, t.qtype, target, why)
    return [chosen[name] for name in gguf_file.tensors]


def _choose_one(name, row, preset, mixture, overrides, output_type, token_embedding_type, pure, fallback):
    """(type, why) of one quantizable tensor, in llama-quantize's order of precedence."""
    role = category(name)
    if token_embedding_type is not None and role == "token_embd" and not (
            name == "per_layer_token_embd.weight" and _override(name, overrides)):
        return _fit(name, row, token_embedding_type, "--token-embedding-type", fallback=None)
    if output_type is not None and role == "output":
        return _fit(name, row, output_type, "--output-tensor-type", fallback=None)
    base = Q[preset.base]
    if is_float(preset.base):
        return base, "type"
    match = _override(name, overrides)
    if match is not None:
        return _fit(name, row, match[1], f"override {match[0]}", fallback)
    if pure:
        return _fit(name, row, base, "type", fallback)
    target = Q[mixture.type_for(name, row)]
    if role == "output" or (mixture.facts.tied and role == "token_embd"):
        if output_type is not None:
            return _fit(name, row, target, "--output-tensor-type", fallback)
        return _fit(name, row, target, "output head", True)
    if target == base:
        return _fit(name, row, target, "type", fallback)
    return _fit(name, row, target, f"{preset.name} rule", True)


def _override(name: str, overrides) -> tuple[str, GGMLQuantizationType] | None:
    """The first (regex, type) of --tensor-type whose regex is found in the name."""
    return next(((pattern, qtype) for pattern, qtype in overrides if re.search(pattern, name)), None)


def _fit(name: str, row: int, target, why: str, fallback: bool | None):
    """`target`, or llama-quantize's fallback type where its blocks do not divide the row length
    (fallback False: refused, None: refused, as llama-quantize has no fallback there)."""
    block = GGML_QUANT_SIZES[target][0]
    if row % block == 0:
        return target, why
    if not fallback:
        hint = "" if fallback is None else ", or leave out --no-fallback for llama-quantize's fallback types"
        raise QpsaError(f"{name}: {target.name} cannot encode rows of {row} weights (its blocks hold {block}); "
                        f"choose another type{hint}")
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
    gguf_file: GGUFFile, choices: Sequence[TensorChoice], advance: Advance = no_progress, imatrix: Imatrix | None = None,
    cached: bool = False,
) -> Iterator[tuple[str, GGMLQuantizationType, tuple[int, ...], np.ndarray]]:
    """(name, type, shape, raw bytes) of every tensor in its chosen type; unchanged ones are the file's bytes.
    With an `imatrix`, a tensor that has an entry is quantized with its weights, one row of them per matrix.
    `cached`: through (and into) `REQUANTIZED`, for callers that requantize the same tensors again (plan)."""
    for c in choices:
        t = gguf_file.tensors[c.name]
        if c.target == t.qtype:
            raw = t.raw
        elif cached:
            raw = REQUANTIZED.raw(gguf_file, c.name, c.target, imatrix)
        else:
            raw = quantized_raw(c.name, t.to_torch().numpy(), c.target, imatrix)
        advance(c.name)
        yield c.name, c.target, c.shape, raw


def quantized_raw(name: str, values: np.ndarray, target: GGMLQuantizationType,
                  imatrix: Imatrix | None = None) -> np.ndarray:
    """The raw blocks (uint8, flat) of one tensor's float values in `target`; with an `imatrix` that
    has an entry for `name`, quantized with its weights, one row of them per matrix."""
    from qpsa.gguf.quants import quantize

    n = values.shape[-1]
    if imatrix is not None and name in imatrix.in_sum2:
        weights = imatrix.mean(name).reshape(-1, n)  # (n_mat, n): experts of a 3-D tensor, else one
        matrices = values.reshape(len(weights), -1, n)  # (n_mat, rows, n)
        return np.concatenate([quantize(m, target, w).reshape(-1) for m, w in zip(matrices, weights)])
    return quantize(values.reshape(-1, n), target).reshape(-1)


class RequantizedCache:
    """The file tensors' requantized blocks, kept so that one tensor is quantized once per type
    within a process: `plan` requantizes each candidate to measure it (or, with an estimator, to
    predict it), then the plan, the uniform types and the presets for its held-out check — mostly
    the same (tensor, type, imatrix) triples. Keyed by the tensor's place in its file (path, size,
    mtime, name), the target type and the imatrix weights' bytes, so an edited file or another
    imatrix never hits. Least recently used entries go first beyond `max_bytes`
    (QPSA_REQUANT_CACHE_MB, default 2048; 0 turns it off). The blocks are shared: callers copy
    before changing them (`dequantize` does)."""

    def __init__(self, max_bytes: int | None = None):
        from collections import OrderedDict

        self._max_bytes = max_bytes  # None: QPSA_REQUANT_CACHE_MB, read on first use
        self.entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.n_bytes = 0
        self.hits = self.misses = 0

    @property
    def max_bytes(self) -> int:
        if self._max_bytes is None:
            value = os.environ.get("QPSA_REQUANT_CACHE_MB", "2048")
            try:
                self._max_bytes = int(value) << 20
            except ValueError:
                raise QpsaError(f"QPSA_REQUANT_CACHE_MB must be a whole number of MiB (got {value!r})") from None
        return self._max_bytes

    def raw(self, gguf_file: GGUFFile, name: str, target: GGMLQuantizationType,
            imatrix: Imatrix | None = None) -> np.ndarray:
        """`quantized_raw` of the file's tensor `name`, from the cache where it is there."""
        import hashlib

        t = gguf_file.tensors[name]
        if self.max_bytes <= 0:
            return quantized_raw(name, t.to_torch().numpy(), target, imatrix)
        stat = os.stat(gguf_file.path)
        weights = None
        if imatrix is not None and name in imatrix.in_sum2:
            weights = hashlib.sha256(np.ascontiguousarray(imatrix.mean(name), dtype=np.float32).tobytes()).hexdigest()
        key = (str(Path(gguf_file.path).resolve()), stat.st_size, stat.st_mtime_ns, name, target, weights)
        raw = self.entries.get(key)
        if raw is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return raw
        self.misses += 1
        raw = quantized_raw(name, t.to_torch().numpy(), target, imatrix)
        raw.setflags(write=False)
        if raw.nbytes <= self.max_bytes:
            self.entries[key] = raw
            self.n_bytes += raw.nbytes
            while self.n_bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.n_bytes -= old.nbytes
        return raw

    def clear(self) -> None:
        self.entries.clear()
        self.n_bytes = 0


REQUANTIZED = RequantizedCache()


def write_requantized(
    gguf_file: GGUFFile, choices: Sequence[TensorChoice], out: str | os.PathLike,
    advance: Advance = no_progress, file_type: int | None = None, imatrix: Imatrix | None = None,
    cached: bool = False,
) -> Path:
    """Write the model with every tensor in its chosen type (metadata copied). `file_type` is the
    general.file_type to write (a preset's, `preset_named("Q4_K_M").file_type`); by default that of
    the type most tensors got. With an `imatrix`, quantized with its weights and recorded in the
    metadata (module docstring)."""
    from qpsa.gguf.write import check_output_path, write_gguf

    out = check_output_path(out, gguf_file.path)
    metadata = dict(gguf_file.metadata)
    types = dict(gguf_file.layout.value_types)
    if file_type is None and _base_type(choices) in FILE_TYPES:
        file_type = FILE_TYPES[_base_type(choices)]
    if file_type is not None:
        metadata["general.file_type"] = int(file_type)
        types["general.file_type"] = (gguf.GGUFValueType.UINT32, None)
    metadata["general.quantization_version"] = gguf.GGML_QUANT_VERSION  # llama-quantize writes it, F16 files too
    types["general.quantization_version"] = (gguf.GGUFValueType.UINT32, None)
    if imatrix is not None:
        for key, (value, value_type) in imatrix_metadata(imatrix).items():
            metadata[key] = value
            types[key] = (value_type, None)
    return write_gguf(gguf_file, metadata, types, requantized_tensors(gguf_file, choices, advance, imatrix, cached), out)


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


def requantize_model(loaded, base: str | Preset | GGMLQuantizationType, overrides=(), advance: Advance = no_progress,
                     imatrix: Imatrix | None = None, **options):
    """A LoadedModel whose weights are `loaded`'s requantized (see choose_types for the options; `imatrix`
    weights the quantizers); same config and tokenizer, nothing written to disk. `.name` says what was done."""
    from qpsa.model.transformer import Transformer
    from qpsa.model.weights import QuantizedTensor, WeightStore

    start = time.perf_counter()
    preset = uniform_preset(base) if isinstance(base, GGMLQuantizationType) else preset_named(base)
    choices = choose_types(loaded.file, preset, overrides, imatrix=imatrix, **options)
    sources = {}  # the requantized bytes, dequantized as the base model's are (whole, or layer by layer)
    for name, qtype, shape, raw in requantized_tensors(loaded.file, choices, advance, imatrix):
        sources[name] = QuantizedTensor(name, tuple(shape), GGMLQuantizationType(qtype), np.asarray(raw).reshape(-1))
    base_weights = loaded.model.weights
    store = WeightStore(sources, dtype=base_weights.dtype, device=base_weights.device, budget=0.0)
    if base_weights.resident:
        store.make_resident()
    else:
        store.budget = base_weights.budget
    model = Transformer(loaded.config, store)
    label = preset.name + "".join(f", {p}={t.name}" for p, t in overrides) + (" with imatrix" if imatrix is not None else "")
    seconds = time.perf_counter() - start
    return dataclasses.replace(loaded, name=f"{loaded.name} requantized to {label}", model=model,
                               load_seconds=seconds, requantized=choices)
