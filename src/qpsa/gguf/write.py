"""Writing GGUF files: a model with some layers removed, every remaining tensor copied byte for byte.

    write_layers(gguf_file, keep=[0, 1, 3, 4], out="pruned.gguf")

Layer `keep[j]` of the source becomes layer j of the output (`blk.{keep[j]}.*` → `blk.{j}.*`); a
layer listed twice is written twice (its weights duplicated), which is how llama.cpp can run a
repeated layer.
Metadata is copied with its value types; `{arch}.block_count` is set to len(keep), and every
per-layer array under `{arch}.` (one entry per layer, e.g. per-layer head counts) is filtered the
same way. For gemma2 and gemma3 the sliding-window layout is written explicitly as
`{arch}.attention.sliding_window_pattern` (one bool per layer, true = sliding window), so each kept
layer keeps its attention type even where removing layers shifts the every-sixth-layer default.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from qpsa.errors import QpsaError
from qpsa.fsutil import atomic_output
from qpsa.gguf.read import GGUFFile


def check_output_path(out: str | os.PathLike, source: Path) -> Path:
    """Refuse, before any work, an output that is the source model, a directory, or unwritable."""
    out = Path(out)
    if out.is_dir():
        raise QpsaError(f"{out}: is a directory; give a file name for the output")
    if out.exists() and out.resolve() == Path(source).resolve():
        raise QpsaError(f"{out}: is the input model; choose another output path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise QpsaError(f"{out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise QpsaError(f"{out}: folder {parent} is not writable")
    return out


def write_gguf(gguf_file: GGUFFile, metadata: dict, types: dict, tensors, out: Path) -> Path:
    """Write a GGUF atomically: `metadata` (with `types`, the value types of its keys, as
    GGUFLayout.value_types gives them), `gguf_file`'s alignment, and `tensors`, an iterable of
    (name, qtype, shape in numpy order, raw bytes in the GGML layout of qtype)."""
    arch = metadata["general.architecture"]
    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=False)
        for key, value in metadata.items():
            if key in ("general.architecture", "general.alignment"):
                continue  # the writer adds the architecture itself; alignment below
            value_type, element_type = types[key]
            writer.add_key_value(key, value, gguf.GGUFValueType(value_type),
                                 sub_type=gguf.GGUFValueType(element_type) if element_type is not None else None)
        if gguf_file.layout.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            writer.data_alignment = gguf_file.layout.alignment
            writer.add_uint32("general.alignment", gguf_file.layout.alignment)
        for name, qtype, shape, raw in tensors:
            _add_raw(writer, name, qtype, shape, raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _add_raw(writer: gguf.GGUFWriter, name: str, qtype, shape, raw) -> None:
    """Add a tensor's bytes unchanged: uint8 rows of the quantized layout, shape in numpy order."""
    data = np.asarray(raw).reshape(*shape[:-1], -1)  # (rows…, bytes per row)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = data.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        writer.add_tensor(name, data)
        return
    writer.add_tensor(name, data, raw_dtype=qtype)  # shape derived from the byte shape
