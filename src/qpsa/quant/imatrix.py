"""llama.cpp's importance matrix, computed in q-psa's engine, and its two file formats.

For every weight matrix W (out × in) that llama-imatrix watches, the matrix holds, per input
column j, the sum over the rows x (activations entering W) that it saw of x_j², and the number of
such rows; llama-quantize weights each column's rounding error by in_sum2_j / count.

Which matrices: every matmul weight of a layer (`blk.N.*`) as the file names it: attn_q, attn_k,
attn_v, attn_output, ffn_gate, ffn_up, ffn_down (phi3: attn_qkv, attn_output, ffn_up = gate|up,
ffn_down; an MoE layer: the router and the stacked experts). q, k and v share one input, as gate
and up do, so their sums are equal. The output head and the token embedding are not collected (llama-imatrix's
default; `--process-output` adds the head).

Which rows (llama-imatrix's `compute_imatrix` with its defaults -b 2048 -ub 512):

1. The text is tokenized once (BOS first where the vocabulary adds it) and cut into windows of
   `ctx` tokens, window i = tokens [i·ctx, (i+1)·ctx), the first token of each replaced by BOS
   where the vocabulary adds it: the windows of `qpsa.eval.perplexity.make_windows`. At most
   `chunks` windows; at least 2·ctx tokens must exist.
2. Every position of a window is evaluated (all logits are requested), so every layer sees all
   of them; but llama.cpp decodes max(1, 2048 // ctx) windows per batch and splits each batch
   into micro-batches of at most 512 rows with an *equal* number of positions of each window
   (512 // S positions of each of the S windows in the batch), and llama-imatrix ignores a
   matmul over fewer than 16 rows. The positions of such a small last micro-batch are not
   counted: `collected_rows` gives the mask.

   Worked example, ctx 512: 4 windows per batch, micro-batches of 128 positions × 4 windows,
   every position counted (2,048 rows per batch). With 3 windows (`--chunks 3`) the micro-batches
   hold 170 positions × 3 windows = 510 rows, three of them, and the last 2 positions of each
   window form a micro-batch of 6 rows, which is skipped: counts 3 × 510 = 1,530.
3. `chunk_count` is the largest count divided by `chunk_size` (= ctx), rounded to nearest;
   `chunk_size` is ctx.

Files (`write`, `read`; the format is chosen by the output's suffix and detected by content):

* GGUF (llama.cpp's current format): `general.type = "imatrix"`, `imatrix.datasets` (array of
  strings), `imatrix.chunk_count` and `imatrix.chunk_size` (uint32), and per matrix NAME three F32
  tensors: `NAME.in_sum2` (GGUF ne = [in, n_mat]: raw sums, not means), `NAME.in_sum` (the sums of
  x, same shape; llama-imatrix writes them since 2025) and `NAME.counts` (ne = [1, n_mat]: rows
  seen, per expert for 3-D expert tensors, one per dense matrix). llama-imatrix's per-tensor
  `NAME.stats` summaries are not written (they are only shown by `--show-statistics`).
* Legacy `.dat`, little-endian: int32 entry count; per entry int32 name length, the name's
  bytes, int32 ncall, int32 nval, nval float32 = in_sum2/count · ncall, where ncall is the count
  in chunks (⌈count / chunk_size⌉); then int32 chunk count, int32 length and the dataset's name.
  Read back, its `counts` are ncall (so in_sum2/counts is the same mean) and `chunk_size` is 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.progress import Advance, no_progress

LLAMA_BATCH = 2048  # llama-imatrix's default -b: tokens per decode call
LLAMA_UBATCH = 512  # its default -ub: rows per micro-batch
MIN_ROWS = 16  # llama-imatrix ignores matmuls over fewer rows
WINDOW_BATCH = 4  # windows per forward here (any value gives the same sums to float rounding)

# The Transformer's fused matmuls (`linear_hook` and `expert_hook` names) and the GGUF matrices sharing each input.
SHARED_INPUT = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "attn_output": ("attn_output",),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_down": ("ffn_down",),
    "ffn_gate_inp": ("ffn_gate_inp",),  # an MoE layer's router
    "ffn_gate_up_exps": ("ffn_gate_exps", "ffn_up_exps"),  # its experts: one row of sums per expert
    "ffn_down_exps": ("ffn_down_exps",),
}
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class Imatrix:
    """Per matrix name: `in_sum2` float32 (n_mat, in) sums of x², `counts` int64 (n_mat,) rows
    seen, and `in_sum` float32 (n_mat, in) sums of x where known (None in legacy files)."""

    in_sum2: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    in_sum: dict[str, np.ndarray] | None = None
    legacy: bool = False  # read from a .dat: counts are in chunks, not rows
    path: str | None = field(default=None, compare=False)  # the file it was read from

    @property
    def names(self) -> list[str]:
        return sorted(self.in_sum2)

    def mean(self, name: str) -> np.ndarray:
        """in_sum2 / count per column, (n_mat, in): the weights llama-quantize uses (1 for every column
        of an expert no row was routed to, as llama-quantize reads such a GGUF entry)."""
        counts = self.counts[name]
        mean = self.in_sum2[name] / np.maximum(counts, 1)[:, None].astype(np.float32)
        if counts.size > 1 and (counts == 0).any():
            mean[counts == 0] = 1.0
        return mean

    def ranking(self) -> list[tuple[str, float]]:
        """(name, mean of in_sum2/count over its columns), largest first."""
        return sorted(((n, float(self.mean(n).mean())) for n in self.names), key=lambda r: -r[1])

    def summary(self, top: int = 10) -> dict:
        counts = sorted({int(c) for n in self.names for c in self.counts[n]})
        return {"tensors": len(self.in_sum2), "chunk_count": self.chunk_count, "chunk_size": self.chunk_size,
                "datasets": self.datasets, "counts": counts, "legacy": self.legacy,
                "top": [{"tensor": n, "mean_in_sum2": m} for n, m in self.ranking()[:top]]}

    # ---- checks ------------------------------------------------------------------------------

    def check_against(self, gguf_file) -> None:
        """QpsaError naming the first entry (in name order) that the model `gguf_file` (a
        `qpsa.gguf.read.GGUFFile`) lacks, whose size does not fit the model's tensor, whose counts
        are zero, or whose sums are negative or not finite."""
        where = f"imatrix {self.path or ''}".rstrip()
        for name in self.names:
            tensor = gguf_file.tensors.get(name)
            if tensor is None:
                raise QpsaError(f"{where}: tensor {name} is not in the model {gguf_file.path} "
                                "(an imatrix for another model?)")
            cols, n_mat = tensor.shape[-1], int(np.prod(tensor.shape[:-2], dtype=np.int64))
            sums, counts = self.in_sum2[name], self.counts[name]
            if sums.size != cols * n_mat or (not self.legacy and sums.shape[-1] != cols):
                raise QpsaError(f"{where}: {name} has {sums.size} values for {sums.shape[0]} matrices; the model's "
                                f"tensor {tuple(tensor.shape)} needs {n_mat} × {cols} (an imatrix for another model?)")
            if counts.size not in (1, n_mat):
                raise QpsaError(f"{where}: {name} has {counts.size} counts; the model's tensor has {n_mat} matrices")
            unused = (counts == 0).all() if n_mat > 1 else (counts == 0).any()  # some unused experts are allowed
            if unused or (counts < 0).any():
                raise QpsaError(f"{where}: {name} has a count of {int(counts.min())}: no rows were collected for it")
            if not np.isfinite(sums).all() or (sums < 0).any():
                raise QpsaError(f"{where}: {name} has sums of squares that are negative or not finite")

    # ---- writing -----------------------------------------------------------------------------

    def write(self, path: str | Path, arch: str | None = None) -> Path:
        """Write atomically: legacy `.dat` for that suffix, else GGUF."""
        path = Path(path)
        return self.write_dat(path) if path.suffix.lower() == ".dat" else self.write_gguf(path, arch)

    def write_gguf(self, path: str | Path, arch: str | None = None) -> Path:
        """llama.cpp's GGUF imatrix (module docstring); `arch` becomes general.architecture."""
        import gguf

        from qpsa.fsutil import atomic_output

        with atomic_output(path) as tmp:
            writer = gguf.GGUFWriter(tmp, arch or "", use_temp_file=False)
            if not arch:  # the writer always adds the key; llama-imatrix's files have none
                writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
            writer.add_type(gguf.GGUFType.IMATRIX)
            writer.add_array(KEY_DATASETS, list(self.datasets))
            writer.add_uint32(KEY_CHUNK_COUNT, self.chunk_count)
            writer.add_uint32(KEY_CHUNK_SIZE, self.chunk_size)
            for name in self.names:
                n_mat = self.counts[name].size
                writer.add_tensor(f"{name}.in_sum2", self.in_sum2[name].astype(np.float32).reshape(n_mat, -1))
                writer.add_tensor(f"{name}.counts", self.counts[name].astype(np.float32).reshape(n_mat, 1))
                if self.in_sum is not None and name in self.in_sum:
                    writer.add_tensor(f"{name}.in_sum", self.in_sum[name].astype(np.float32).reshape(n_mat, -1))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return Path(path)

    def write_dat(self, path: str | Path) -> Path:
        """llama.cpp's legacy format (module docstring): means scaled by the count in chunks."""
        from qpsa.fsutil import write_atomic

        chunk = self.chunk_size or 1
        out = [struct.pack("<i", len(self.in_sum2))]
        for name in self.names:
            raw = name.encode("utf-8")
            counts = self.counts[name]
            ncall = int(counts.max()) if self.legacy else -(-int(counts.max()) // chunk)
            values = (self.mean(name) * np.float32(ncall)).astype("<f4").ravel()
            out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
        dataset = (self.datasets[-1] if self.datasets else "").encode("utf-8")
        out += [struct.pack("<ii", self.chunk_count, len(dataset)), dataset]
        write_atomic(path, b"".join(out))
        return Path(path)


# ---- reading -------------------------------------------------------------------------------------


def read_imatrix(path: str | Path) -> Imatrix:
    """An imatrix file in either format, told apart by its first bytes (GGUF's magic)."""
    from qpsa.fsutil import user_file

    path = Path(path)
    with user_file(path, "imatrix file"), open(path, "rb") as f:
        head = f.read(4)
    result = _read_gguf(path) if head == b"GGUF" else _read_dat(path)
    result.path = str(path)
    return result


def _read_gguf(path: Path) -> Imatrix:
    from qpsa.gguf.read import open_gguf

    f = open_gguf(path)  # validated: every length and offset checked before use
    parts: dict[str, dict[str, np.ndarray]] = {}
    for tname, t in f.tensors.items():
        for suffix in ("in_sum2", "in_sum", "counts"):
            if tname.endswith("." + suffix):
                if t.qtype.name != "F32":
                    raise QpsaError(f"{path}: {tname} is {t.qtype.name}; imatrix tensors must be F32")
                parts.setdefault(tname[: -len(suffix) - 1], {})[suffix] = np.array(t.dequantize())
                break
    if not parts:
        raise QpsaError(f"{path}: not an importance matrix (no .in_sum2 tensors)")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in f.metadata]
    if missing:
        raise QpsaError(f"{path}: imatrix metadata {missing[0]} is missing")
    in_sum2, counts, in_sum = {}, {}, {}
    for name, p in sorted(parts.items()):
        if "in_sum2" not in p or "counts" not in p:
            raise QpsaError(f"{path}: {name} has {'no .counts' if 'in_sum2' in p else 'no .in_sum2'} tensor")
        n_mat = p["counts"].size
        sums = p["in_sum2"].reshape(-1)
        if sums.size % n_mat:
            raise QpsaError(f"{path}: {name} has {sums.size} sums for {n_mat} counts")
        in_sum2[name] = sums.reshape(n_mat, -1)
        counts[name] = np.rint(p["counts"].reshape(-1)).astype(np.int64)
        if "in_sum" in p and p["in_sum"].size == sums.size:
            in_sum[name] = p["in_sum"].reshape(n_mat, -1)
    datasets = f.metadata[KEY_DATASETS]
    return Imatrix(in_sum2, counts, [str(d) for d in (datasets if isinstance(datasets, list) else [datasets])],
                   int(f.metadata[KEY_CHUNK_COUNT]), int(f.metadata[KEY_CHUNK_SIZE]),
                   in_sum if len(in_sum) == len(in_sum2) else None)


def _read_dat(path: Path) -> Imatrix:
    from qpsa.fsutil import read_bytes

    data = read_bytes(path, "imatrix file")
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise QpsaError(f"{path}: not an imatrix file (GGUF or legacy .dat): {what} runs past the end "
                            f"at byte {pos}")
        pos += n
        return data[pos - n : pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries > len(data) // 12:
        raise QpsaError(f"{path}: not an imatrix file (GGUF or legacy .dat): entry count {n_entries}")
    in_sum2, counts = {}, {}
    for k in range(n_entries):
        try:
            name = take(i32(f"entry {k}'s name length"), f"entry {k}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise QpsaError(f"{path}: not an imatrix file: entry {k}'s name is not UTF-8") from None
        ncall, nval = i32(f"{name}'s call count"), i32(f"{name}'s value count")
        if nval < 1:
            raise QpsaError(f"{path}: {name} has {nval} values")
        in_sum2[name] = np.frombuffer(take(4 * nval, f"{name}'s values"), "<f4").astype(np.float32)[None, :]
        counts[name] = np.array([ncall], dtype=np.int64)
    chunk_count, datasets = 0, []
    if pos < len(data):  # optional trailer: chunk count, dataset name
        chunk_count = i32("the chunk count")
        if pos < len(data):
            n = i32("the dataset name's length")
            if n > 0:
                datasets.append(take(n, "the dataset name").decode("utf-8", errors="replace"))
    return Imatrix(in_sum2, counts, datasets, chunk_count, 0, None, legacy=True)


# ---- computing -----------------------------------------------------------------------------------


def collected_rows(n_windows: int, ctx: int, batch: int = LLAMA_BATCH, ubatch: int = LLAMA_UBATCH) -> torch.Tensor:
    """(n_windows, ctx) bool: the positions whose activations llama-imatrix adds (module docstring, 2)."""
    n_seq = max(1, batch // ctx)  # windows per decode call
    n_batch = min(batch, n_seq * ctx)  # tokens of one window per decode call
    rows = min(n_batch, ubatch)
    mask = torch.zeros(n_windows, ctx, dtype=torch.bool)
    for first in range(0, n_windows, n_seq):
        s = min(n_seq, n_windows - first)
        per_window = max(1, rows // s)  # the equal split: as many positions of each window
        for start in range(0, ctx, n_batch):
            end = min(start + n_batch, ctx)
            for a in range(start, end, per_window):
                b = min(a + per_window, end)
                if (b - a) * s >= MIN_ROWS:
                    mask[first : first + s, a:b] = True
    return mask


def imatrix_units(windows: torch.Tensor, batch_size: int = WINDOW_BATCH) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The units of an importance matrix over `windows` (N, ctx), in window order: "windows A-B" ->
    (tokens (B, ctx), collected mask (B, ctx)) of `batch_size` windows each."""
    n, ctx = windows.shape
    mask = collected_rows(n, ctx)
    return {f"windows {first}-{min(n, first + batch_size) - 1}":
            (windows[first : first + batch_size], mask[first : first + batch_size])
            for first in range(0, n, batch_size)}


def compute_imatrix(model, windows: torch.Tensor, dataset: str, advance: Advance = no_progress,
                    batch_size: int = WINDOW_BATCH, executor=None, checkpoint=None) -> Imatrix:
    """The importance matrix of `model` (a `qpsa.model.transformer.Transformer`) over `windows`
    (N, ctx) token ids cut as `make_windows` cuts them; `advance()` after each window.

    Sums are accumulated in float64 over the rows of `collected_rows` and stored as float32. One
    forward of `batch_size` windows is one unit, run by `executor` (`qpsa.parallel`; default this
    process); the units' sums are added in window order whatever order they finish in
    (`qpsa.quant.imatrix_sums.UnitSums`), so the result is the same bit for bit wherever they ran.
    `checkpoint` (an `ImatrixCheckpoint` already checked against this run) brings the units an
    interrupted run finished, and is saved after every unit that finishes here."""
    from qpsa.parallel import Job, LocalExecutor
    from qpsa.quant.imatrix_sums import UnitSums

    ctx = windows.shape[1]
    units = imatrix_units(windows, batch_size)
    state = checkpoint.state if checkpoint is not None else UnitSums(list(units))
    if state.order != list(units):
        raise QpsaError("the imatrix checkpoint's units are not this run's; delete it to start over")
    done = state.finished()
    todo = {key: unit for key, unit in units.items() if key not in done}

    def finished(key: str, part: dict) -> None:
        state.add(key, part)
        if checkpoint is not None:
            checkpoint.save()
        advance(steps=units[key][0].shape[0])

    job = Job("qpsa.quant.imatrix:setup_imatrix", "qpsa.quant.imatrix:window_sums", None,
              str(model.dtype).removeprefix("torch."), load=model.load_options, local_state=model)
    if todo:
        (executor or LocalExecutor()).run(job, todo, finished)
    if not state.complete:
        raise QpsaError(f"the imatrix has {state.added} of {len(units)} units summed: some unit never finished")
    sum2 = {k: v[0] for k, v in state.sums.items()}
    sum1 = {k: v[1] for k, v in state.sums.items()}
    count = {k: v[2] for k, v in state.sums.items()}

    in_sum2, in_sum, counts = {}, {}, {}
    for (layer, fused), s2 in sum2.items():
        parts = [p for p in SHARED_INPUT[fused] if f"blk.{layer}.{p}.weight" in model.weights]
        for part in parts or [fused]:  # none: the file stores the fused matrix itself (phi3's attn_qkv)
            name = f"blk.{layer}.{part}.weight"
            if name in model.weights:  # (n_mat, in): one row, or one per expert
                in_sum2[name] = s2.float().cpu().numpy().reshape(-1, s2.shape[-1])
                in_sum[name] = sum1[(layer, fused)].float().cpu().numpy().reshape(-1, s2.shape[-1])
                c = count[(layer, fused)]
                counts[name] = np.array(c.cpu().numpy() if isinstance(c, torch.Tensor) else c, dtype=np.int64).reshape(-1)
    top = max((int(c.max()) for c in counts.values()), default=0)
    return Imatrix(in_sum2, counts, [dataset], (top + ctx // 2) // ctx, ctx, in_sum)


def setup_imatrix(loaded, args) -> object:
    """A worker's state for `window_sums`: its model."""
    return loaded.model


def window_sums(model, unit: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """One unit of an importance matrix: (layer, fused matrix) -> (Σx², Σx float64, rows) over the
    collected positions (`mask`, (B, T) bool) of one forward over the windows `tokens` (B, T)."""
    tokens, mask = unit
    sums: dict = {}

    def hook(layer: int, fused: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = x[mask.to(x.device)]  # (R, in): the collected positions
        s2, s1, n = rows.square().sum(0, dtype=torch.float64), rows.sum(0, dtype=torch.float64), rows.shape[0]
        if (layer, fused) in sums:
            before = sums[(layer, fused)]
            s2, s1, n = before[0] + s2, before[1] + s1, before[2] + n
        sums[(layer, fused)] = (s2, s1, n)
        return y

    def expert_hook(layer: int, fused: str, e: int, token_rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        # llama-imatrix adds every routed row of an indirect matmul (no 16-row minimum, no mask)
        key = (layer, fused)
        if key not in sums:
            shape = (model.config.n_expert, x.shape[-1])
            sums[key] = (torch.zeros(shape, dtype=torch.float64, device=x.device),
                         torch.zeros(shape, dtype=torch.float64, device=x.device),
                         torch.zeros(shape[0], dtype=torch.int64, device=x.device))
        s2, s1, n = sums[key]
        s2[e] += x.square().sum(0, dtype=torch.float64)
        s1[e] += x.sum(0, dtype=torch.float64)
        n[e] += x.shape[0]
        return y

    previous, previous_expert = model.linear_hook, model.expert_hook
    model.linear_hook, model.expert_hook = hook, expert_hook
    try:
        with torch.inference_mode():
            model.run_layers(model.embed(tokens), range(model.config.n_layer),
                             torch.arange(tokens.shape[1], device=model.device))
    finally:
        model.linear_hook, model.expert_hook = previous, previous_expert
    # on the CPU: a unit's result travels back from a Ray worker whatever device the worker computed on
    return {k: (s2.cpu(), s1.cpu(), n.cpu() if isinstance(n, torch.Tensor) else n) for k, (s2, s1, n) in sums.items()}
