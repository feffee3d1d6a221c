"""`q-psa score --resume`: a run killed with SIGKILL at a random moment continues to the same results.

The killed run is a real subprocess (`python -m qpsa score …`), killed at a random moment after its
first checkpoint appears; the resumed run must end with results identical to an uninterrupted run
(timings aside) and must not redo any matrix the checkpoint holds. Checkpoints from another
model, text or settings, and truncated or edited ones, are refused with one line and exit 2.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from helpers.tiny import PROSE, write_tiny_gguf

from qpsa.cli.app import main
from qpsa.scores.checkpoint import Checkpoint
from qpsa.scores.qpsa.settings import MATRICES

pytestmark = pytest.mark.usefixtures("one_thread")


N_LAYER = 6


@pytest.fixture
def setup(tmp_path):
    model = write_tiny_gguf(tmp_path / "six.gguf", "llama", n_layer=N_LAYER, qtype=Q.Q4_1, std=0.04)
    text = tmp_path / "prose.txt"
    text.write_text(PROSE, encoding="utf-8")
    return model, text


def _args(model, text, out, *extra):
    return ["score", str(model), "--text", str(text), "--samples-per-matrix", "6", "--max-tokens", "96",
            "--batch-size", "6", "--out", str(out), "--json", *map(str, extra)]


def comparable(doc: dict) -> dict:
    """A results document without what legitimately differs between runs: timings and resume bookkeeping."""
    doc = json.loads(json.dumps(doc))
    for key in ("seconds", "created"):
        doc.pop(key)
    s = doc["methods"]["qpsa"]
    s.pop("seconds")
    s["details"].pop("run")
    s["details"]["noise_floor"].pop("seconds")
    return doc


def _popen(args, env):
    return subprocess.Popen([sys.executable, "-m", "qpsa", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)


def test_sigkilled_run_resumes_to_identical_results(setup, tmp_path):
    model, text = setup
    env = {**os.environ, "QPSA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # the uninterrupted run, timing the window between its first checkpoint and its end
    ref_out = tmp_path / "ref.json"
    p = _popen(_args(model, text, ref_out), env)
    ckpt = Path(str(ref_out) + ".ckpt")
    while not ckpt.exists() and p.poll() is None:
        time.sleep(0.005)
    t0 = time.monotonic()
    stdout, stderr = p.communicate(timeout=300)
    window = time.monotonic() - t0
    assert p.returncode == 0, stderr
    reference = json.loads(stdout)
    assert not ckpt.exists()  # deleted once the results are written

    out = tmp_path / "run.json"
    ckpt = Path(str(out) + ".ckpt")
    rng = random.Random()
    for attempt in range(5):
        p = _popen(_args(model, text, out), env)
        while not ckpt.exists() and p.poll() is None:
            time.sleep(0.002)
        delay = rng.uniform(0.15, 0.75) * window / (attempt + 1)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.communicate()
        if p.returncode == -signal.SIGKILL and ckpt.exists() and not out.exists():
            break
        for f in (out, out.with_suffix(".csv"), ckpt):  # it finished first: try again, sooner
            f.unlink(missing_ok=True)
    else:
        pytest.fail("could not kill the run before it finished")
    finished = set(Checkpoint.load(ckpt).units)
    all_units = {f"{i}/{m}" for i in range(N_LAYER) for m in MATRICES}
    assert finished < all_units

    p = subprocess.run([sys.executable, "-m", "qpsa", *_args(model, text, out, "--resume")], check=False,
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    resumed = json.loads(p.stdout)
    assert comparable(resumed) == comparable(reference), f"killed after {delay:.2f} s"
    assert json.loads(out.read_text()) == resumed and not ckpt.exists()
    run = resumed["methods"]["qpsa"]["details"]["run"]
    assert set(run["resumed_units"]) == finished  # every finished matrix taken from the checkpoint …
    assert not set(run["computed_units"]) & finished  # … and none of them redone
    assert set(run["computed_units"]) | finished == all_units
    complete = [i for i in range(N_LAYER) if all(f"{i}/{m}" in finished for m in MATRICES)]
    assert run["resumed_layers"] == complete and not set(run["computed_layers"]) & set(complete)
    assert "resuming" in p.stderr and f"{len(finished)} of {len(all_units)} matrices finished" in p.stderr


@pytest.fixture
def interrupted(setup, tmp_path, monkeypatch, capsys):
    """An in-process run interrupted (KeyboardInterrupt) right after its second checkpoint save."""
    model, text = setup
    out = tmp_path / "r.json"
    saves = {"n": 0}
    original = Checkpoint.save

    def save_then_stop(self):
        original(self)
        saves["n"] += 1
        if saves["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)
    assert main(_args(model, text, out, "--layers", "0-2")) == 130
    monkeypatch.setattr(Checkpoint, "save", original)
    capsys.readouterr()
    ckpt = Path(str(out) + ".ckpt")
    assert len(Checkpoint.load(ckpt).units) == 2
    return model, text, out, ckpt


def _one_line_error(capsys, args, *needles):
    code = main(args)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("q-psa: error: "), err
    for needle in needles:
        assert needle in lines[0], err


def test_checkpoint_from_other_settings_model_or_text_is_refused(interrupted, tmp_path, capsys):
    model, text, out, ckpt = interrupted
    before = ckpt.read_bytes()
    _one_line_error(capsys, _args(model, text, out, "--layers", "0-2"), "--resume", str(ckpt))
    _one_line_error(capsys, _args(model, text, out, "--layers", "0-2", "--resume", "--seed", 7), "--seed 42", "7")
    _one_line_error(capsys, [*_args(model, text, out, "--layers", "0-2", "--resume"), "--samples-per-matrix", "5"],
                    "--samples-per-matrix 6", "5")
    _one_line_error(capsys, _args(model, text, out, "--layers", "0-1", "--resume"), "--layers 0-2", "0-1")
    _one_line_error(capsys, _args(model, text, out, "--layers", "0-2", "--resume", "--estimator", "probe"),
                    "--estimator exact")
    other_model = write_tiny_gguf(tmp_path / "other.gguf", "llama", n_layer=N_LAYER, qtype=Q.Q4_1, seed=1)
    _one_line_error(capsys, _args(other_model, text, out, "--layers", "0-2", "--resume"), "another model")
    other_text = tmp_path / "other.txt"
    other_text.write_text(PROSE.upper(), encoding="utf-8")
    _one_line_error(capsys, _args(model, other_text, out, "--layers", "0-2", "--resume"), "another text")
    args = _args(model, text, out, "--layers", "0-2", "--resume")
    args[args.index("--max-tokens") + 1] = "64"
    _one_line_error(capsys, args, "--max-tokens 96", "64")
    assert ckpt.read_bytes() == before  # a refused run leaves the checkpoint alone

    # the right settings continue it, to the same numbers as a run never interrupted
    assert main(_args(model, text, out, "--layers", "0-2", "--resume")) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert main(_args(model, text, tmp_path / "fresh.json", "--layers", "0-2")) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert comparable(resumed) == comparable(fresh)
    assert len(resumed["methods"]["qpsa"]["details"]["run"]["resumed_units"]) == 2


def test_truncated_or_edited_checkpoint_is_detected(interrupted, capsys):
    model, text, out, ckpt = interrupted
    good = ckpt.read_bytes()
    args = _args(model, text, out, "--layers", "0-2", "--resume")
    ckpt.write_bytes(good[: len(good) // 2])
    _one_line_error(capsys, args, "truncated or corrupt", str(ckpt))
    ckpt.write_bytes(b"")
    _one_line_error(capsys, args, "truncated or corrupt")
    doc = json.loads(good)  # valid JSON, one number changed: the checksum catches it
    unit = next(iter(doc["payload"]["units"].values()))
    unit["dnll_plus"][0] *= 1.5
    ckpt.write_text(json.dumps(doc))
    _one_line_error(capsys, args, "checksum")
    doc = json.loads(good)
    doc["schema"] = "something/else"
    ckpt.write_text(json.dumps(doc))
    _one_line_error(capsys, args, "not a q-psa score checkpoint")
    ckpt.write_bytes(good)
    assert main(args) == 0
