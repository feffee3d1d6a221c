"""The checkpoint of a `q-psa study` run, so a killed study resumes where it stopped.

`<out>/study.ckpt` is one JSON file, rewritten atomically (`qpsa.fsutil.write_atomic`) as each
step of the study finishes:

    {"schema": "q-psa/study-checkpoint/1",
     "header": {"model": sha256, "text": sha256, "dtype", "device", "plan": {every StudyPlan field}},
     "steps": {"forward": seconds of one forward (the cost unit, kept so costs stay comparable),
               "baselines": the ScoreRun of every baseline method (its JSON),
               "qpsa N=100": Q-PSA's LayerScores at the main N, "convergence N=25": one convergence row,
               "prune": [every finished edit], "loop": [every finished edit]}}

The steps made of units keep their own checkpoints beside it while they run, so a kill inside a
step loses at most the units in flight: `layer_ablation.ckpt` (the layer ablation's batches,
`qpsa.scores.checkpoint.AblationCheckpoint`) and `qpsa-N{n}.ckpt` (Q-PSA's (layer, matrix)
units, `qpsa.scores.checkpoint.Checkpoint`); each is deleted once its step is in study.ckpt.

Every float goes through JSON exactly (Python writes the shortest repr that reads back to the
same double), so a resumed study gives the same scores, edits, agreement and convergence as an
uninterrupted one; only wall-clock fields differ. A checkpoint of another model, text, dtype,
device or plan is refused with one line naming what differs (pass the same options, or delete the
folder's study.ckpt to start over). The checkpoints are deleted once the results are written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qpsa.errors import QpsaError
from qpsa.fsutil import write_atomic

SCHEMA = "q-psa/study-checkpoint/1"
NAME = "study.ckpt"
ABLATION = "layer_ablation.ckpt"


@dataclass
class StudyCheckpoint:
    path: Path
    header: dict
    steps: dict = field(default_factory=dict)

    @classmethod
    def header_of(cls, loaded, text, plan) -> dict:
        """What must be equal for a study to resume: the model, the text, the precision, the device and the plan."""
        return json.loads(json.dumps({"model": loaded.file.sha256, "text": text.sha256,
                                      "dtype": str(loaded.model.dtype).removeprefix("torch."),
                                      "device": loaded.model.device.type, "plan": asdict(plan)}))

    @property
    def folder(self) -> Path:
        return self.path.parent

    def save(self) -> None:
        write_atomic(self.path, json.dumps({"schema": SCHEMA, "header": self.header, "steps": self.steps}))

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> StudyCheckpoint:
        path = Path(path)
        hint = "delete it to start over"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
                raise QpsaError(f"{path}: not a q-psa study checkpoint; {hint}")
            return cls(path, dict(doc["header"]), dict(doc["steps"]))
        except QpsaError:
            raise
        except FileNotFoundError:
            raise QpsaError(f"{path}: no such checkpoint") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise QpsaError(f"{path}: checkpoint is truncated or corrupt ({first}); {hint}") from None

    def check_matches(self, header: dict) -> None:
        """One line naming the first thing in which `header` differs from the checkpoint's."""
        tail = "pass the same model, text and options, or delete it to start over"
        for key in ("model", "text", "dtype", "device"):
            a, b = self.header.get(key), header.get(key)
            if a != b:
                if isinstance(a, str) and len(a) == 64:
                    a, b = a[:12] + "…", str(b)[:12] + "…"
                raise QpsaError(f"{self.path}: checkpoint is for another {key} ({a} there, {b} here); {tail}")
        mine, theirs = self.header.get("plan", {}), header.get("plan", {})
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise QpsaError(f"{self.path}: checkpoint was written with plan {key} = {mine.get(key)}, this run has "
                                f"{theirs.get(key)} (--quick or --seed differ?); {tail}")

    def step(self, name: str, compute, encode=lambda value: value, decode=lambda saved: saved):
        """The step's saved result (decoded), or `compute()`'s, saved (encoded) at once."""
        if name in self.steps:
            return decode(self.steps[name])
        value = compute()
        self.steps[name] = json.loads(json.dumps(encode(value)))
        self.save()
        return value

    def inner(self, name: str) -> Path:
        """The path of a step's own checkpoint (deleted once the step is saved here)."""
        return self.folder / name

    def clear_inner(self) -> None:
        """Delete the steps' own checkpoints left in the folder by a study whose study.ckpt is gone
        (deleted to start over): a new study must not take their units."""
        for path in [*self.folder.glob(ABLATION), *self.folder.glob("qpsa-N*-layers.ckpt")]:
            path.unlink(missing_ok=True)
