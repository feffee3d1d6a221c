"""A tiny valid GGUF file and a corpus of malformed variants, for testing qpsa.gguf.validate.

The valid file is written by gguf.GGUFWriter. Most malformed files patch its bytes at offsets
located with gguf.GGUFReader (which is fine on a file we wrote ourselves); the metadata cases
that need a shape GGUFWriter cannot produce (an empty key, a nested array, a 2^62-element
array in 60 bytes) are written raw with struct.

Each Case names the field that the BadGGUFError must mention, and the stage that must raise
it: "layout" (validate_gguf) or "values" (check_tensor_values).
"""

from __future__ import annotations

import functools
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

# Same-length names, so that one tensor can be renamed to another in place.
F32_TENSOR, F16_TENSOR, Q8_0_TENSOR = "w.f32", "w.f16", "w.q80"
STRING_ARRAY_KEY = "tokenizer.ggml.tokens"
TOKENS = ["<s>", "a", "bc", "é"]


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    field: str  # a substring of BadGGUFError.field (and so of its message)
    stage: str = "layout"  # "layout": validate_gguf raises; "values": check_tensor_values raises


# -- the valid file --

@functools.lru_cache(maxsize=None)
def valid_gguf() -> bytes:
    """A small valid GGUF: metadata of several types (incl. a string array) and three tensors."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.gguf"
        writer = GGUFWriter(path, "llama")  # also writes general.architecture = "llama"
        writer.add_name("tiny")
        writer.add_uint32("llama.block_count", 2)
        writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        writer.add_bool("tokenizer.ggml.add_bos_token", True)
        writer.add_uint64("test.uint64", 2**40)
        writer.add_int8("test.int8", -3)
        writer.add_float64("test.float64", 0.25)
        writer.add_array("test.int_array", [1, 2, 3])
        writer.add_array(STRING_ARRAY_KEY, TOKENS)
        writer.add_tensor(F32_TENSOR, rng.standard_normal((2, 8)).astype(np.float32))  # dims (8, 2)
        writer.add_tensor(F16_TENSOR, rng.standard_normal((3, 4)).astype(np.float16))  # dims (4, 3)
        q8_0 = quantize(rng.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
        writer.add_tensor(Q8_0_TENSOR, q8_0, raw_dtype=GGMLQuantizationType.Q8_0)  # dims (64, 2), 4 blocks
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@dataclass(frozen=True)
class KVOffsets:
    key_length: int  # uint64 key length; the key bytes follow
    type: int  # uint32 value type
    value: int  # the value (for an array: its uint32 element type)


@dataclass(frozen=True)
class TensorOffsets:
    name_length: int
    name: int
    n_dims: int
    dims: int  # n_dims x uint64
    ggml_type: int
    offset: int  # uint64, relative to the data section
    data: int  # absolute offset of the tensor's bytes


@functools.lru_cache(maxsize=None)
def valid_offsets() -> tuple[dict[str, KVOffsets], dict[str, TensorOffsets], GGUFReader]:
    """Byte offsets of the valid file's fields, found with GGUFReader."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.gguf"
        path.write_bytes(valid_gguf())
        reader = GGUFReader(path)
        reader.data = np.array(reader.data)  # detach from the file before it is deleted

    def part_offset(field, index: int) -> int:
        return field.offset + sum(int(part.nbytes) for part in field.parts[:index])

    kvs = {
        name: KVOffsets(field.offset, part_offset(field, 2), part_offset(field, 3))
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }
    tensors = {
        t.name: TensorOffsets(*(part_offset(t.field, i) for i in range(6)), data=t.data_offset)
        for t in reader.tensors
    }
    return kvs, tensors, reader


def string_element_length_offset(key: str, index: int) -> int:
    """Offset of the uint64 length of element `index` of a string array in the valid file."""
    _, _, reader = valid_offsets()
    field = reader.fields[key]
    # parts: key length, key, type, element type, count, then (length, bytes) per element
    return field.offset + sum(int(part.nbytes) for part in field.parts[: 5 + 2 * index])


# -- raw building blocks --

def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def header(*, version: int = 3, tensor_count: int = 0, kv_count: int = 0) -> bytes:
    return b"GGUF" + u32(version) + u64(tensor_count) + u64(kv_count)


def kv(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    """One metadata entry: key, uint32 type, then `payload` (the value's bytes, as given)."""
    return gguf_string(key) + u32(value_type) + payload


def metadata_only(*entries: bytes, padding: int = 0) -> bytes:
    """A file with no tensors and the given metadata entries (optionally zero bytes after)."""
    return header(kv_count=len(entries)) + b"".join(entries) + bytes(padding)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


# -- the corpus --

def malformed_cases() -> list[Case]:
    good = valid_gguf()
    kvs, tensors, reader = valid_offsets()
    t_f32, t_f16, t_q80 = tensors[F32_TENSOR], tensors[F16_TENSOR], tensors[Q8_0_TENSOR]
    V = GGUFValueType
    name_kv = kvs["general.name"]
    tokens_kv = kvs[STRING_ARRAY_KEY]
    q80_n_bytes = next(t.n_bytes for t in reader.tensors if t.name == Q8_0_TENSOR)
    nan32, inf16 = struct.pack("<f", float("nan")), struct.pack("<e", float("inf"))

    cases = [
        # header
        Case("empty_file", b"", "magic"),
        Case("bad_magic", patch(good, 0, b"GGML"), "magic"),
        Case("not_gguf_at_all", b"hello\n", "magic"),
        Case("version_1", patch(good, 4, u32(1)), "version"),
        Case("version_99", patch(good, 4, u32(99)), "version"),
        Case("version_big_endian", patch(good, 4, struct.pack(">I", 3)), "version"),
        Case("truncated_header", good[:13], "tensor_count"),
        Case("tensor_count_huge", patch(good, 8, u64(2**60)), "tensor_count"),
        Case("kv_count_huge", patch(good, 16, u64(2**62)), "kv_count"),
        # metadata keys
        Case("key_length_huge", patch(good, name_kv.key_length, u64(2**63)), "key"),
        Case("key_length_over_limit", metadata_only(kv("k" * 300, V.UINT8, b"\x01")), "key"),
        Case("key_beyond_eof", header(kv_count=1) + u64(100) + b"general.na", "key"),
        Case("empty_key", metadata_only(kv(b"", V.UINT8, b"\x01"), padding=8), "key"),
        Case("duplicate_key", metadata_only(kv("a.b", V.UINT8, b"\x01"), kv("a.b", V.UINT8, b"\x02")), "key"),
        Case("reserved_key", metadata_only(kv("GGUF.version", V.UINT32, u32(3))), "key"),
        Case("non_utf8_key", metadata_only(kv(b"gen\xff\xfe", V.UINT8, b"\x01")), "key"),
        # metadata values
        Case("unknown_value_type", patch(good, name_kv.type, u32(13)), "type"),
        Case("truncated_in_value_type", header(kv_count=1) + gguf_string("general.name") + b"\x08\x00", "type"),
        Case("string_length_2_40", metadata_only(kv("k", V.STRING, u64(2**40) + b"hello")), "value"),
        Case("string_value_beyond_eof", metadata_only(kv("general.name", V.STRING, u64(10) + b"tin")), "value"),
        # cut inside the metadata: fewer bytes remain than kv_count entries could possibly take
        Case("truncated_in_metadata", good[: name_kv.value + 9], "kv_count"),
        Case("bool_not_0_or_1", patch(good, kvs["tokenizer.ggml.add_bos_token"].value, b"\x07"), "value"),
        Case("array_2_62_elements", metadata_only(kv("k", V.ARRAY, u32(V.UINT8) + u64(2**62) + b"\x01" * 8)),
             "array length"),
        Case("array_count_huge_in_real_file", patch(good, tokens_kv.value + 4, u64(2**64 - 1)), "array length"),
        Case("nested_array", metadata_only(kv("k", V.ARRAY, u32(V.ARRAY) + u64(1) + u32(V.UINT8) + u64(1) + b"\x01")),
             "array type"),
        Case("array_unknown_type", metadata_only(kv("k", V.ARRAY, u32(13) + u64(1) + b"\x01" * 8)), "array type"),
        Case("non_utf8_string_element", patch(good, string_element_length_offset(STRING_ARRAY_KEY, 3) + 8, b"\xff"),
             "element 3"),
        Case("string_element_beyond_eof", patch(good, string_element_length_offset(STRING_ARRAY_KEY, 1), u64(2**40)),
             "element 1"),
        Case("alignment_uint64", metadata_only(kv("general.alignment", V.UINT64, u64(32))), "general.alignment"),
        Case("alignment_not_power_of_two", metadata_only(kv("general.alignment", V.UINT32, u32(48))),
             "general.alignment"),
        Case("alignment_0", metadata_only(kv("general.alignment", V.UINT32, u32(0))), "general.alignment"),
        Case("alignment_2_20", metadata_only(kv("general.alignment", V.UINT32, u32(2**20))), "general.alignment"),
        # tensor infos
        Case("n_dims_0", patch(good, t_f32.n_dims, u32(0)), "n_dims"),
        Case("n_dims_5", patch(good, t_f32.n_dims, u32(5)), "n_dims"),
        Case("zero_dimension", patch(good, t_f32.dims + 8, u64(0)), "dims"),
        # 2^33 * 2^33 = 2^66, which wraps to 0 in uint64 arithmetic
        Case("dims_product_overflows", patch(good, t_f32.dims, u64(2**33) + u64(2**33)), "dims"),
        Case("dim_over_int64", patch(good, t_f32.dims, u64(2**63 + 32)), "dims"),
        Case("unknown_ggml_type", patch(good, t_f16.ggml_type, u32(99)), "ggml_type"),
        Case("removed_ggml_type_q4_2", patch(good, t_f16.ggml_type, u32(4)), "ggml_type"),
        Case("row_not_multiple_of_block", patch(good, t_q80.dims, u64(48)), "dims"),
        Case("empty_tensor_name", patch(good, t_f16.name_length, u64(0)), "name"),
        Case("duplicate_tensor_name", patch(good, t_f16.name, F32_TENSOR.encode()), "name"),
        Case("non_utf8_tensor_name", patch(good, t_f16.name, b"w.\xc3\x28"), "name"),
        Case("tensor_name_length_huge", patch(good, t_q80.name_length, u64(2**40)), "name"),
        Case("tensor_name_beyond_eof", good[: t_q80.name + 2], "name"),
        Case("truncated_in_dims", good[: t_f16.dims + 12], "dims"),
        # data layout
        Case("offset_misaligned", patch(good, t_f16.offset, u64(t_f16.data - reader.data_offset + 2)),
             "offset"),
        Case("offset_beyond_file", patch(good, t_q80.offset, u64(2**40)), "offset"),
        Case("offset_2_64_minus_32", patch(good, t_q80.offset, u64(2**64 - 32)), "offset"),
        Case("overlapping_tensors", patch(good, t_f16.offset, u64(0)), "offset"),
        Case("truncated_data", good[: t_q80.data + q80_n_bytes - 16], "data"),  # the writer pads the end
        Case("no_data_section", good[: reader.data_offset], "offset"),
        # tensor values
        Case("nan_in_f32", patch(good, t_f32.data + 5 * 4, nan32), "values", stage="values"),
        Case("inf_in_f16", patch(good, t_f16.data + 7 * 2, inf16), "values", stage="values"),
        Case("inf_in_q8_0_scale", patch(good, t_q80.data + 1 * 34, inf16), "scale d", stage="values"),
        Case("nan_in_q8_0_scale", patch(good, t_q80.data, struct.pack("<H", 0x7E00)), "scale d", stage="values"),
    ]
    assert len({c.name for c in cases}) == len(cases)
    return cases
