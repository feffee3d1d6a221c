"""Check a GGUF file's structure before anything else reads it.

q-psa opens GGUF files downloaded from strangers, and the `gguf` package's GGUFReader trusts
the file: a declared length that runs past the end is silently truncated, a huge array count
drives an unbounded loop, a product of dimensions wraps around. `validate_gguf` parses the
header, the metadata and the tensor infos itself, checking every declared size against the
bytes that remain before using it, and raises `BadGGUFError` (file, field, byte offset,
problem) on the first thing that is wrong. Memory use is bounded by a small multiple of the
file size and time by its length: every loop is driven by a count that was first checked
against the bytes left.

`check_tensor_values` is the separate, optional scan of tensor data for NaN/Inf (float
tensors element by element, quantized tensors through their f16/f32 scale fields).

GGUF byte layout (little-endian; versions 2 and 3 share it, version 1 used 32-bit counts):

    header, 24 bytes
        0   4   magic         b"GGUF"
        4   4   version       uint32, 2 or 3
        8   8   tensor_count  uint64
       16   8   kv_count      uint64
    metadata, kv_count times
        key     string = uint64 length + that many UTF-8 bytes (no terminator)
        type    uint32 GGUFValueType (0..12)
        value   a scalar of the type's size, a string, or an array:
                uint32 element type, uint64 element count, then the elements
    tensor infos, tensor_count times
        name    string
        n_dims  uint32 (1..4)
        dims    n_dims x uint64, ne0 (the row length) first
        type    uint32 GGMLQuantizationType
        offset  uint64, relative to the start of the data section, a multiple of the alignment
    padding up to a multiple of general.alignment (UINT32 metadata, default 32)
    data section: each tensor's bytes at data_start + offset
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from qpsa.errors import BadGGUFError, QpsaError

SUPPORTED_VERSIONS = (2, 3)
# GGUFReader stores the header fields under these names among the metadata keys, and fails
# with KeyError on a file that also has one of them as a key.
RESERVED_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
MAX_KEY_LENGTH = 256  # bytes, for metadata keys
MAX_TENSOR_NAME_LENGTH = 256  # bytes
MAX_STRING_VALUE = 16 << 20  # bytes, for one string value (a chat template is ~10 KiB)
MAX_ARRAY_LENGTH = 1 << 24  # elements (a tokenizer vocabulary is ~2^18)
MAX_ALIGNMENT = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1  # ggml keeps dimensions, element counts and byte sizes in int64

# The smallest possible metadata entry: key length, a 1-byte key, the type, a 1-byte value.
MIN_KV_SIZE = 8 + 1 + 4 + 1
# The smallest possible tensor info: name length, a 1-byte name, n_dims, one dim, type, offset.
MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8

# Scalar metadata types: struct format and numpy dtype (both little-endian), size in bytes.
_SCALAR_TYPES: dict[int, tuple[str, str, int]] = {
    GGUFValueType.UINT8: ("<B", "<u1", 1),
    GGUFValueType.INT8: ("<b", "<i1", 1),
    GGUFValueType.UINT16: ("<H", "<u2", 2),
    GGUFValueType.INT16: ("<h", "<i2", 2),
    GGUFValueType.UINT32: ("<I", "<u4", 4),
    GGUFValueType.INT32: ("<i", "<i4", 4),
    GGUFValueType.FLOAT32: ("<f", "<f4", 4),
    GGUFValueType.BOOL: ("<B", "<u1", 1),  # one byte, 0 or 1
    GGUFValueType.UINT64: ("<Q", "<u8", 8),
    GGUFValueType.INT64: ("<q", "<i8", 8),
    GGUFValueType.FLOAT64: ("<d", "<f8", 8),
}
_VALUE_TYPE_NAMES = {int(t): t.name for t in GGUFValueType}


@dataclass
class TensorLayout:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    ggml_type: int  # a GGMLQuantizationType value
    offset: int  # absolute file offset of the tensor's first byte
    n_bytes: int


@dataclass
class GGUFLayout:
    path: Path
    version: int
    alignment: int
    data_offset: int  # absolute file offset of the data section
    file_size: int
    metadata: dict[str, object]  # strings as str, arrays as lists, bools as bool
    tensors: list[TensorLayout]  # in file order
    # key -> (GGUFValueType, element GGUFValueType for arrays else None): enough to write it back
    value_types: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def validate_gguf(path, *, max_string: int = MAX_STRING_VALUE, max_array: int = MAX_ARRAY_LENGTH) -> GGUFLayout:
    """Check the structure of the GGUF file at `path` and return its layout.

    Raises BadGGUFError on the first malformed or unsafe field, QpsaError if the file is
    missing, unreadable or not a regular file. Tensor data is not read; see check_tensor_values.
    """
    path = Path(path)
    with _open_regular_file(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size == 0:
            raise BadGGUFError(path, "magic", 0, "the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _HeaderParser(path, buf, len(buf), max_string, max_array).parse()


def _open_regular_file(path: Path):
    """Open `path` for reading, turning every way that can fail into one QpsaError line."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QpsaError(f"{path}: no such file") from None
    except OSError as e:
        raise QpsaError(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise QpsaError(f"{path}: is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise QpsaError(f"{path}: not a regular file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise QpsaError(f"{path}: cannot read: {e.strerror or e}") from None


class _HeaderParser:
    """Reads header, metadata and tensor infos from `buf` with a cursor `pos`, checking as it goes."""

    def __init__(self, path: Path, buf, size: int, max_string: int, max_array: int):
        self.path, self.buf, self.size = path, buf, size
        self.max_string, self.max_array = max_string, max_array
        self.pos = 0

    def fail(self, field: str, offset: int, problem: str):
        raise BadGGUFError(self.path, field, offset, problem)

    def remaining(self) -> int:
        return self.size - self.pos

    # -- primitive reads: each checks that the bytes are there before reading them --

    def take(self, n: int, field: str, what: str) -> int:
        """Advance past `n` bytes, returning where they start."""
        if n > self.remaining():
            self.fail(field, self.pos, f"file ends inside the {what} (needs {n} bytes, {self.remaining()} left)")
        start = self.pos
        self.pos += n
        return start

    def u32(self, field: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, field, "uint32"))[0]

    def u64(self, field: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, field, "uint64"))[0]

    def string(self, field: str, cap: int, what: str) -> str:
        """A GGUF string: uint64 length, then that many bytes of UTF-8."""
        start = self.pos
        n = self.u64(field)
        if n > self.remaining():
            self.fail(field, start, f"{what} length {n} runs past the end of the file ({self.remaining()} bytes left)")
        if n > cap:
            self.fail(field, start, f"{what} length {n} exceeds the limit of {cap} bytes")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_byte = start + 8 + e.start
        self.fail(field, bad_byte, f"{what} is not valid UTF-8")  # outside `except`: no chained traceback

    # -- the file, section by section --

    def parse(self) -> GGUFLayout:
        self.take(4, "magic", "magic")
        magic = self.buf[0:4]
        if magic != b"GGUF":
            self.fail("magic", 0, f"expected b'GGUF', found {magic!r}")
        version = self.u32("version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (byte-swapped: a big-endian file?)" if version and version & 0xFFFF == 0 else ""
            self.fail("version", 4, f"version {version} is not supported, only 2 and 3{hint}")
        tensor_count = self.u64("tensor_count")
        kv_count = self.u64("kv_count")
        # Loose bounds, so that neither count can drive a long loop: each entry takes some bytes.
        if kv_count * MIN_KV_SIZE > self.remaining():
            self.fail("kv_count", 16, f"{kv_count} metadata entries cannot fit in the {self.remaining()} bytes after the header")
        if tensor_count * MIN_TENSOR_INFO_SIZE > self.remaining():
            self.fail("tensor_count", 8, f"{tensor_count} tensor infos cannot fit in the {self.remaining()} bytes after the header")

        metadata, alignment_entry, value_types = self.parse_metadata(kv_count)
        tensor_infos = self.parse_tensor_infos(tensor_count)
        alignment = self.check_alignment(alignment_entry)
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self.place_tensors(tensor_infos, data_offset, alignment)
        return GGUFLayout(self.path, version, alignment, data_offset, self.size, metadata, tensors, value_types)

    def parse_metadata(self, kv_count: int):
        metadata: dict[str, object] = {}
        value_types: dict[str, tuple[int, int | None]] = {}
        alignment_entry = None  # (value type, byte offset of the value) of general.alignment
        for i in range(kv_count):
            key_field = f"metadata key #{i}"
            key_offset = self.pos
            key = self.string(key_field, MAX_KEY_LENGTH, "key")
            if not key:
                self.fail(key_field, key_offset, "the key is empty")
            if key in metadata:
                self.fail(key_field, key_offset, f"duplicate key {key!r}")
            if key in RESERVED_KEYS:
                self.fail(key_field, key_offset, f"key {key!r} is reserved (gguf's GGUFReader names the header fields so)")
            field = f"metadata {key!r}"
            type_offset = self.pos
            value_type = self.u32(f"{field} type")
            if value_type not in _VALUE_TYPE_NAMES:
                self.fail(f"{field} type", type_offset, f"unknown value type {value_type}")
            if key == "general.alignment":
                alignment_entry = (value_type, self.pos)
            value_start = self.pos
            metadata[key] = self.value(value_type, field)
            element_type = None
            if value_type == GGUFValueType.ARRAY:  # validated by value() above
                (element_type,) = struct.unpack_from("<I", self.buf, value_start)
            value_types[key] = (value_type, element_type)
        return metadata, alignment_entry, value_types

    def value(self, value_type: int, field: str) -> object:
        if value_type == GGUFValueType.STRING:
            return self.string(f"{field} value", self.max_string, "string")
        if value_type == GGUFValueType.ARRAY:
            return self.array(field)
        fmt, _, size = _SCALAR_TYPES[value_type]
        start = self.take(size, f"{field} value", _VALUE_TYPE_NAMES[value_type])
        (value,) = struct.unpack_from(fmt, self.buf, start)
        if value_type == GGUFValueType.BOOL:
            if value > 1:
                self.fail(f"{field} value", start, f"bool byte is {value}, not 0 or 1")
            value = bool(value)
        return value

    def array(self, field: str) -> list:
        """uint32 element type, uint64 count, then the elements (scalars or strings, not arrays)."""
        type_offset = self.pos
        element_type = self.u32(f"{field} array type")
        if element_type == GGUFValueType.ARRAY:
            self.fail(f"{field} array type", type_offset, "nested arrays are not supported")
        if element_type not in _VALUE_TYPE_NAMES:
            self.fail(f"{field} array type", type_offset, f"unknown array element type {element_type}")
        count_offset = self.pos
        count = self.u64(f"{field} array length")
        min_element_size = 8 if element_type == GGUFValueType.STRING else _SCALAR_TYPES[element_type][2]
        if count * min_element_size > self.remaining():
            self.fail(f"{field} array length", count_offset,
                      f"{count} elements of {_VALUE_TYPE_NAMES[element_type]} cannot fit in the {self.remaining()} bytes left")
        if count > self.max_array:
            self.fail(f"{field} array length", count_offset, f"{count} elements exceed the limit of {self.max_array}")
        if element_type == GGUFValueType.STRING:
            return self.string_elements(count, field)
        _, dtype, size = _SCALAR_TYPES[element_type]
        start = self.take(count * size, f"{field} array", "array")
        values = np.frombuffer(self.buf[start : start + count * size], dtype=dtype)
        if element_type == GGUFValueType.BOOL:
            if (values > 1).any():
                j = int(np.argmax(values > 1))
                self.fail(f"{field} element {j}", start + j, f"bool byte is {values[j]}, not 0 or 1")
            return values.astype(bool).tolist()
        return values.tolist()

    def string_elements(self, count: int, field: str) -> list[str]:
        # Same checks as string(), inlined: a vocabulary has ~2^18 of these.
        buf, size, cap, pos = self.buf, self.size, self.max_string, self.pos
        unpack_length = struct.Struct("<Q").unpack_from
        out = []
        for j in range(count):
            if size - pos < 8:
                self.fail(f"{field} element {j}", pos, f"file ends inside the string length ({size - pos} bytes left)")
            (n,) = unpack_length(buf, pos)
            if n > size - pos - 8:
                self.fail(f"{field} element {j}", pos, f"string length {n} runs past the end of the file ({size - pos - 8} bytes left)")
            if n > cap:
                self.fail(f"{field} element {j}", pos, f"string length {n} exceeds the limit of {cap} bytes")
            try:
                text = buf[pos + 8 : pos + 8 + n].decode("utf-8")
            except UnicodeDecodeError as e:
                text, bad_byte = None, pos + 8 + e.start
            if text is None:
                self.fail(f"{field} element {j}", bad_byte, "string is not valid UTF-8")
            out.append(text)
            pos += 8 + n
        self.pos = pos
        return out

    def parse_tensor_infos(self, tensor_count: int) -> list[tuple]:
        infos = []  # (name, dims, ggml_type, relative offset, byte offset of the offset field, n_bytes)
        names: set[str] = set()
        for i in range(tensor_count):
            name_field = f"tensor #{i} name"
            name_offset = self.pos
            name = self.string(name_field, MAX_TENSOR_NAME_LENGTH, "tensor name")
            if not name:
                self.fail(name_field, name_offset, "the tensor name is empty")
            if name in names:
                self.fail(name_field, name_offset, f"duplicate tensor name {name!r}")
            names.add(name)
            field = f"tensor {name!r}"

            n_dims_offset = self.pos
            n_dims = self.u32(f"{field} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                self.fail(f"{field} n_dims", n_dims_offset, f"n_dims is {n_dims}, not between 1 and {MAX_DIMS}")
            dims_offset = self.take(8 * n_dims, f"{field} dims", "dimensions")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, dims_offset)
            type_offset = self.pos
            ggml_type = self.u32(f"{field} ggml_type")
            offset_offset = self.pos
            relative_offset = self.u64(f"{field} offset")

            n_elements = 1
            for j, d in enumerate(dims):
                if d < 1:
                    self.fail(f"{field} dims", dims_offset + 8 * j, f"dimension {j} is 0")
                n_elements *= d
                if n_elements > INT64_MAX:
                    self.fail(f"{field} dims", dims_offset + 8 * j, f"element count of dims {list(dims)} overflows int64")
            try:
                qtype = GGMLQuantizationType(ggml_type)
                block_size, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                self.fail(f"{field} ggml_type", type_offset, f"unknown ggml type {ggml_type}")
            if dims[0] % block_size:
                self.fail(f"{field} dims", dims_offset,
                          f"row length ne0={dims[0]} is not a multiple of {qtype.name}'s block size {block_size}")
            n_bytes = n_elements // block_size * type_size
            if n_bytes > INT64_MAX:
                self.fail(f"{field} dims", dims_offset, f"byte size of dims {list(dims)} in {qtype.name} overflows int64")
            infos.append((name, dims, ggml_type, relative_offset, offset_offset, n_bytes))
        return infos

    def check_alignment(self, alignment_entry) -> int:
        if alignment_entry is None:
            return GGUF_DEFAULT_ALIGNMENT
        value_type, value_offset = alignment_entry
        if value_type != GGUFValueType.UINT32:
            self.fail("general.alignment", value_offset, f"stored as {_VALUE_TYPE_NAMES[value_type]}, must be UINT32")
        (alignment,) = struct.unpack_from("<I", self.buf, value_offset)
        if not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
            self.fail("general.alignment", value_offset, f"{alignment} is not a power of two between 1 and {MAX_ALIGNMENT}")
        return alignment

    def place_tensors(self, infos: list[tuple], data_offset: int, alignment: int) -> list[TensorLayout]:
        tensors = []
        for name, dims, ggml_type, relative_offset, offset_offset, n_bytes in infos:
            field = f"tensor {name!r}"
            if relative_offset % alignment:
                self.fail(f"{field} offset", offset_offset, f"offset {relative_offset} is not a multiple of the alignment {alignment}")
            start = data_offset + relative_offset
            if start >= self.size:
                self.fail(f"{field} offset", offset_offset,
                          f"data would start at byte {start}, past the end of the file ({self.size} bytes)")
            if start + n_bytes > self.size:
                self.fail(f"{field} data", start,
                          f"needs {n_bytes} bytes up to byte {start + n_bytes}, but the file ends at byte {self.size}")
            tensors.append(TensorLayout(name, tuple(dims), ggml_type, start, n_bytes))
        by_start = sorted(zip(tensors, infos), key=lambda pair: pair[0].offset)
        for (before, _), (after, after_info) in zip(by_start, by_start[1:]):
            if after.offset < before.offset + before.n_bytes:
                self.fail(f"tensor {after.name!r} offset", after_info[4],
                          f"data at bytes {after.offset}..{after.offset + after.n_bytes} overlaps tensor {before.name!r} "
                          f"at bytes {before.offset}..{before.offset + before.n_bytes}")
        return tensors


# -- tensor values --

# Float tensors: an element is NaN or Inf when all its exponent bits are set.
# ggml type -> (little-endian unsigned dtype of one element, exponent mask)
_FLOAT_EXPONENTS: dict[int, tuple[str, int]] = {
    GGMLQuantizationType.F32: ("<u4", 0x7F80_0000),
    GGMLQuantizationType.F16: ("<u2", 0x7C00),
    GGMLQuantizationType.BF16: ("<u2", 0x7F80),
    GGMLQuantizationType.F64: ("<u8", 0x7FF0_0000_0000_0000),
}
_F16 = ("<u2", 0x7C00)
_F32 = ("<u4", 0x7F80_0000)


def _block_end(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][1] - 2


# Quantized tensors: the float scale fields inside each block (layouts as in gguf-py's quants.py).
# ggml type -> [(field name, byte offset inside the block, (dtype, exponent mask))]
_Q = GGMLQuantizationType
SCALE_FIELDS: dict[int, list[tuple[str, int, tuple[str, int]]]] = {
    _Q.Q4_0: [("d", 0, _F16)],  # d, qs[16]
    _Q.Q4_1: [("d", 0, _F16), ("m", 2, _F16)],  # d, m, qs[16]
    _Q.Q5_0: [("d", 0, _F16)],  # d, qh[4], qs[16]
    _Q.Q5_1: [("d", 0, _F16), ("m", 2, _F16)],  # d, m, qh[4], qs[16]
    _Q.Q8_0: [("d", 0, _F16)],  # d, qs[32]
    _Q.Q2_K: [("d", 80, _F16), ("dmin", 82, _F16)],  # scales[16], qs[64], d, dmin
    _Q.Q3_K: [("d", _block_end(_Q.Q3_K), _F16)],  # hmask[32], qs[64], scales[12], d
    _Q.Q4_K: [("d", 0, _F16), ("dmin", 2, _F16)],  # d, dmin, scales[12], qs[128]
    _Q.Q5_K: [("d", 0, _F16), ("dmin", 2, _F16)],  # d, dmin, scales[12], qh[32], qs[128]
    _Q.Q6_K: [("d", _block_end(_Q.Q6_K), _F16)],  # ql[128], qh[64], scales[16], d
    _Q.Q8_K: [("d", 0, _F32)],  # f32 d, qs[256], bsums[16]
    _Q.IQ2_XXS: [("d", 0, _F16)],
    _Q.IQ2_XS: [("d", 0, _F16)],
    _Q.IQ2_S: [("d", 0, _F16)],
    _Q.IQ3_XXS: [("d", 0, _F16)],
    _Q.IQ3_S: [("d", 0, _F16)],
    _Q.IQ1_S: [("d", 0, _F16)],
    _Q.IQ4_NL: [("d", 0, _F16)],
    _Q.IQ4_XS: [("d", 0, _F16)],
    _Q.TQ1_0: [("d", _block_end(_Q.TQ1_0), _F16)],  # qs[48], qh[4], d
    _Q.TQ2_0: [("d", _block_end(_Q.TQ2_0), _F16)],  # qs[64], d
}
_CHUNK = 1 << 22  # elements or blocks scanned at a time, to bound temporary memory


def check_tensor_values(path, layout: GGUFLayout, tensor_names=None) -> None:
    """Scan tensor data for NaN/Inf: every element of F32/F16/BF16/F64 tensors, and the float
    scale fields (d, m, dmin) of every block of quantized tensors. Other types are not scanned.

    `layout` comes from validate_gguf(path); `tensor_names` limits the scan to those tensors.
    Raises BadGGUFError naming the tensor, the element or block index and its byte offset.
    """
    path = Path(path)
    tensors = layout.tensors
    if tensor_names is not None:
        by_name = {t.name: t for t in layout.tensors}
        missing = [name for name in tensor_names if name not in by_name]
        if missing:
            raise QpsaError(f"{path}: no tensor named {missing[0]!r}")
        tensors = [by_name[name] for name in tensor_names]
    with _open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
    if size != layout.file_size:
        raise BadGGUFError(path, "file size", size, f"the file is {size} bytes but was {layout.file_size} when validated")
    if not tensors:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for t in tensors:
        if t.ggml_type in _FLOAT_EXPONENTS:
            dtype, mask = _FLOAT_EXPONENTS[t.ggml_type]
            element_size = np.dtype(dtype).itemsize
            words = data[t.offset : t.offset + t.n_bytes].view(dtype)
            j, word = _first_nonfinite(words, mask)
            if j is not None:
                raise BadGGUFError(path, f"tensor {t.name!r} values", t.offset + j * element_size,
                                   f"element {j} is {_nan_or_inf(word, mask)}")
        elif t.ggml_type in SCALE_FIELDS:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
            blocks = data[t.offset : t.offset + t.n_bytes].reshape(-1, type_size)
            for field_name, field_offset, (dtype, mask) in SCALE_FIELDS[t.ggml_type]:
                field_size = np.dtype(dtype).itemsize
                scales = blocks[:, field_offset : field_offset + field_size].view(dtype)[:, 0]
                j, word = _first_nonfinite(scales, mask)
                if j is not None:
                    raise BadGGUFError(path, f"tensor {t.name!r} scale {field_name}", t.offset + j * type_size + field_offset,
                                       f"block {j}: scale {field_name} is {_nan_or_inf(word, mask)}")


def _first_nonfinite(words: np.ndarray, mask: int):
    """Index and raw bits of the first element whose exponent bits are all set, or (None, None)."""
    mask = words.dtype.type(mask)
    for start in range(0, len(words), _CHUNK):
        chunk = words[start : start + _CHUNK]
        bad = (chunk & mask) == mask
        if bad.any():
            j = int(np.argmax(bad))
            return start + j, int(chunk[j])
    return None, None


def _nan_or_inf(word: int, exponent_mask: int) -> str:
    mantissa_mask = (exponent_mask & -exponent_mask) - 1  # the bits below the exponent
    return "NaN" if word & mantissa_mask else "Inf"
