"""Reading a GGUF file: validated first, then its tensors as records that know their grid.

    gguf_file = open_gguf("model.gguf")          # validates every length, count and offset first
    t = gguf_file.tensors["blk.0.ffn_down.weight"]
    t.qtype, t.shape                               # GGMLQuantizationType.Q4_1, (576, 1536)
    values = t.dequantize()                        # float32 (576, 1536), equal to gguf's dequantize
    codes, step = t.grid().decode(t.blocks)        # integer codes and per-weight step

Shapes are in numpy order (rows first); GGUF's own `ne` order is reversed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from qpsa.errors import QpsaError
from qpsa.fsutil import cache_root, write_atomic
from qpsa.gguf.validate import GGUFLayout, validate_gguf


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, …, row length)
    qtype: GGMLQuantizationType
    raw: np.ndarray  # uint8 view of the file's bytes for this tensor
    offset: int  # absolute byte offset in the file

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.raw.nbytes / self.n_elements

    @property
    def blocks(self) -> np.ndarray:
        return self.raw.reshape(-1, self.type_size)  # (n_blocks, type_size)

    def dequantize(self) -> np.ndarray:
        """float32 values of shape `self.shape`, computed by the `gguf` package's dequantizer."""
        if self.qtype == GGMLQuantizationType.F32:
            return self.raw.view(np.float32).reshape(self.shape)
        return dequantize(self.blocks, self.qtype).reshape(self.shape).astype(np.float32, copy=False)

    def to_torch(self) -> torch.Tensor:
        """The same values as `dequantize()`, computed by q-psa's faster torch dequantizers."""
        from qpsa.gguf.quants import dequantize as fast_dequantize

        return fast_dequantize(self.raw, self.qtype, self.shape)

    def grid(self):
        from qpsa.gguf.quants import grid_for

        return grid_for(self.qtype)


@dataclass
class GGUFFile:
    path: Path
    layout: GGUFLayout
    tensors: dict[str, GGUFTensor]
    _sha256: str | None = field(default=None, repr=False)

    @property
    def metadata(self) -> dict:
        return self.layout.metadata

    @property
    def arch(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def size(self) -> int:
        return self.layout.file_size

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Validate the file and map its tensors (no tensor data is read until used)."""
    path = Path(path)
    layout = validate_gguf(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for t in layout.tensors:
        tensors[t.name] = GGUFTensor(
            name=t.name,
            shape=tuple(reversed(t.shape)),
            qtype=GGMLQuantizationType(t.ggml_type),
            raw=data[t.offset : t.offset + t.n_bytes],
            offset=t.offset,
        )
    return GGUFFile(path=path, layout=layout, tensors=tensors)


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so large models are hashed once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_root() / "sha256.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError as e:
        raise QpsaError(f"{path}: cannot read: {e.strerror}") from None
    index[key] = digest.hexdigest()
    write_atomic(index_path, json.dumps(index, indent=0))
    return index[key]
