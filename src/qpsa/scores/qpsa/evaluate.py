"""Q-PSA's batched evaluation: the layers from the perturbed one onward, B perturbations at once,
from the cached hidden states entering it (`Transformer.linear_hook` adds δ·x, weights are never copied)."""

from __future__ import annotations

import math

import numpy as np
import torch

from qpsa.model.config import EXPERT_MATRICES
from qpsa.scores.base import LayerStates
from qpsa.scores.qpsa.moves import Move
from qpsa.scores.qpsa.settings import DEFAULT_BATCH

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
        expert_parts: dict[str, tuple[list, ...]] = {}  # fused expert weight -> batch, expert, row, column, δ
        for b, mv in enumerate(moves):
            for name, m in ([] if mv is None else [(matrix, mv)] if isinstance(mv, Move) else mv):
                if len(m.rows) == 0:
                    continue
                fused, offset = model.fused_rows(layer, name)
                if name in EXPERT_MATRICES:  # Move rows run over expert × rows per expert
                    per = model.weights[f"blk.{layer}.{name}.weight"].shape[-2]
                    got = expert_parts.setdefault(fused, ([], [], [], [], []))
                    for dest, v in zip(got, (np.full(len(m.rows), b), m.rows // per, m.rows % per + offset, m.cols,
                                             m.delta)):
                        dest.append(v)
                    continue
                b_idx, rows, cols, deltas = parts.setdefault(fused, ([], [], [], []))
                b_idx.append(np.full(len(m.rows), b))
                rows.append(m.rows + offset)
                cols.append(m.cols)
                deltas.append(m.delta)
        if expert_parts:
            T = self.tokens.shape[1]
            echanges = {fused: [torch.from_numpy(np.concatenate(v)).to(dev) for v in got]
                        for fused, got in expert_parts.items()}
            for got in echanges.values():
                got[4] = got[4].to(model.dtype)

            def expert_hook(i, name, e, token_rows, x, y):
                if i != layer or name not in echanges:
                    return y
                bi, ei, oi, ci, dv = echanges[name]
                sel = torch.nonzero(ei == e)[:, 0]
                if len(sel) == 0:
                    return y
                mine = (token_rows // T)[:, None] == bi[sel][None, :]  # (n, E'): the token is in that element
                contrib = x[:, ci[sel]] * dv[sel] * mine  # δ·x[..., j] for each changed W[e, o, j]
                return y.index_add_(1, oi[sel], contrib)

            model.expert_hook = expert_hook
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
            model.linear_hook = model.expert_hook = None
        self.n_directions += len(moves)
        self.n_layer_passes += len(moves) * (L - layer) / L
        return res


def other_precision(model) -> torch.nn.Module:
    """A copy of `model` in the other float precision (float32 <-> float64), for the noise floor."""
    from qpsa.model.transformer import Transformer
    from qpsa.model.weights import WeightStore

    other = torch.float64 if model.dtype == torch.float32 else torch.float32
    w = model.weights
    if not w.resident and not w._pinned:  # weights on demand, none edited: the same sources, on demand too
        return Transformer(model.config, WeightStore(w._sources, dtype=other, device=w.device, budget=w.budget))
    weights = {k: v for k, v in w.items() if not w.is_fused(k)
               and not (k == "output.weight" and v is w.get("token_embd.weight"))}
    return Transformer(model.config, weights, dtype=other)
