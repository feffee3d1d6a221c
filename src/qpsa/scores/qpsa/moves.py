"""Q-PSA's perturbations: ±1 moves of integer codes (or raw bytes) inside each block's grid,
re-encoded to bytes and re-dequantized, and the stratified samples and probes that choose them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qpsa.errors import QpsaError
from qpsa.gguf.quants import dequantize
from qpsa.scores.qpsa.settings import ALL_MATRICES, LAYER, STREAMS, QpsaSettings

# ---- perturbations ----------------------------------------------------------------------------


@dataclass
class Move:
    """A change of some bytes of a tensor and what it does to the dequantized weights."""

    blocks: np.ndarray  # indices of the changed blocks (U,)
    old: np.ndarray  # their bytes before (U, type_size)
    new: np.ndarray  # and after
    rows: np.ndarray  # changed weights: row (E,) int64
    cols: np.ndarray  # column (E,) int64
    delta: np.ndarray  # new value − old value (E,) float64, from the exact dequantizer

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.delta).all())


def _block_change(tensor, blocks: np.ndarray, old: np.ndarray, new: np.ndarray) -> Move:
    bs = tensor.block_size
    n = len(blocks) * bs
    v_old = dequantize(np.ascontiguousarray(old).reshape(-1), tensor.qtype, (n,)).double().numpy()
    v_new = dequantize(np.ascontiguousarray(new).reshape(-1), tensor.qtype, (n,)).double().numpy()
    with np.errstate(invalid="ignore"):
        delta = v_new - v_old
    changed = np.flatnonzero(~(delta == 0))  # NaN counts as changed
    flat = blocks[changed // bs].astype(np.int64) * bs + changed % bs
    ncols = tensor.shape[-1]
    return Move(blocks, old, new, flat // ncols, flat % ncols, delta[changed])


def move_codes(tensor, flat, moves) -> Move:
    """Add `moves` to the integer codes of the weights at flat indices `flat` (distinct), re-encode the
    blocks with the grid's `encode` (scales and mins kept byte for byte) and re-dequantize them."""
    grid = tensor.grid()
    flat = np.asarray(flat, dtype=np.int64).reshape(-1)
    moves = np.asarray(moves, dtype=np.int64).reshape(-1)
    bs = grid.block_size
    blocks, where = np.unique(flat // bs, return_inverse=True)
    old = np.array(tensor.blocks[blocks])
    codes, _ = grid.decode(old)
    codes = codes.astype(np.int64)
    np.add.at(codes, (where, flat % bs), moves)
    new = grid.encode(codes.astype(grid.code_dtype), old)
    return _block_change(tensor, blocks, old, new)


def move_byte(tensor, offset: int, step: int) -> Move:
    """The original study's move: raw byte `offset` of the tensor's data + step, modulo 256."""
    ts = tensor.type_size
    block = int(offset) // ts
    old = np.array(tensor.blocks[block : block + 1])
    new = old.copy()
    new[0, int(offset) % ts] = (int(old[0, int(offset) % ts]) + step) % 256
    return _block_change(tensor, np.array([block]), old, new)


def sample_rng(seed: int, layer: int, matrix: str, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, layer, ALL_MATRICES.index(matrix), STREAMS[stream]])


@dataclass
class MatrixPlan:
    """The perturbations of one matrix: `directions` in evaluation order, two per sample or probe."""

    layer: int
    matrix: str
    n_units: int  # weights, blocks or bytes in the matrix
    index: list  # the sampled units (exact: one per sample; probe: one list of N per probe)
    directions: list[Move]  # exact: (+, −) per kept sample; probe: (+s_k, −s_k) per kept probe
    kept: list[int]  # exact: the unit of each evaluated sample; probe: the number of each evaluated probe
    skipped: list[int]  # units (exact) or probes (probe) dropped because a perturbed weight is not finite
    n_redrawn: int = 0  # weight unit: draws redrawn because the code sat at an end of the grid
    n_pinned: int = 0  # block unit: codes kept in place because they sat at an end of the grid
    n_sampled: int = 0  # units per sample set (N, or fewer where fewer can move); probe: moved together

    def add(self, key: int, plus, minus, finite: bool) -> None:
        """Keep sample or probe `key`'s two directions, or skip it where a perturbed weight is not finite."""
        if finite:
            self.directions += [plus, minus]
            self.kept.append(key)
        else:
            self.skipped.append(key)


def _tensor_of(file, layer: int, matrix: str):
    name = f"blk.{layer}.{matrix}.weight"
    if name not in file.tensors:
        raise QpsaError(f"{file.path}: tensor {name} is missing")
    t = file.tensors[name]
    if len(t.shape) != 2:
        raise QpsaError(f"{file.path}: tensor {name} has shape {t.shape}, expected a matrix")
    return t


def _draw_distinct(rng, n_total: int, n: int, ok: np.ndarray | None) -> tuple[list[int], int]:
    """n distinct indices in [0, n_total), uniformly, one draw at a time; draws where `ok` is False are
    redrawn and counted. Where fewer than n indices qualify, all of them (in random order)."""
    n_ok = n_total if ok is None else int(ok.sum())
    if n_ok <= n:  # e.g. an all-zero F32 or Q4_1 matrix: every code at the grid's bottom end
        chosen = rng.permutation(n_total if ok is None else np.flatnonzero(ok)).tolist()
        return [int(i) for i in chosen], 0
    chosen: list[int] = []
    seen: set[int] = set()
    redrawn = 0
    while len(chosen) < n:
        i = int(rng.integers(n_total))
        if i in seen:
            continue
        if ok is not None and not ok[i]:
            redrawn += 1
            continue
        seen.add(i)
        chosen.append(i)
    return chosen, redrawn


class _Sampler:
    """One matrix's units, drawn from its seeded sample stream, and their moves."""

    def __init__(self, file, settings: QpsaSettings, layer: int, matrix: str):
        self.t = t = _tensor_of(file, layer, matrix)
        grid = t.grid()
        self.bs = grid.block_size
        self.rng = sample_rng(settings.seed, layer, matrix, "samples")
        self.prng = sample_rng(settings.seed, layer, matrix, "probes")
        self.n = settings.samples_per_matrix
        self.unit = settings.unit
        codes, step = grid.decode(t.blocks)
        self.at_end = (codes <= grid.code_min) | (codes >= grid.code_max)  # (n_blocks, block_size)
        if settings.unit == "weight":
            self.n_units = codes.size
            self.movable = ~self.at_end.reshape(-1) & np.isfinite(step.reshape(-1))
        else:
            self.n_units = codes.shape[0] if settings.unit == "block" else int(t.raw.nbytes)
            self.movable = None

    def draw(self) -> tuple[list[int], int]:
        return _draw_distinct(self.rng, self.n_units, self.n, self.movable)

    def block_moves(self, blocks: list[int], signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices and ±1 moves of every code of `blocks`; codes at an end stay in place (sign 0)."""
        signs = signs * ~self.at_end[blocks]
        return (np.asarray(blocks)[:, None] * self.bs + np.arange(self.bs)).reshape(-1), signs.reshape(-1)

    def probe(self) -> tuple[list[int], int, int, Move | None, Move | None]:
        """One probe: N fresh units with fresh random signs -> (units, redrawn, pinned, +s move, −s move);
        the moves are None where no unit can move."""
        index, redrawn = self.draw()
        if not index:
            return index, redrawn, 0, None, None
        pinned = 0
        if self.unit == "weight":
            flat, sg = np.asarray(index, dtype=np.int64), self.prng.integers(0, 2, size=len(index)) * 2 - 1
        else:
            flat, sg = self.block_moves(index, self.prng.integers(0, 2, size=(len(index), self.bs)) * 2 - 1)
            pinned = int(self.at_end[index].sum())
        return index, redrawn, pinned, move_codes(self.t, flat, sg), move_codes(self.t, flat, -sg)


def plan_matrix(file, settings: QpsaSettings, layer: int, matrix: str) -> MatrixPlan:
    """Draw the samples of one matrix (seeded by seed, layer, matrix) and build their perturbations.

    exact: N units, each moved alone (±1, or ± a random sign vector for blocks, or a byte ±1).
    probe: K probes, each with its own N units drawn afresh from the same stream (so probe 0's
    units are the exact estimator's N) and its own random signs, all N moved together."""
    sm = _Sampler(file, settings, layer, matrix)
    t = sm.t
    if settings.estimator == "exact":
        index, n_redrawn = sm.draw()
        plan = MatrixPlan(layer, matrix, sm.n_units, index, [], [], [], n_redrawn, 0, len(index))
        for u in index:
            if settings.unit == "weight":
                plus, minus = move_codes(t, [u], [1]), move_codes(t, [u], [-1])
            elif settings.unit == "block":
                flat, sg = sm.block_moves([u], sm.rng.integers(0, 2, size=(1, sm.bs)) * 2 - 1)
                plan.n_pinned += int(sm.at_end[u].sum())
                plus, minus = move_codes(t, flat, sg), move_codes(t, flat, -sg)
            else:
                plus, minus = move_byte(t, u, 1), move_byte(t, u, -1)
            plan.add(u, plus, minus, plus.finite and minus.finite)
        return plan

    # probe: every probe draws its own N units and signs, and moves them all together
    plan = MatrixPlan(layer, matrix, sm.n_units, [], [], [], [], 0, 0, 0)
    for k in range(settings.probes):
        index, redrawn, pinned, plus, minus = sm.probe()
        plan.index.append(index)
        plan.n_redrawn += redrawn
        plan.n_pinned += pinned
        plan.n_sampled = len(index)
        if plus is not None:
            plan.add(k, plus, minus, plus.finite and minus.finite)
    return plan


def plan_layer(file, settings: QpsaSettings, layer: int) -> MatrixPlan:
    """Layer-scope probes: probe k moves, together, the k-th probe's N units of *every* matrix of the
    layer (the same units and signs as `plan_matrix`'s probe k of each matrix), so one pair of
    directions estimates the mean per-unit value over the layer's 7·N moved units.

    The plan's `matrix` is LAYER, `n_units` the layer's total, `n_sampled` the units moved per
    probe, `index` one {matrix: units} per probe, and each direction a list of (matrix, Move)."""
    samplers = {m: _Sampler(file, settings, layer, m) for m in settings.matrices}
    plan = MatrixPlan(layer, LAYER, sum(sm.n_units for sm in samplers.values()), [], [], [], [], 0, 0, 0)
    for k in range(settings.probes):
        draws = {m: sm.probe() for m, sm in samplers.items()}
        plan.index.append({m: d[0] for m, d in draws.items()})
        plan.n_redrawn += sum(d[1] for d in draws.values())
        plan.n_pinned += sum(d[2] for d in draws.values())
        plan.n_sampled = sum(len(d[0]) for d in draws.values())
        moved = {m: d for m, d in draws.items() if d[3] is not None}
        if moved:
            plan.add(k, [(m, d[3]) for m, d in moved.items()], [(m, d[4]) for m, d in moved.items()],
                     all(d[3].finite and d[4].finite for d in moved.values()))
    return plan


def plan_unit(file, settings: QpsaSettings, layer: int, unit: str) -> MatrixPlan:
    """The plan of one checkpoint unit: a matrix, or LAYER for layer-scope probes."""
    return plan_layer(file, settings, layer) if unit == LAYER else plan_matrix(file, settings, layer, unit)
