"""The stored base: llama.cpp's `--kl-divergence-base` layout (uint16 log-probs per position) and
q-psa's base file with its JSON trailer, written and read (see `qpsa.eval.compare.run`)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.eval.perplexity import Windows
from qpsa.fsutil import replace_durably, temp_beside, user_file

CLIP_NATS = 16.0  # llama.cpp stores log-probs down to 16 nats below the top, and sums KLD over log p > −16
LEVELS = 65535  # uint16 codes

# llama.cpp's percentile lines, in its order: (label, fraction); None marks min/max/median


# ---- the stored base: llama.cpp's uint16 log-probs -----------------------------------------------


def row_width(n_vocab: int) -> int:
    """uint16 values per stored position: 4 (float32 step and floor) + V codes, padded to even V."""
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_log_probs(logits: torch.Tensor) -> np.ndarray:
    """Base logits (S, V) -> stored rows (S, row_width(V)) uint16, llama.cpp's layout and rounding."""
    x = logits.float()  # (S, V)
    S, V = x.shape
    top = x.max(dim=-1).values  # (S,)
    clip = torch.maximum(x.min(dim=-1).values, top - CLIP_NATS)  # (S,)
    log_sum_exp = torch.exp(x - top[:, None]).double().sum(dim=-1).log().float()  # (S,)
    floor = (clip - top) - log_sum_exp  # (S,) the log-prob that code 0 stands for
    step = (top - clip) / LEVELS  # (S,)
    inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    codes = torch.round((x - clip[:, None]) * inv[:, None])  # (S, V), half to even like llama.cpp's nearest_int
    codes = torch.where(x > clip[:, None], codes, torch.zeros_like(codes)).clamp_(0, LEVELS)
    rows = np.zeros((S, row_width(V)), dtype=np.uint16)
    rows[:, :4] = np.stack([step.numpy(), floor.numpy()], axis=1).astype("<f4").view("<u2")  # (S, 4)
    rows[:, 4 : 4 + V] = codes.to(torch.int32).numpy().astype(np.uint16)
    return rows


def decode_log_probs(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """Stored rows (S, row_width(V)) -> base log-probs (S, V) float32, as llama.cpp reads them."""
    rows = np.asarray(rows)
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")  # (S, 2): step, floor
    step = torch.from_numpy(head[:, 0].astype(np.float32))
    floor = torch.from_numpy(head[:, 1].astype(np.float32))
    codes = torch.from_numpy(rows[:, 4 : 4 + n_vocab].astype(np.int32)).float()  # (S, V)
    return step[:, None] * codes + floor[:, None]


# ---- the base file ----------------------------------------------------------------------------

# Layout (little-endian), llama.cpp's `--kl-divergence-base` file followed by a q-psa trailer:
#   b"_logits_"  uint32 ctx  int32 n_vocab  int32 n_chunk  int32 tokens[n_chunk·ctx]
#   per window, per scored position (ctx − 1 − ctx/2 of them): uint16[row_width(n_vocab)] (see above)
#   trailer: JSON metadata (UTF-8), uint64 its length, b"QPSABASE"
MAGIC = b"_logits_"
TRAILER_MAGIC = b"QPSABASE"
FORMAT = "q-psa base log-probs 1 (llama.cpp kl-divergence-base layout + JSON trailer)"
_HEAD = struct.Struct("<8sIii")


class BaseLogProbsWriter:
    """Writes a base file window by window into a temporary file beside `path`; `finish(meta)`
    appends the trailer and renames it over `path`, so a reader never sees a partial file."""

    def __init__(self, path, windows: Windows, n_vocab: int):
        self.path = Path(path)
        N, T = windows.tokens.shape
        if windows.score_from != T // 2:
            raise QpsaError("a base file needs llama.cpp's windows (second half scored), not --max-tokens")
        self.tmp = temp_beside(self.path)
        self.f = open(self.tmp, "wb")
        self.f.write(_HEAD.pack(MAGIC, T, n_vocab, N))
        self.f.write(windows.tokens.numpy().astype("<i4").tobytes())

    def write(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows, dtype="<u2").tobytes())

    def finish(self, meta: dict) -> Path:
        blob = json.dumps(meta, indent=1).encode("utf-8")
        self.f.write(blob + struct.pack("<Q", len(blob)) + TRAILER_MAGIC)
        self.f.close()
        replace_durably(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class BaseLogProbsFile:
    """A base file opened for reading: validated sizes, the windows' tokens, rows mapped lazily."""

    path: Path
    ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # (N, T) int32
    meta: dict | None  # the q-psa trailer; None for a file llama.cpp wrote
    _rows: np.ndarray = field(repr=False)  # (N, S, row_width) uint16, memory-mapped

    @property
    def n_scored(self) -> int:
        return self.ctx - 1 - self.ctx // 2

    def rows(self, i: int) -> np.ndarray:
        return np.asarray(self._rows[i])  # (S, row_width)

    @staticmethod
    def open(path) -> BaseLogProbsFile:
        path = Path(path)
        with user_file(path, "base file"):
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(_HEAD.size)
        if len(head) < _HEAD.size or head[:8] != MAGIC:
            raise QpsaError(f"{path}: not a base log-probs file (it does not start with {MAGIC.decode()!r})")
        _, ctx, n_vocab, n_chunk = _HEAD.unpack(head)
        if ctx < 4 or n_vocab < 1 or n_chunk < 1 or ctx > 1 << 24 or n_vocab > 1 << 24:
            raise QpsaError(f"{path}: bad header (ctx {ctx}, vocabulary {n_vocab}, chunks {n_chunk})")
        data_at = _HEAD.size + 4 * n_chunk * ctx
        n_scored = ctx - 1 - ctx // 2
        end = data_at + 2 * n_chunk * n_scored * row_width(n_vocab)
        if size < end:
            raise QpsaError(f"{path}: truncated: {size:,} bytes, {ctx}×{n_chunk} windows over a vocabulary of "
                            f"{n_vocab} need {end:,}")
        meta = _read_trailer(path, size, end)
        tokens = np.fromfile(path, dtype="<i4", count=n_chunk * ctx, offset=_HEAD.size).reshape(n_chunk, ctx)
        rows = np.memmap(path, dtype="<u2", mode="r", offset=data_at, shape=(n_chunk, n_scored, row_width(n_vocab)))
        return BaseLogProbsFile(path, ctx, n_vocab, n_chunk, tokens, meta, rows)


def _read_trailer(path: Path, size: int, end: int) -> dict | None:
    if size == end:
        return None  # llama.cpp's own file: no q-psa metadata
    with path.open("rb") as f:
        f.seek(size - 16)
        length, magic = struct.unpack("<Q8s", f.read(16))
        if magic != TRAILER_MAGIC or end + length + 16 != size:
            raise QpsaError(f"{path}: {size - end:,} unexpected bytes after the log-probs (not a q-psa trailer)")
        f.seek(end)
        try:
            meta = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise QpsaError(f"{path}: damaged metadata trailer: {e}") from None
    if not isinstance(meta, dict):
        raise QpsaError(f"{path}: damaged metadata trailer: not a JSON object")
    return meta
