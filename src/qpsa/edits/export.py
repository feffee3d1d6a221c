"""Pruned and looped models as GGUF files that llama.cpp runs: the kept layers' tensors copied byte
for byte and renumbered, the per-layer metadata arrays cut to match."""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf

from qpsa.errors import QpsaError
from qpsa.gguf.read import GGUFFile
from qpsa.gguf.write import check_output_path, write_gguf
from qpsa.model.config import config_from_metadata

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def write_layers(gguf_file: GGUFFile, keep: list[int], out: str | os.PathLike) -> Path:
    """Write `gguf_file` with only the layers in `keep`, renumbered in that order."""
    md = gguf_file.metadata
    arch = md["general.architecture"]
    n_layer = int(md[f"{arch}.block_count"])
    if not keep:
        raise QpsaError("no layer would be left")
    if any(not 0 <= i < n_layer for i in keep):
        raise QpsaError(f"layers must be in 0..{n_layer - 1}")
    out = check_output_path(out, gguf_file.path)
    config = config_from_metadata(md)

    metadata = dict(md)
    types = dict(gguf_file.layout.value_types)
    metadata[f"{arch}.block_count"] = len(keep)
    for key, value in md.items():
        if key.startswith(f"{arch}.") and isinstance(value, list) and len(value) == n_layer:
            metadata[key] = [value[i] for i in keep]
    if arch in ("gemma2", "gemma3") and config.swa_layers:  # each kept layer keeps its attention type
        key = f"{arch}.attention.sliding_window_pattern"
        metadata[key] = [bool(config.swa_layers[i]) for i in keep]
        types[key] = (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)

    def tensors():
        by_layer: dict[int, list] = {}
        for name, t in gguf_file.tensors.items():
            m = _LAYER.match(name)
            if m is None:
                yield name, t.qtype, t.shape, t.raw
            else:
                by_layer.setdefault(int(m.group(1)), []).append((m.group(2), t))
        for new, old in enumerate(keep):  # a layer listed twice is written twice: a repeated layer
            for suffix, t in by_layer.get(old, []):
                yield f"blk.{new}.{suffix}", t.qtype, t.shape, t.raw

    return write_gguf(gguf_file, metadata, types, tensors(), out)
