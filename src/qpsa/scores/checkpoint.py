"""Checkpoints of a `q-psa score` run, so a long run survives being killed.

The checkpoint is `<out>.ckpt`, one JSON file rewritten atomically (temporary file, fsync,
rename: `qpsa.fsutil.write_atomic`) after the noise floor and after every finished matrix:

    {"schema": "q-psa/score-checkpoint/1",
     "payload_sha256": sha256 of the payload serialized canonically (sorted keys, no spaces),
     "payload": {
        "header": {"model": {"sha256", "path", "n_layer"},
                   "text": {"sha256", "span", "start_token", "n_tokens", "tokens_sha256"},
                   "settings": {every setting that changes the numbers}, "layers": [...]},
        "environment": {"torch", "threads"},
        "base_nll": mean NLL of the unperturbed model,
        "noise_floor": {...} or null,
        "units": {"<layer>/<matrix>" (or "<layer>/layer" for layer-scope probes): raw result (sampled units, ΔNLL(±) per sample, …)}}}

`--resume` takes the finished units as they are and computes only the rest. A checkpoint whose
header differs from the run's (another model, text, span or setting) is refused with one line
naming what differs; one that does not parse, lacks a field or fails its checksum (truncated,
edited, corrupt) is refused with a clear message. Without `--resume` an existing checkpoint is
refused (pass --resume, or delete it). The checkpoint is deleted once the results are written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qpsa.errors import QpsaError
from qpsa.fsutil import write_atomic

SCHEMA = "q-psa/score-checkpoint/1"
_UNIT_FIELDS = ("layer", "matrix", "n_units", "n_sampled", "sampled", "kept", "skipped", "dnll_plus", "dnll_minus",
                "n_redrawn", "n_pinned", "n_directions", "seconds")

# what a header section is called in messages, and each field's option name
_SECTION = {"model": "model", "text": "text"}
_OPTION = {"samples_per_matrix": "--samples-per-matrix", "seed": "--seed", "max_tokens": "--max-tokens",
           "unit": "--unit", "estimator": "--estimator", "probes": "--probes", "precision": "--precision",
           "batch_size": "--batch-size", "probe_scope": "--probe-scope", "algorithm": "the q-psa algorithm version"}


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _canonical(payload: dict) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True)


@dataclass
class Checkpoint:
    path: Path
    header: dict
    units: dict[str, dict] = field(default_factory=dict)
    noise_floor: dict | None = None
    base_nll: float | None = None
    environment: dict = field(default_factory=dict)

    @property
    def seconds_before(self) -> float:
        """Compute time already spent on the finished units and the floor (for the total runtime)."""
        floor = (self.noise_floor or {}).get("seconds", 0.0)
        return floor + sum(u.get("seconds", 0.0) for u in self.units.values())

    def payload(self) -> dict:
        return {"header": self.header, "environment": self.environment, "base_nll": self.base_nll,
                "noise_floor": self.noise_floor, "units": self.units}

    def save(self) -> None:
        payload = self.payload()
        text = _canonical(payload)
        doc = {"schema": SCHEMA, "payload_sha256": hashlib.sha256(text.encode()).hexdigest(), "payload": payload}
        write_atomic(self.path, json.dumps(doc, allow_nan=True))

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        hint = "delete it to start over"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QpsaError(f"{path}: no such checkpoint") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise QpsaError(f"{path}: checkpoint is truncated or corrupt ({_short(e)}); {hint}") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise QpsaError(f"{path}: not a q-psa score checkpoint (schema "
                            f"{doc.get('schema') if isinstance(doc, dict) else None!r}); {hint}")
        payload = doc.get("payload")
        if not isinstance(payload, dict) or doc.get("payload_sha256") != hashlib.sha256(
                _canonical(payload).encode()).hexdigest():
            raise QpsaError(f"{path}: checkpoint is corrupt: its checksum does not match its contents; {hint}")
        try:
            header, units = payload["header"], payload["units"]
            for key in ("model", "text", "settings", "layers"):
                if key not in header:
                    raise KeyError(f"header {key}")
            for key, unit in units.items():
                missing = [f for f in _UNIT_FIELDS if f not in unit]
                if missing or f"{unit['layer']}/{unit['matrix']}" != key:
                    raise KeyError(f"unit {key}: {', '.join(missing) or 'key'}")
            return cls(path, header, dict(units), payload.get("noise_floor"), payload.get("base_nll"),
                       payload.get("environment") or {})
        except (KeyError, TypeError) as e:
            raise QpsaError(f"{path}: checkpoint is corrupt: missing {_short(e)}; {hint}") from None

    def check_matches(self, header: dict) -> None:
        """QpsaError (one line) naming the first thing in which `header` differs from the checkpoint's.

        Sections or fields that `header` lacks are not compared (so the model, text and settings can
        be checked before the text is tokenized, and the token span after)."""
        mine = self.header
        tail = "pass the same model, text and settings, or delete it to start over"
        if "model" in header and header["model"].get("sha256") != mine["model"].get("sha256"):
            raise QpsaError(f"{self.path}: checkpoint is for another model (sha256 {mine['model'].get('sha256', '?')[:12]}…, "
                            f"{mine['model'].get('path')}; this run's is {header['model'].get('sha256', '?')[:12]}…); {tail}")
        for k, v in header.get("text", {}).items():
            if k in mine["text"] and mine["text"][k] != v:
                what = {"sha256": "text (sha256", "tokens_sha256": "tokenization (tokens sha256"}.get(k, f"text ({k}")
                a, b = mine["text"][k], v
                if isinstance(a, str) and len(a) == 64:
                    a, b = a[:12] + "…", b[:12] + "…"
                raise QpsaError(f"{self.path}: checkpoint is for another {what} {a} there, {b} here); {tail}")
        settings = header.get("settings", {})
        for k in sorted(set(settings) | set(mine["settings"])):
            a, b = mine["settings"].get(k), settings.get(k)
            if a != b and "settings" in header:
                raise QpsaError(f"{self.path}: checkpoint was written with {_OPTION.get(k, k)} {_show(a)}, "
                                f"this run has {_show(b)}; {tail}")
        if "layers" in header and list(header["layers"]) != list(mine["layers"]):
            raise QpsaError(f"{self.path}: checkpoint is for --layers {_ranges(mine['layers'])}, "
                            f"this run has {_ranges(header['layers'])}; {tail}")


def _show(v) -> str:
    return "(none)" if v is None else str(v)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, run = [], []
    for i in layers:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


# ---- `q-psa baseline`: the layer ablation's finished batches ------------------------------------

ABLATION_SCHEMA = "q-psa/baseline-checkpoint/1"


@dataclass
class AblationCheckpoint:
    """`<out>.ckpt` of a `q-psa baseline` run: every finished batch of layer ablations (its token
    NLLs, float64, exact through JSON) under a header of the model, text, tokens and settings.
    Written atomically after every batch, refused (one line) when it belongs to another run, deleted
    once the results are written."""

    path: Path
    header: dict
    units: dict[str, list] = field(default_factory=dict)  # "a-b" -> (b − a + 1) rows of token NLLs

    def save(self) -> None:
        write_atomic(self.path, json.dumps({"schema": ABLATION_SCHEMA, "header": self.header, "units": self.units}))

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> AblationCheckpoint:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("schema") != ABLATION_SCHEMA:
                raise QpsaError(f"{path}: not a q-psa baseline checkpoint; delete it to start over")
            return cls(path, dict(doc["header"]), {str(k): list(v) for k, v in doc["units"].items()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise QpsaError(f"{path}: checkpoint is truncated or corrupt ({_short(e)}); delete it to start over") from None

    def check_matches(self, header: dict) -> None:
        for key in sorted(set(header) | set(self.header)):
            if header.get(key) != self.header.get(key):
                a, b = self.header.get(key), header.get(key)
                raise QpsaError(f"{self.path}: checkpoint was written for another {key} ({_show(a)[:40]} there, "
                                f"{_show(b)[:40]} here); pass the same model, text and settings, or delete it")
