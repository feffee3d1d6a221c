"""Q-PSA done right: how much does moving a layer's weights by one quantization step cost?

Definitions (the full derivation and the rules at the grid's ends are in docs/qpsa.md):

* A *sample* moves one unit of a matrix in both directions and measures, over the evaluation
  tokens, ΔNLL(±) = mean NLL(perturbed ±) − mean NLL(base) and ΔPPL(±) = PPL(±) − PPL(base)
  (computed as PPL(base)·expm1(ΔNLL) so no digits are lost). Its Q-PSA value is the
  bidirectional average ½(ΔPPL(+) + ΔPPL(−)); ½(ΔNLL(+) + ΔNLL(−)) is stored beside it, and
  ½|ΔNLL(+) − ΔNLL(−)| is the first-order (one-sided) magnitude.
* Units (`unit`): "weight" moves one weight's integer code by ±1 in its block's grid;
  "block" moves every code of one block by ±1 with random signs (the sign vector and its
  negation); "byte" moves one raw byte of the tensor by ±1 (the original study's protocol).
  Every move is written back to bytes and the block re-dequantized with the exact dequantizer,
  so the perturbation is the one llama.cpp would compute from those bytes.
* Sampling is stratified: `samples_per_matrix` units per matrix (attn_q, attn_k, attn_v,
  attn_output, ffn_gate, ffn_up, ffn_down), drawn without replacement by
  numpy's default_rng([seed, layer, matrix index, stream]), so a layer's samples do not depend on
  which other layers are run.
* Estimators: "exact" evaluates every sample on its own (both directions); "probe" draws, for each
  of K probes, N fresh units of a matrix and moves them together with random signs
  s ∈ {±1}^N, both ±s, and divides the bidirectional average by N: an unbiased estimate, to
  second order, of the mean per-unit value (cross terms s_j s_k H_jk vanish in expectation;
  Hutchinson); the spread over the K independent probes gives its standard error. With
  `probe_scope="layer"` (the default) one probe moves the N units of *each* of the layer's 7
  matrices together (7N units) and estimates the layer score directly, 7× cheaper per probe;
  "matrix" probes each matrix on its own and gives the per-matrix breakdown.
* Layer score ("score"): the mean over the layer's 7 matrices of the per-matrix mean value
  (equal weight per matrix, since sampling is stratified), se by propagation. Everything else
  (per-matrix means, ΔNLL versions, first-order magnitudes, weight-count-weighted totals,
  noise floor, skips) is detail.

Evaluation recomputes only the layers from the perturbed one onward, from the cached hidden
states entering it, with B perturbations in one batch: `Transformer.linear_hook` adds δ·x[..., j]
to output column o of batch element b for each changed weight W[o, j] of that element, so the
weights themselves are never copied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.gguf.quants import dequantize
from qpsa.scores.base import EvalTokens, LayerScores, LayerStates

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
UNITS = ("weight", "block", "byte")
ESTIMATORS = ("exact", "probe")
PROBE_SCOPES = ("layer", "matrix")
# probes per layer (scope layer) or per matrix (scope matrix): ~410 and ~480 forward equivalents for
# SmolLM2 at N = 100 (30 layers × 2 directions × K (×7 matrices) × ~0.57 equivalents per direction)
DEFAULT_PROBES = {"layer": 12, "matrix": 2}
LAYER = "layer"  # the unit key's matrix part for a layer-scope probe
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_PRECISION = {"exact": "float64", "probe": "float32"}
DEFAULT_BATCH = 8  # no speed-up from larger batches on 2 CPU cores (GEMMs over 500 tokens already saturate them)
ALGORITHM = 1  # bump when a change alters the numbers for the same settings (checkpoints compare it)

FLOOR_LAYER = 0  # the noise floor is measured here: the most recomputation, so the largest floor
FLOOR_SAMPLES_PER_MATRIX = 1  # exact: this many samples of each matrix of FLOOR_LAYER (probe: 1 probe)
_STREAMS = {"samples": 0, "probes": 1}
# float64 rounding relative to float32's: used to scale the measured float32 floor to float64's
ROUNDOFF_RATIO = 2.0**-52 / 2.0**-23


@dataclass(frozen=True)
class QpsaSettings:
    samples_per_matrix: int = 100
    seed: int = 42
    max_tokens: int = 500
    unit: str = "weight"
    estimator: str = "exact"
    probes: int | None = None  # None: DEFAULT_PROBES of the scope
    precision: str | None = None  # None: float64 for exact, float32 for probe
    batch_size: int = DEFAULT_BATCH
    probe_scope: str = "layer"

    def __post_init__(self):
        def whole(name, v, low):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise QpsaError(f"--{name} must be an integer ≥ {low} (got {v!r})")

        whole("samples-per-matrix", self.samples_per_matrix, 1)
        whole("seed", self.seed, 0)
        whole("max-tokens", self.max_tokens, 2)
        if self.probe_scope not in PROBE_SCOPES:
            raise QpsaError(f"--probe-scope must be one of {', '.join(PROBE_SCOPES)} (got {self.probe_scope!r})")
        if self.probes is None:
            object.__setattr__(self, "probes", DEFAULT_PROBES[self.probe_scope])
        whole("probes", self.probes, 1)
        whole("batch-size", self.batch_size, 1)
        if self.unit not in UNITS:
            raise QpsaError(f"--unit must be one of {', '.join(UNITS)} (got {self.unit!r})")
        if self.estimator not in ESTIMATORS:
            raise QpsaError(f"--estimator must be one of {', '.join(ESTIMATORS)} (got {self.estimator!r})")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise QpsaError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.estimator == "probe" and self.unit == "byte":
            raise QpsaError("--estimator probe needs --unit weight or block: raw byte moves are not sign-symmetric "
                            "and one scale hit makes a whole probe non-finite (use --estimator exact)")

    @property
    def resolved_precision(self) -> str:
        return self.precision or DEFAULT_PRECISION[self.estimator]

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.resolved_precision]

    def to_dict(self) -> dict:
        """Every setting that changes the numbers."""
        d = {"estimator": self.estimator, "unit": self.unit, "samples_per_matrix": self.samples_per_matrix,
             "seed": self.seed, "max_tokens": self.max_tokens, "precision": self.resolved_precision,
             "batch_size": self.batch_size, "algorithm": ALGORITHM}
        if self.estimator == "probe":
            d["probes"] = self.probes
            d["probe_scope"] = self.probe_scope
        return d

    @property
    def layer_probes(self) -> bool:
        return self.estimator == "probe" and self.probe_scope == "layer"

    @property
    def units_of_layer(self) -> tuple[str, ...]:
        """The checkpoint units of one layer: its matrices, or the whole layer for layer-scope probes."""
        return (LAYER,) if self.layer_probes else MATRICES


def parse_layers(spec: str | None, n_layer: int) -> list[int]:
    """"0-5,9" -> [0, 1, 2, 3, 4, 5, 9]; None -> every layer. Out of range, duplicates, empty: QpsaError."""
    if spec is None:
        return list(range(n_layer))
    layers: list[int] = []
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise QpsaError(f"--layers {spec!r}: empty item (write e.g. 0-5,9)")
    for part in parts:
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise QpsaError(f"--layers {spec!r}: {part!r} is not a layer number or a range like 0-5") from None
        if b < a:
            raise QpsaError(f"--layers {spec!r}: range {part!r} runs backwards")
        for i in range(a, b + 1):
            if not 0 <= i < n_layer:
                raise QpsaError(f"--layers {spec!r}: layer {i} is out of range; the model has {n_layer} layers (0..{n_layer - 1})")
            if i in layers:
                raise QpsaError(f"--layers {spec!r}: layer {i} is given twice")
            layers.append(i)
    return sorted(layers)


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
    return np.random.default_rng([seed, layer, MATRICES.index(matrix), _STREAMS[stream]])


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
    samplers = {m: _Sampler(file, settings, layer, m) for m in MATRICES}
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


# ---- batched evaluation -----------------------------------------------------------------------


def chunked_nll(model, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """NLL (float64) of every scored token (T−1,) from one final hidden state h (1, T, C), through
    `Transformer.head_nll` (the output head a vocabulary chunk at a time, logsumexp − target logit).

    The base and every perturbed model go through this same function, so their difference carries no
    rounding from two different code paths."""
    return model.head_nll(h[:, :-1], tokens[:, 1:])[0].double()


class Evaluator:
    """ΔNLL of perturbed models, B perturbations per batch, recomputing layers i … L−1 only."""

    def __init__(self, model, tokens: torch.Tensor, batch_size: int = DEFAULT_BATCH):
        self.model = model
        self.batch_size = batch_size
        self.states = LayerStates(model, tokens)
        self.tokens = tokens
        with torch.inference_mode():
            self.base_nll = chunked_nll(model, self.states.states[-1], tokens)  # (T−1,)
        self.base_mean = float(self.base_nll.mean())
        self.n_directions = 0  # directions evaluated so far (cost accounting)
        self.n_layer_passes = 0.0  # Σ over directions of the fraction of layers recomputed

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_mean)

    def dnll(self, layer: int, matrix: str | None, moves: list) -> np.ndarray:
        """ΔNLL (mean over the scored tokens) of each perturbation of layer `layer`: a Move of
        `matrix`, a list of (matrix, Move) moved together, or None (no perturbation)."""
        out = np.empty(len(moves))
        B = self.batch_size
        for start in range(0, len(moves), B):
            chunk = moves[start : start + B]
            out[start : start + len(chunk)] = self._batch(layer, matrix, chunk)
        return out

    def _batch(self, layer: int, matrix: str | None, moves: list) -> np.ndarray:
        model, L = self.model, self.model.config.n_layer
        dev = self.tokens.device
        parts: dict[str, tuple[list, list, list, list]] = {}  # fused weight -> batch, row, column, δ
        for b, mv in enumerate(moves):
            for name, m in ([] if mv is None else [(matrix, mv)] if isinstance(mv, Move) else mv):
                if len(m.rows) == 0:
                    continue
                fused, offset = model.fused_rows(layer, name)
                b_idx, rows, cols, deltas = parts.setdefault(fused, ([], [], [], []))
                b_idx.append(np.full(len(m.rows), b))
                rows.append(m.rows + offset)
                cols.append(m.cols)
                deltas.append(m.delta)
        if parts:
            t_idx = torch.arange(self.tokens.shape[1], device=dev)
            changes = {
                fused: (torch.from_numpy(np.concatenate(b)).to(dev), torch.from_numpy(np.concatenate(r)).to(dev),
                        torch.from_numpy(np.concatenate(c)).to(dev),
                        torch.from_numpy(np.concatenate(d)).to(device=dev, dtype=model.dtype))
                for fused, (b, r, c, d) in parts.items()}

            def hook(i, name, x, y):
                if i != layer or name not in changes:
                    return y
                bi, ri, ci, dv = changes[name]
                contrib = x[bi, :, ci] * dv[:, None]  # (E, T): δ·x[..., j] for each changed W[o, j]
                return y.index_put_((bi[:, None], t_idx[None, :], ri[:, None]), contrib, accumulate=True)

            model.linear_hook = hook
        try:
            with torch.inference_mode():
                h = self.states.states[layer].expand(len(moves), -1, -1)
                h = model.run_layers(h, range(layer, L), self.states.positions)
                res = np.empty(len(moves))
                for b in range(len(moves)):  # the output head one element at a time
                    nll = chunked_nll(model, h[b : b + 1], self.tokens)
                    res[b] = float((nll - self.base_nll).mean())
        finally:
            model.linear_hook = None
        self.n_directions += len(moves)
        self.n_layer_passes += len(moves) * (L - layer) / L
        return res


def _other_precision(model) -> torch.nn.Module:
    """A copy of `model` in the other float precision (float32 <-> float64), for the noise floor."""
    from qpsa.model.transformer import Transformer

    other = torch.float64 if model.dtype == torch.float32 else torch.float32
    w = model.weights
    weights = {k: v for k, v in w.items() if "_qkv." not in k and "_gate_up." not in k
               and not (k == "output.weight" and v is w.get("token_embd.weight"))}
    return Transformer(model.config, weights, dtype=other)


# ---- per-unit results and aggregation ---------------------------------------------------------


def evaluate_plan(ev: Evaluator, plan: MatrixPlan) -> dict:
    """Evaluate a matrix's plan; the raw result that checkpoints and details store."""
    start = time.perf_counter()
    d = ev.dnll(plan.layer, plan.matrix, plan.directions) if plan.directions else np.empty(0)
    plus, minus = d[0::2], d[1::2]
    ok = np.isfinite(plus) & np.isfinite(minus)
    kept = [k for k, good in zip(plan.kept, ok) if good]
    skipped = plan.skipped + [k for k, good in zip(plan.kept, ok) if not good]
    return {"layer": plan.layer, "matrix": plan.matrix, "n_units": plan.n_units, "n_sampled": plan.n_sampled,
            "sampled": plan.index, "kept": kept, "skipped": skipped,
            "dnll_plus": [float(x) for x in plus[ok]], "dnll_minus": [float(x) for x in minus[ok]],
            "n_redrawn": plan.n_redrawn, "n_pinned": plan.n_pinned,
            "n_directions": len(plan.directions), "seconds": time.perf_counter() - start}


def sample_values(raw: dict, base_ppl: float, estimator: str) -> dict[str, np.ndarray]:
    """Per sample (exact) or per probe (probe, divided by N): value (ΔPPL), value_nll, first_order."""
    p, m = np.asarray(raw["dnll_plus"], dtype=np.float64), np.asarray(raw["dnll_minus"], dtype=np.float64)
    scale = 1.0 / max(raw["n_sampled"], 1) if estimator == "probe" else 1.0
    return {"value": base_ppl * 0.5 * (np.expm1(p) + np.expm1(m)) * scale,
            "value_nll": 0.5 * (p + m) * scale,
            "first_order": 0.5 * np.abs(p - m)}


def _mean_se(x: np.ndarray) -> tuple[float, float | None]:
    if len(x) == 0:
        return math.nan, None
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def matrix_summary(raw: dict, base_ppl: float, estimator: str, floor: float | None) -> dict:
    v = sample_values(raw, base_ppl, estimator)
    mean, se = _mean_se(v["value"])
    mean_nll, se_nll = _mean_se(v["value_nll"])
    fo = v["first_order"]
    if estimator == "probe":  # E[(Σ s_j g_j δ_j)²] = Σ (g_j δ_j)²: RMS per unit = sqrt(mean(fo²)/N)
        first_order = float(np.sqrt((fo**2).mean() / raw["n_sampled"])) if len(fo) else math.nan
        first_order_rms = first_order
    else:
        first_order = float(fo.mean()) if len(fo) else math.nan
        first_order_rms = float(np.sqrt((fo**2).mean())) if len(fo) else math.nan
    n_below = int((np.abs(v["value"]) < floor).sum()) if floor is not None else None
    return {"mean": mean, "se": se, "mean_nll": mean_nll, "se_nll": se_nll, "first_order": first_order,
            "first_order_rms": first_order_rms, "n_samples": len(fo), "n_skipped": len(raw["skipped"]),
            "n_redrawn": raw["n_redrawn"], "n_pinned": raw["n_pinned"], "n_units": raw["n_units"],
            # a layer-scope probe moves N units of each matrix, not units in proportion to the matrices'
            # sizes, so it has no weight-count-weighted total
            "total_nll": None if raw["matrix"] == LAYER else raw["n_units"] * mean_nll,
            "total_nll_se": None if se_nll is None or raw["matrix"] == LAYER else raw["n_units"] * se_nll,
            "n_below_floor": n_below, "below_floor": n_below / len(fo) if n_below is not None and len(fo) else None}


def _propagate(ses: list[float | None], weights: list[float]) -> float | None:
    if any(s is None for s in ses):
        return None
    return math.sqrt(sum((w * s) ** 2 for w, s in zip(weights, ses)))


def layer_summary(per_matrix: dict[str, dict]) -> dict:
    """The layer's score from its matrices' summaries, or from its one LAYER summary (layer-scope
    probes: the mean per unit over the 7·N units moved together, which weights the matrices equally
    when each gave N units; no weight-count-weighted total)."""
    if LAYER in per_matrix:
        m = per_matrix[LAYER]
        return {"score": m["mean"], "se": m["se"], "score_nll": m["mean_nll"], "se_nll": m["se_nll"],
                "total_nll": None, "total_nll_se": None, "total_ppl": None, "first_order": m["first_order"],
                **{k: m[k] for k in ("n_samples", "n_skipped", "n_redrawn", "n_pinned", "n_below_floor",
                                     "below_floor")}}
    ms = [per_matrix[m] for m in MATRICES]
    k = len(ms)
    score = sum(m["mean"] for m in ms) / k
    below = [m["n_below_floor"] for m in ms]
    n = sum(m["n_samples"] for m in ms)
    n_below = None if any(b is None for b in below) else sum(below)
    return {
        "score": score, "se": _propagate([m["se"] for m in ms], [1 / k] * k),
        "score_nll": sum(m["mean_nll"] for m in ms) / k, "se_nll": _propagate([m["se_nll"] for m in ms], [1 / k] * k),
        "total_nll": sum(m["total_nll"] for m in ms),
        "total_nll_se": _propagate([m["se_nll"] for m in ms], [m["n_units"] for m in ms]),
        "total_ppl": sum(m["n_units"] * m["mean"] for m in ms),
        "first_order": sum(m["first_order"] for m in ms) / k,
        "n_samples": n, "n_skipped": sum(m["n_skipped"] for m in ms), "n_redrawn": sum(m["n_redrawn"] for m in ms),
        "n_pinned": sum(m["n_pinned"] for m in ms),
        "n_below_floor": n_below, "below_floor": None if n_below is None or n == 0 else n_below / n,
    }


# ---- the noise floor --------------------------------------------------------------------------


def measure_floor(ev: Evaluator, file, settings: QpsaSettings) -> dict:
    """How small a value the run can resolve, measured on the first samples of layer FLOOR_LAYER.

    * zero perturbations: a batch of δ = 0 through the same batched path must give ΔNLL = 0
      (the base NLL comes from the unbatched forward; this checks that batching changes nothing);
    * float32 vs float64: the same samples evaluated in both precisions; the RMS of the value
      difference is float32's floor, and float64's is estimated from it × 2⁻²⁹ (the ratio of
      the unit roundoffs), as nothing more precise is at hand to measure it against.
    """
    start = time.perf_counter()
    zero = ev.dnll(FLOOR_LAYER, None, [None] * min(ev.batch_size, 4))
    plans = [plan_unit(file, settings, FLOOR_LAYER, u) for u in settings.units_of_layer]
    take = FLOOR_SAMPLES_PER_MATRIX if settings.estimator == "exact" else 1
    raws = []
    for plan in plans:
        plan.directions, plan.kept = plan.directions[: 2 * take], plan.kept[:take]
        plan.skipped = []
        raws.append(plan)
    other = Evaluator(_other_precision(ev.model), ev.tokens, ev.batch_size)
    values = {}
    for name, e in ((settings.resolved_precision, ev), ("float64" if ev.model.dtype == torch.float32 else "float32", other)):
        vs = []
        for plan in raws:
            raw = evaluate_plan(e, plan)
            vs.extend(sample_values(raw, e.base_ppl, settings.estimator)["value"].tolist())
        values[name] = vs
    del other
    v32, v64 = np.asarray(values["float32"]), np.asarray(values["float64"])
    diff = v32 - v64
    zero_max = float(np.abs(zero).max())
    if len(diff):
        rms32 = float(np.sqrt((diff**2).mean()))
        floor32, floor64 = max(rms32, zero_max), max(rms32 * ROUNDOFF_RATIO, zero_max)
        run_floor = floor32 if settings.resolved_precision == "float32" else floor64
    else:  # no sample of layer 0 could move (e.g. all-zero matrices): nothing to measure the floor on
        rms32 = floor32 = floor64 = run_floor = None
    return {
        "floor": run_floor,
        "floor_kind": "measured (RMS float32 − float64)" if settings.resolved_precision == "float32"
        else "estimated (float32 floor × 2⁻²⁹)",
        "float32": floor32, "float64": floor64,
        "float32_vs_float64_rms": rms32, "float32_vs_float64_max": float(np.abs(diff).max()) if len(diff) else math.nan,
        "zero_perturbation_max_abs_dnll": zero_max,
        "layer": FLOOR_LAYER, "n_samples": len(diff), "values_float32": v32.tolist(), "values_float64": v64.tolist(),
        "seconds": time.perf_counter() - start,
    }


# ---- the whole run ----------------------------------------------------------------------------


@contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def unit_key(layer: int, matrix: str) -> str:
    return f"{layer}/{matrix}"


def score_unit_text(settings: QpsaSettings) -> str:
    what = {"weight": "weight's code moved ±1 step", "block": "block's codes moved ±1 with random signs",
            "byte": "raw byte moved ±1"}[settings.unit]
    how = f"{settings.estimator} estimator" + (f", {settings.probe_scope}-scope probes" if settings.estimator == "probe" else "")
    return (f"Q-PSA: mean ½(ΔPPL(+)+ΔPPL(−)) per {what}, averaged over the layer's {len(MATRICES)} matrices "
            f"({how})")


@dataclass
class QpsaRun:
    """What `score_qpsa` returns: the scores plus the base and the accounting."""

    scores: LayerScores
    base_nll: float
    base_ppl: float
    computed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)


def score_qpsa(
    loaded,
    tokens: EvalTokens,
    settings: QpsaSettings,
    layers: list[int] | None = None,
    checkpoint=None,
    progress: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    noise_floor: bool = True,
) -> QpsaRun:
    """Q-PSA layer scores. `loaded.model` must be in `settings.dtype`.

    checkpoint: a `qpsa.scores.checkpoint.Checkpoint` already checked against this run; its
    finished units are taken as they are, every newly finished unit is added and saved at once.
    progress(status): called after each matrix. log(line): one-line notes (resume, floor).
    noise_floor=False skips measuring the floor (benchmarks; below-floor fractions are then None).
    """
    start = time.perf_counter()
    model, file = loaded.model, loaded.file
    L = loaded.config.n_layer
    layers = list(range(L)) if layers is None else list(layers)
    if model.dtype != settings.dtype:
        raise QpsaError(f"the model is in {model.dtype} but the settings ask for {settings.resolved_precision}")
    log = log or (lambda line: None)
    done: dict[str, dict] = dict(checkpoint.units) if checkpoint is not None else {}
    seconds_before = checkpoint.seconds_before if checkpoint is not None else 0.0  # spent by interrupted runs
    with deterministic():
        ev = Evaluator(model, tokens.tokens, settings.batch_size)
        if checkpoint is not None and checkpoint.base_nll is not None and checkpoint.base_nll != ev.base_mean:
            log(f"warning: the base NLL differs from the checkpoint's by {ev.base_mean - checkpoint.base_nll:.3g} "
                "(another torch or thread count?); the checkpoint's base is used")
        base_mean = checkpoint.base_nll if checkpoint is not None and checkpoint.base_nll is not None else ev.base_mean
        base_ppl = math.exp(base_mean)
        if checkpoint is not None:
            checkpoint.base_nll = base_mean
        floor = checkpoint.noise_floor if checkpoint is not None else None
        if floor is None and noise_floor:
            floor = measure_floor(ev, file, settings)
            if floor["floor"] is not None:
                log(f"noise floor: {floor['floor']:.3g} ΔPPL per {settings.unit} ({floor['floor_kind']}); "
                    f"δ=0 batch max |ΔNLL| {floor['zero_perturbation_max_abs_dnll']:.3g}")
            if checkpoint is not None:
                checkpoint.noise_floor = floor
                checkpoint.save()
        computed, resumed = [], []
        for i in layers:
            for m in settings.units_of_layer:
                key = unit_key(i, m)
                if key in done:
                    resumed.append(key)
                    continue
                raw = evaluate_plan(ev, plan_unit(file, settings, i, m))
                done[key] = raw
                computed.append(key)
                if checkpoint is not None:
                    checkpoint.units[key] = raw
                    checkpoint.save()
                if progress:
                    s = matrix_summary(raw, base_ppl, settings.estimator, None)
                    progress(f"layer {i} {m}: {s['mean']:.3g}")
    seconds = time.perf_counter() - start
    scores = build_scores(done, layers, L, settings, base_ppl, base_mean, floor)
    run = scores.details["run"]
    run.update({"computed_units": computed, "resumed_units": resumed,
                "computed_layers": sorted({int(k.split("/")[0]) for k in computed}),
                "resumed_layers": [i for i in layers if all(unit_key(i, m) in resumed for m in settings.units_of_layer)],
                "n_directions": ev.n_directions, "layer_passes": ev.n_layer_passes,
                "threads": torch.get_num_threads(), "seconds": seconds})
    scores.seconds = seconds + seconds_before
    return QpsaRun(scores, base_mean, base_ppl, computed, resumed)


_SCORE_TEXT = {
    "matrix": "score = mean over the layer's 7 matrices of the per-matrix mean Q-PSA value ½(ΔPPL(+)+ΔPPL(−)) per "
              "unit moved; uncertainty = its standard error (propagated). Details: per_matrix means (ΔPPL and ΔNLL), "
              "first-order ½|ΔNLL(+)−ΔNLL(−)|, and total_nll = Σ n_units·mean ΔNLL (the predicted NLL change if every "
              "unit of the layer moved one step with random signs, to second order).",
    "layer": "score = mean Q-PSA value ½(ΔPPL(+)+ΔPPL(−)) per unit moved, from layer-scope probes that each move N "
             "units of every one of the layer's 7 matrices together (so the matrices weigh equally); uncertainty = "
             "the standard error over the probes. Details: the ΔNLL version and the first-order magnitude; no "
             "per-matrix breakdown or total (use --probe-scope matrix).",
}


def build_scores(done: dict[str, dict], layers: list[int], n_layer: int, settings: QpsaSettings,
                 base_ppl: float, base_nll: float, floor: dict | None) -> LayerScores:
    """LayerScores from the raw per-matrix results (the same numbers whether or not a run was resumed)."""
    fl = None if floor is None or floor["floor"] is None else floor["floor"]
    per_matrix, per_layer, samples = {}, {}, {}
    units = settings.units_of_layer
    for i in layers:
        pm = {m: matrix_summary(done[unit_key(i, m)], base_ppl, settings.estimator, fl) for m in units}
        per_layer[str(i)] = layer_summary(pm)
        if not settings.layer_probes:
            per_matrix[str(i)] = pm
        samples[str(i)] = {m: {k: v for k, v in done[unit_key(i, m)].items() if k not in ("seconds", "layer", "matrix")}
                           for m in units}
    scores: list[float | None] = [None] * n_layer
    unc: list[float | None] = [None] * n_layer
    for i in layers:
        s, se = per_layer[str(i)]["score"], per_layer[str(i)]["se"]
        scores[i] = s if math.isfinite(s) else None
        unc[i] = se if se is not None and math.isfinite(se) else None
    n_samples = sum(per_layer[str(i)]["n_samples"] for i in layers)
    details = {
        "score": _SCORE_TEXT["layer" if settings.layer_probes else "matrix"],
        **settings.to_dict(), "probes": settings.probes if settings.estimator == "probe" else None,
        "matrices": list(MATRICES), "layers": list(layers),
        "base": {"ppl": base_ppl, "nll": base_nll},
        "noise_floor": floor,
        "n_samples": n_samples,
        "n_skipped": sum(per_layer[str(i)]["n_skipped"] for i in layers),
        "n_redrawn": sum(per_layer[str(i)]["n_redrawn"] for i in layers),
        "n_pinned": sum(per_layer[str(i)]["n_pinned"] for i in layers),
        "below_floor": None if fl is None or n_samples == 0
        else sum(per_layer[str(i)]["n_below_floor"] for i in layers) / n_samples,
        "per_layer": per_layer, "per_matrix": per_matrix, "samples": samples,
        "run": {"seconds_per_unit": {k: done[k]["seconds"] for k in sorted(done)}},
    }
    return LayerScores("qpsa", scores, unc, score_unit_text(settings), 0.0, _finite_or_none(details))


def _finite_or_none(obj):
    """NaN/inf -> None throughout (strict JSON; a matrix with no sample has no mean)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def qpsa(loaded, tokens: EvalTokens, settings: QpsaSettings | None = None) -> LayerScores:
    """The registry signature, `method(loaded, tokens, settings) -> LayerScores` (no checkpoint)."""
    return score_qpsa(loaded, tokens, settings or QpsaSettings()).scores
