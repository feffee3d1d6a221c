"""The model's weights as float tensors on demand: the GGUF's own bytes stay quantized in memory.

    store = WeightStore.from_gguf(gguf_file, config, dtype=torch.float32, device=torch.device("cpu"),
                                  budget=4 * 2**30)
    store.layer(3)["blk.3.attn_qkv.weight"]   # the forward's access: float, dequantized if not cached
    store["blk.3.attn_k.weight"]              # anyone else's: a view into the fused q|k|v, kept (pinned)
    store["blk.3.attn_k.weight"].add_(delta)  # ... so a write stays, exactly as in a dict of tensors

A *source* is what a float tensor is computed from: a GGUF tensor record (its bytes, memory-mapped,
never copied whole) or a float tensor handed in (a requantized model, the float64 copy for the
noise floor). A *unit* is what is dequantized and cached together: one layer (every `blk.{i}.`
tensor, with q|k|v, gate|up and the experts' gate|up stored fused, the per-name entries views into the fused matrices,
as `Transformer` always kept them), or one global tensor (`token_embd`, `output`, the norms).
The fused entries are the store's own (`is_fused(name)`), not the file's: a tensor the file has
under such a name (phi3's attn_qkv) is a file tensor used as it is, and a phi3 layer's ffn_up, which
holds gate|up already, is also handed out as `ffn_gate_up` (`alias_gate_up`, set by `Transformer`
from `ModelConfig.fused_gate_up`).

Dequantization writes a unit straight into its (fused) float buffer a few million weights at a
time, on the store's device, by the torch dequantizers of `qpsa.gguf.quants`: the values are bit
for bit those of a whole-tensor dequantization (blocks are independent), and no temporary is
larger than a chunk.

The cache. Units the forward asks for (`layer(i)`, `matrix(name)`) are kept while the float bytes
kept stay within `budget`; once full, later units are dequantized for their use and dropped (the
last one is remembered, so a layer's several lookups cost one dequantization). Nothing is evicted
to admit another: a forward visits layers 0..L-1 in a cycle, where evicting the least recently
used keeps nothing useful, and keeping the first units that fit gives every later pass that many
hits. A unit handed out through the mapping (`store[name]`, `items()`, assignment) is *pinned*:
kept whatever the budget, because its caller may write into it (Q-PSA moves, requantized tensors,
Fisher's `requires_grad`); a pinned unit is never re-dequantized, so edits are never lost. With a
budget at least the whole model (`resident=True`) every unit is built and pinned at once: the
float copy of the whole model, what `Transformer` always held, and the fast path.

The embedding is read by rows (`embedding(tokens)`): only the rows of the tokens asked for are
dequantized unless the whole table is cached.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

FUSED = (  # (parts, fused name, the axis of torch's shape they are stacked along)
    (("attn_q.weight", "attn_k.weight", "attn_v.weight"), "attn_qkv.weight", 0),
    (("attn_q.bias", "attn_k.bias", "attn_v.bias"), "attn_qkv.bias", 0),
    (("ffn_gate.weight", "ffn_up.weight"), "ffn_gate_up.weight", 0),
    # MoE (qwen3moe): the experts' gate | up, (E, F, C) each, as one (E, 2F, C) (qpsa.model.moe)
    (("ffn_gate_exps.weight", "ffn_up_exps.weight"), "ffn_gate_up_exps.weight", 1),
)
FUSED_NAMES = tuple(fused for _, fused, _ in FUSED)
GATE_UP_ALIAS = ("ffn_gate_up.weight", "ffn_up.weight")  # phi3: the file's ffn_up is gate|up (alias_gate_up)
CHUNK_WEIGHTS = 1 << 24  # weights dequantized per step (64 MB of float32; smaller steps cost 2x in per-call overhead)
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass
class QuantizedTensor:
    """A tensor's quantized bytes held in memory (a requantized tensor), read like a `GGUFTensor`."""

    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType
    raw: np.ndarray  # uint8, the GGML layout of qtype


def unit_of(name: str) -> int | str:
    """The unit a tensor belongs to: its layer index, or its own name for a global tensor."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else name


def dequantize_rows(record, rows: slice | np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 values of some rows of a GGUF tensor record (`GGUFTensor`), on `device`."""
    from qpsa.gguf.quants import GRIDS, dequantize

    shape = record.shape
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    raw = record.raw.reshape(n_rows, -1)[rows]
    out_shape = (raw.shape[0], shape[-1]) if len(shape) > 1 else (shape[-1],)
    grid = GRIDS.get(record.qtype)
    if grid is None:  # a type without a torch dequantizer: gguf's numpy one, on the CPU
        return dequantize(raw.reshape(-1), record.qtype, out_shape).to(device)
    blocks = torch.from_numpy(np.array(raw)).to(device).view(-1, grid.type_size)  # a copy: the map is read-only
    return grid.dequantize_torch(blocks).reshape(out_shape)


def fill_from_record(record, out: torch.Tensor) -> torch.Tensor:
    """Write a GGUF tensor's values into `out` (its shape, any float dtype and device), a few
    million weights at a time."""
    if out.dim() <= 1:
        out.copy_(dequantize_rows(record, slice(None), out.device).reshape(out.shape))
        return out
    if not out.is_contiguous():  # a part of a fused expert tensor, (E, F, C) in (E, 2F, C): expert by expert
        per = int(np.prod(out.shape[1:-1]))
        for e in range(out.shape[0]):
            _fill_rows(record, out[e].view(-1, out.shape[-1]), e * per)
        return out
    _fill_rows(record, out.view(-1, out.shape[-1]), 0)
    return out


def _fill_rows(record, flat: torch.Tensor, first: int) -> None:
    """flat (n, row) <- the record's rows first .. first + n, a few million weights at a time."""
    step = max(1, CHUNK_WEIGHTS // flat.shape[1])
    for start in range(0, flat.shape[0], step):
        stop = min(start + step, flat.shape[0])
        flat[start:stop] = dequantize_rows(record, slice(first + start, first + stop), flat.device)


class WeightStore(MutableMapping):
    """GGUF tensor name -> float tensor (dtype, device); see the module doc."""

    def __init__(self, sources: dict, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 budget: float = float("inf"), tied: bool | None = None):
        self.dtype = dtype
        self.device = torch.device(device)
        self.budget = budget
        self._sources = dict(sources)  # name -> GGUFTensor record or float tensor
        self._tied = ("output.weight" not in self._sources) if tied is None else tied
        self._units: dict[int | str, list[str]] = {}
        for name in self._sources:
            self._units.setdefault(unit_of(name), []).append(name)
        self._cache: dict[int | str, dict[str, torch.Tensor]] = {}  # unit -> its float tensors
        self._pinned: set[int | str] = set()
        self._last: tuple[int | str, dict[str, torch.Tensor]] | None = None
        self.generation = 0  # bumped on every assignment or deletion
        self.dequantized = 0  # units built so far (cache misses), for tests and reports
        self.dequantize_seconds = 0.0  # time spent building them (on a GPU: until the kernels were queued)
        self.resident = False
        self._gate_up_alias = False
        if budget == float("inf"):
            self.make_resident()

    def make_resident(self) -> None:
        """Build and keep every unit: the whole model in float, as the fast path holds it."""
        self.budget, self.resident = float("inf"), True
        for unit in list(self._units):
            self._pin(unit)

    def alias_gate_up(self) -> None:
        """A layer's ffn_up that holds gate|up (phi3's file, `ModelConfig.fused_gate_up`) is also
        `ffn_gate_up`, the name the forward multiplies by: the same tensor, an entry the store made."""
        self._gate_up_alias = True
        units = list(self._cache.items()) + ([self._last] if self._last is not None else [])
        for unit, tensors in units:
            for alias, name in self._aliases(unit, self._units[unit]).items():
                if name in tensors:
                    tensors[alias] = tensors[name]

    def is_fused(self, name: str) -> bool:
        """True for an entry the store made (q|k|v, gate|up, the experts' gate|up, phi3's ffn_gate_up
        alias) rather than a tensor of the file: a file's own attn_qkv (phi3) is not one."""
        return name.endswith(FUSED_NAMES) and name not in self._sources

    @classmethod
    def from_gguf(cls, gguf_file, dtype=torch.float32, device="cpu", budget=float("inf")) -> WeightStore:
        return cls(gguf_file.tensors, dtype=dtype, device=device, budget=budget)

    # ---- sizes -------------------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape without dequantizing it."""
        name = self._resolve(name)
        if name in self._sources:
            return tuple(self._sources[name].shape)
        unit = unit_of(name)
        return tuple(self._unit(unit, pin=False)[name].shape)

    def unit_bytes(self, unit: int | str) -> int:
        """Float bytes of a unit at the store's dtype."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(int(np.prod(self._sources[n].shape)) * size for n in self._units.get(unit, ()))

    def total_bytes(self) -> int:
        return sum(self.unit_bytes(u) for u in self._units)

    def layer_bytes(self) -> int:
        """The largest layer's float bytes: the least a budget must hold."""
        return max((self.unit_bytes(u) for u in self._units if isinstance(u, int)), default=0)

    def cached_bytes(self) -> int:
        return sum(self.unit_bytes(u) for u in self._cache)

    # ---- what the forward asks for (cached within the budget, never pinned) ---------------------

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Every float tensor of layer i, fused ones included, by GGUF name."""
        return self._unit(i, pin=False)

    def matrix(self, name: str) -> torch.Tensor:
        """A global tensor (the output head, a norm) as the forward uses it."""
        name = self._resolve(name)
        return self._unit(unit_of(name), pin=False)[name]

    def head_rows(self, name: str) -> torch.Tensor | Iterator[tuple[int, torch.Tensor]]:
        """A global matrix for a pass over its rows: the float tensor where it is cached or fits in the
        budget (as `matrix`), else an iterator of (first row, rows) dequantized from the file a few
        million weights at a time, so the whole float matrix (an 8B model's 2.1 GB head) never exists."""
        name = self._resolve(name)
        unit = unit_of(name)
        source = self._sources[name]
        if (unit in self._cache or (self._last is not None and self._last[0] == unit) or isinstance(source, torch.Tensor)
                or self.cached_bytes() + self.unit_bytes(unit) <= self.budget):
            return self.matrix(name)
        return self._rows_from_file(source)

    def _rows_from_file(self, source) -> Iterator[tuple[int, torch.Tensor]]:
        n_rows, width = int(np.prod(source.shape[:-1])), source.shape[-1]
        step = max(1, CHUNK_WEIGHTS // width)
        self.dequantized += 1
        for start in range(0, n_rows, step):
            t = time.perf_counter()
            rows = dequantize_rows(source, slice(start, min(start + step, n_rows)), self.device).to(self.dtype)
            self.dequantize_seconds += time.perf_counter() - t
            yield start, rows

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """F.embedding(tokens, token_embd) (…, C), dequantizing only the rows asked for unless cached."""
        unit = "token_embd.weight"
        tokens = tokens.to(self.device)
        if unit in self._cache or (self._last is not None and self._last[0] == unit):
            return F.embedding(tokens, self.matrix(unit))
        source = self._sources[unit]
        if isinstance(source, torch.Tensor):
            return F.embedding(tokens, self.matrix(unit))
        if self.cached_bytes() + self.unit_bytes(unit) <= self.budget:
            return F.embedding(tokens, self.matrix(unit))
        ids, inverse = torch.unique(tokens.cpu(), return_inverse=True)
        rows = dequantize_rows(source, ids.numpy(), self.device).to(self.dtype)
        return F.embedding(inverse.to(self.device), rows)

    # ---- the mapping (pins what it hands out) ---------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self._resolve(name)
        unit = unit_of(name)
        if unit not in self._units:
            raise KeyError(name)
        tensors = self._unit(unit, pin=True)
        if name not in tensors:
            raise KeyError(name)
        return tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        unit = unit_of(name)
        if unit in self._units:
            self._pin(unit)
        else:
            self._units[unit], self._cache[unit] = [], {}
            self._pinned.add(unit)
        if not self.is_fused(name):
            if name not in self._units[unit]:
                self._units[unit].append(name)
            self._sources[name] = value
        self._cache[unit][name] = value
        for alias, target in self._aliases(unit, self._units[unit]).items():
            if target == name:  # phi3: ffn_gate_up stays the same tensor as ffn_up
                self._cache[unit][alias] = value
        if name == "output.weight":
            self._tied = False
        self.generation += 1

    def __delitem__(self, name: str) -> None:
        unit = unit_of(name)
        if name not in self:
            raise KeyError(name)
        self._pin(unit)
        self._cache[unit].pop(name, None)
        self._sources.pop(name, None)
        if name in self._units[unit]:
            self._units[unit].remove(name)
        self.generation += 1

    def __iter__(self) -> Iterator[str]:
        for unit, names in self._units.items():
            if unit in self._cache:  # fused names included, in the order the unit was built
                yield from self._cache[unit]
                continue
            yield from names
            if isinstance(unit, int):
                p = f"blk.{unit}."
                for parts, fused, _ in FUSED:
                    if all(p + n in names for n in parts):
                        yield p + fused
                yield from self._aliases(unit, names)
        if self._tied and "token_embd.weight" in self._sources:
            yield "output.weight"

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name) -> bool:
        if not isinstance(name, str):
            return False
        name = self._resolve(name)
        unit = unit_of(name)
        if unit in self._cache:
            return name in self._cache[unit]
        names = self._units.get(unit, ())
        if name in names:
            return True
        p = f"blk.{unit}." if isinstance(unit, int) else ""
        return (any(name == p + fused and all(p + n in names for n in parts) for parts, fused, _ in FUSED)
                or name in self._aliases(unit, names))

    def release(self, names) -> None:
        """Unpin the units of `names`, whose caller has put back exactly the values it was handed (on
        demand they are dropped and rebuilt from their sources when next needed; resident, nothing changes)."""
        if self.resident:
            return
        for unit in {unit_of(self._resolve(n)) for n in names}:
            if unit in self._pinned and not isinstance(self._sources.get(self._units[unit][0]), torch.Tensor):
                self._pinned.discard(unit)
                self._cache.pop(unit, None)

    def fingerprint(self) -> tuple:
        """Changes whenever a weight may have changed: an assignment, or an in-place write into a
        tensor handed out (their version counters). Units rebuilt from the file never change."""
        versions = tuple((id(t), t._version) for unit in sorted(self._pinned, key=str)
                         for t in self._cache.get(unit, {}).values())
        return (self.generation, versions)

    # ---- internals ----------------------------------------------------------------------------

    def _resolve(self, name: str) -> str:
        return "token_embd.weight" if name == "output.weight" and self._tied else name

    def _pin(self, unit) -> None:
        if unit not in self._cache:
            self._cache[unit] = self._build(unit)
        self._pinned.add(unit)
        for name in self._units[unit]:  # a float source is not needed twice: its pinned copy is it now
            if isinstance(self._sources[name], torch.Tensor):
                self._sources[name] = self._cache[unit][name]

    def _unit(self, unit, pin: bool) -> dict[str, torch.Tensor]:
        if unit not in self._cache:
            if self._last is not None and self._last[0] == unit:
                tensors, self._last = self._last[1], None
            else:
                tensors = self._build(unit)
            if not pin and self.cached_bytes() + self.unit_bytes(unit) > self.budget:
                self._last = (unit, tensors)  # used now, dropped when the next unit is built
                return tensors
            self._cache[unit] = tensors
        if pin:
            self._pin(unit)
        return self._cache[unit]

    def _build(self, unit) -> dict[str, torch.Tensor]:
        """The float tensors of a unit, with q|k|v and gate|up in one buffer each."""
        self.dequantized += 1
        self._last = None  # free the previous transient unit before allocating this one
        start = time.perf_counter()
        try:  # never inference tensors, though the forward runs in inference mode: a unit may be pinned later and edited
            with torch.inference_mode(False):
                return self._build_unit(unit)
        finally:
            self.dequantize_seconds += time.perf_counter() - start

    def _build_unit(self, unit) -> dict[str, torch.Tensor]:
        names = self._units[unit]
        out: dict[str, torch.Tensor] = {}
        if isinstance(unit, int):
            p = f"blk.{unit}."
            for parts, fused, axis in FUSED:
                if not all(p + n in names for n in parts):
                    continue
                shapes = [tuple(self._sources[p + n].shape) for n in parts]
                if len({s[:axis] + s[axis + 1 :] for s in shapes}) != 1 or len(shapes[0]) <= axis:
                    continue
                size = list(shapes[0])
                size[axis] = sum(s[axis] for s in shapes)
                whole = torch.empty(size, dtype=self.dtype, device=self.device)
                start = 0
                for n, s in zip(parts, shapes):
                    out[p + n] = self._fill(p + n, whole.narrow(axis, start, s[axis]))
                    start += s[axis]
                out[p + fused] = whole
        for name in names:
            if name not in out:
                out[name] = self._fill(name, None)
        for alias, name in self._aliases(unit, names).items():
            out[alias] = out[name]
        return out

    def _aliases(self, unit, names) -> dict[str, str]:
        """alias -> the file tensor it names, for a layer whose ffn_up holds gate|up (no ffn_gate)."""
        if not self._gate_up_alias or not isinstance(unit, int):
            return {}
        p = f"blk.{unit}."
        alias, target = GATE_UP_ALIAS
        if p + target in names and p + "ffn_gate.weight" not in names and p + alias not in names:
            return {p + alias: p + target}
        return {}

    def _fill(self, name: str, out: torch.Tensor | None) -> torch.Tensor:
        source = self._sources[name]
        if isinstance(source, torch.Tensor):
            value = source.to(device=self.device, dtype=self.dtype)
            if out is None:
                return value
            return out.copy_(value)
        if out is None:
            out = torch.empty(tuple(source.shape), dtype=self.dtype, device=self.device)
        return fill_from_record(source, out)
