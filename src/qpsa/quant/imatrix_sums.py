"""The running sums of an importance matrix, added in unit order, and their checkpoint.

`compute_imatrix` (qpsa.quant.imatrix) cuts the windows into units of 4 and gets each unit's
float64 sums (Σx², Σx, rows per matrix) in whatever order its executor finishes them. Float
addition is not associative, so the sums are added strictly in unit order: a unit that finishes
before an earlier one waits in `pending` until the prefix before it is complete. The result is
therefore the same bits wherever and in whichever order the units ran, and the same after a
resume.

The checkpoint `<output>.ckpt` (an `.npz`, rewritten atomically after every finished unit) holds
exactly that state: the header of the run, how many units are summed (`added`), the sums of that
prefix and the finished units still pending. `--resume` restores it and computes only the units
that are neither summed nor pending. A checkpoint of another run (model sha256, text sha256, the
tokens, --ctx, --chunks, --dtype) is refused with one line naming what differs; so is one that is
truncated or corrupt. It is deleted once the imatrix file is written.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qpsa.errors import QpsaError

SCHEMA = "q-psa/imatrix-checkpoint/1"
# the header's fields in the order they are compared, and how a message names each
_OPTION = {"model": "model (sha256 ", "text": "text (sha256 ", "ctx": "--ctx (", "chunks": "--chunks (windows: ",
           "dtype": "--dtype (", "batch": "unit size (windows: ", "tokens": "tokenization (tokens sha256 "}

Part = dict  # (layer, fused matrix) -> (Σx² float64, Σx float64, rows: int or int64 tensor per expert)


@dataclass
class UnitSums:
    """The sums of the first `added` units (in unit order) and the finished units after a gap."""

    order: list[str]  # every unit's key, in window order
    added: int = 0
    sums: Part = field(default_factory=dict)
    pending: dict[str, Part] = field(default_factory=dict)

    def finished(self) -> set[str]:
        return set(self.order[: self.added]) | set(self.pending)

    def add(self, key: str, part: Part) -> None:
        """Keep `part`, then add every unit of the now complete prefix, in order."""
        self.pending[key] = part
        while self.added < len(self.order) and self.order[self.added] in self.pending:
            for k, (s2, s1, c) in self.pending.pop(self.order[self.added]).items():
                if k in self.sums:  # out of place: the parts are inference tensors
                    b2, b1, bc = self.sums[k]
                    self.sums[k] = (b2 + s2, b1 + s1, bc + c)
                else:
                    self.sums[k] = (s2, s1, c)
            self.added += 1

    @property
    def complete(self) -> bool:
        return self.added == len(self.order)


@dataclass
class ImatrixCheckpoint:
    """`<output>.ckpt` of a `q-psa imatrix` run: its header and its `UnitSums`."""

    path: Path
    header: dict
    state: UnitSums

    def save(self) -> None:
        from qpsa.fsutil import atomic_output

        meta = {"schema": SCHEMA, "header": self.header, "order": self.state.order, "added": self.state.added,
                "pending": list(self.state.pending)}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        arrays.update(_arrays("sum", self.state.sums))
        for n, part in enumerate(self.state.pending.values()):
            arrays.update(_arrays(f"pending{n}", part))
        with atomic_output(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> ImatrixCheckpoint:
        path = Path(path)
        hint = "delete it to start over"
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
            if meta.get("schema") != SCHEMA:
                raise QpsaError(f"{path}: not a q-psa imatrix checkpoint (schema {meta.get('schema')!r}); {hint}")
            state = UnitSums(list(meta["order"]), int(meta["added"]), _part(arrays, "sum"),
                             {key: _part(arrays, f"pending{n}") for n, key in enumerate(meta["pending"])})
            return cls(path, dict(meta["header"]), state)
        except QpsaError:
            raise
        except FileNotFoundError:
            raise QpsaError(f"{path}: no such checkpoint") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise QpsaError(f"{path}: checkpoint is truncated or corrupt ({first}); {hint}") from None

    def check_matches(self, header: dict) -> None:
        """One line naming the first setting in which `header` differs from the checkpoint's."""
        for key in [*_OPTION, *sorted((set(header) | set(self.header)) - set(_OPTION))]:
            a, b = self.header.get(key), header.get(key)
            if a != b:
                if isinstance(a, str) and len(a) == 64:
                    a, b = a[:12] + "…", str(b)[:12] + "…"
                raise QpsaError(f"{self.path}: checkpoint is for another {_OPTION.get(key, key + ' (')}{a} there, {b} here); "
                                "pass the same model, text, --ctx, --chunks and --dtype, or delete it to start over")


def _arrays(prefix: str, part: Part) -> dict[str, np.ndarray]:
    """Flat npz arrays of one part: PREFIX|layer|fused|s2, …|s1, …|n (n 0-d for a dense matrix)."""
    out = {}
    for (layer, fused), (s2, s1, c) in part.items():
        base = f"{prefix}|{layer}|{fused}"
        out[f"{base}|s2"] = s2.numpy()
        out[f"{base}|s1"] = s1.numpy()
        out[f"{base}|n"] = c.numpy() if isinstance(c, torch.Tensor) else np.array(c, dtype=np.int64)
    return out


def _part(arrays: dict[str, np.ndarray], prefix: str) -> Part:
    part: Part = {}
    for name in arrays:
        head, layer, fused, what = name.split("|")
        if head != prefix or what != "s2":
            continue
        base = f"{prefix}|{layer}|{fused}"
        n = arrays[f"{base}|n"]
        part[(int(layer), fused)] = (torch.from_numpy(arrays[f"{base}|s2"]), torch.from_numpy(arrays[f"{base}|s1"]),
                                     int(n) if n.ndim == 0 else torch.from_numpy(n))
    return part
