"""Find out what each input of `q-psa report` is, and read it.

An input is a results JSON or a folder of them. The kind is read from the file's fields, never
from its name:

| kind        | written by                                    | recognised by                               |
|-------------|-----------------------------------------------|---------------------------------------------|
| study       | `q-psa study` (study.json, or its folder)     | "scores", "prune", "loop", "agreement"      |
| scores      | `q-psa baseline`, `q-psa score`               | "schema": "q-psa/scores/1"                  |
| edits       | `q-psa prune/loop --out`                      | "kind" = prune or loop, "edits"             |
| sensitivity | `q-psa sensitivity` (sensitivity-T-G.json)    | "type", "granularity", "rows"               |
| plan        | `q-psa plan` (plan.json, or --json)           | "target_bpw", "plan", "uniform", "groups"   |
| compare     | `q-psa compare --json`                        | "base", "other", "statistics"               |
| noise       | `q-psa noise` (noise.json)                    | "embedding", "typos"                        |

A folder holds one study (study.json), one plan (plan.json; its sensitivity files are the plan's
measurements), one noise result (noise.json), or sensitivity files: each is read as above.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qpsa.errors import QpsaError
from qpsa.fsutil import user_file

KINDS = ("study", "scores", "edits", "sensitivity", "plan", "compare", "noise")


@dataclass
class Result:
    kind: str  # one of KINDS
    path: Path  # the file it was read from
    data: dict
    extra: dict = field(default_factory=dict)  # what a plan borrows from its folder: "header"


def load_results(paths: list[Path]) -> list[Result]:
    """Every input read and recognised; a QpsaError naming the first input that is not a q-psa result."""
    if not paths:
        raise QpsaError("give at least one results file or folder")
    results = []
    for path in map(Path, paths):
        results += _load_folder(path) if path.is_dir() else [load_file(path)]
    return results


def load_file(path: Path) -> Result:
    data = _read_json(path)
    kind = detect_kind(data)
    if kind is None:
        raise QpsaError(f"{path}: not a q-psa result (expected a study, scores, prune/loop, sensitivity, plan, "
                        "compare or noise JSON)")
    result = Result(kind, path, data)
    if kind == "plan" and "model" not in data:
        result.extra["header"] = _plan_header(path.parent)
    return result


def detect_kind(data) -> str | None:
    """The kind of a parsed results JSON, or None where it is not one of q-psa's."""
    if not isinstance(data, dict):
        return None
    keys = set(data)
    if data.get("schema") == "q-psa/scores/1":
        return "scores"
    if {"scores", "prune", "loop", "agreement"} <= keys:
        return "study"
    if data.get("kind") in ("prune", "loop") and "edits" in keys:
        return "edits"
    if {"target_bpw", "plan", "uniform", "groups"} <= keys:
        return "plan"
    if {"type", "granularity", "rows"} <= keys:
        return "sensitivity"
    if {"base", "other", "statistics"} <= keys:
        return "compare"
    if {"embedding", "typos"} <= keys:
        return "noise"
    return None


def _load_folder(folder: Path) -> list[Result]:
    for name in ("study.json", "plan.json", "noise.json"):
        if (folder / name).is_file():
            return [load_file(folder / name)]
    found = sorted(folder.glob("sensitivity-*.json")) or sorted(folder.glob("*.json"))
    results = []
    for path in found:
        try:
            results.append(load_file(path))
        except QpsaError:
            continue  # a folder may hold other JSON; only its q-psa results are reported
    if not results:
        raise QpsaError(f"{folder}: no q-psa results in this folder (study.json, plan.json, noise.json, "
                        "sensitivity-*.json or another results JSON)")
    return results


def _read_json(path: Path):
    try:
        with user_file(path, "results file or folder"):
            text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QpsaError(f"{path}: not a q-psa result (not UTF-8 text)") from None
    try:
        return json.loads(text, parse_constant=_constant)
    except ValueError as e:
        raise QpsaError(f"{path}: not a q-psa result (not JSON: {e})") from None


def _constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


def _plan_header(folder: Path) -> dict:
    """plan.json names no model; the sensitivity files `q-psa plan` writes beside it do."""
    for path in sorted(folder.glob("sensitivity-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "model" in data:
            return {k: data[k] for k in ("model", "text", "ctx", "chunks", "windows") if k in data}
    return {}
