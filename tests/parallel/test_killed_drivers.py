"""Nothing lost: `imatrix` and `study` killed mid-run (SIGKILL to the driver) resume with --resume and
give the same results as an uninterrupted run; the imatrix's sums do not depend on the order its
units finish in; worker options (a GPU each on CUDA) and the token mode of a driver joining a cluster."""

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
import torch
from gguf import GGMLQuantizationType as Q
from helpers.cli_run import assert_user_error
from helpers.cli_run import run as cli
from helpers.tiny import PROSE, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    text = d / "prose.txt"
    text.write_text(PROSE)
    return {"six": write_tiny_gguf(d / "six.gguf", "llama", n_layer=6, qtype=Q.Q4_1, std=0.04), "text": text}


def _driver(args: list, until, what: str, timeout: float = 180.0):
    """Run `q-psa ARGS` in its own process group and SIGKILL the whole group (the driver and any local
    Ray cluster it started) once `until()` is true; return what `until()` saw last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    driver = subprocess.Popen([sys.executable, "-m", "qpsa", *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    seen = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and driver.poll() is None:
            seen = until()
            if seen:
                break
            time.sleep(0.01)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert seen, f"the driver finished (or timed out) before {what}"
    return seen


def _json(capsys, *args) -> dict:
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


# ---- imatrix ----------------------------------------------------------------------------------


def _random_part(gen: torch.Generator) -> dict:
    """A unit's sums for two matrices: one dense (an int count), one of 3 experts (a count per expert)."""
    def sums(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3
    return {(0, "attn_qkv"): (sums(8), sums(8), 5),
            (0, "ffn_down_exps"): (sums((3, 4)), sums((3, 4)), torch.randint(0, 9, (3,), generator=gen))}


def test_imatrix_sums_do_not_depend_on_the_order_units_finish(tmp_path):
    """Units finishing in any order, with the state saved and read back halfway (pending units
    included), give the same bits as adding them in unit order."""
    from qpsa.quant.imatrix_sums import ImatrixCheckpoint, UnitSums

    gen = torch.Generator().manual_seed(0)
    keys = [f"windows {4 * i}-{4 * i + 3}" for i in range(9)]
    parts = {k: _random_part(gen) for k in keys}
    in_order = UnitSums(list(keys))
    for k in keys:
        in_order.add(k, parts[k])
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    state = UnitSums(list(keys))
    for k in shuffled[:5]:
        state.add(k, parts[k])
    assert state.pending, "the shuffle should leave units waiting for an earlier one"
    ImatrixCheckpoint(tmp_path / "x.ckpt", {"ctx": 4}, state).save()
    state = ImatrixCheckpoint.load(tmp_path / "x.ckpt").state
    assert state.finished() == set(shuffled[:5])
    for k in shuffled[5:]:
        state.add(k, parts[k])
    assert state.complete and not state.pending
    for key, (s2, s1, n) in in_order.sums.items():
        t2, t1, m = state.sums[key]
        assert torch.equal(s2, t2) and torch.equal(s1, t1)
        assert (n == m) if isinstance(n, int) else torch.equal(n, m)


def test_imatrix_resumes_after_the_driver_is_killed(files, capsys, tmp_path):
    """A single-process imatrix run killed (SIGKILL) once some units are in <output>.ckpt; --resume
    computes only the rest and writes the same file, byte for byte, as an uninterrupted run."""
    from qpsa.quant.imatrix_sums import ImatrixCheckpoint

    args = ["imatrix", files["six"], "--text", files["text"], "--chunks", 96, "--ctx", 16]  # 24 units
    whole = _json(capsys, *args, "--output", tmp_path / "whole.gguf")
    out = tmp_path / "killed.gguf"
    ckpt = Path(str(out) + ".ckpt")

    def some_units():
        if ckpt.exists():
            finished = ImatrixCheckpoint.load(ckpt).state.finished()
            return finished if len(finished) >= 3 else None

    _driver([*args, "--output", out], some_units, "3 units were checkpointed")
    saved = ImatrixCheckpoint.load(ckpt).state
    assert 3 <= len(saved.finished()) < len(saved.order) == whole["units"]
    code, _, err = cli(capsys, *args, "--output", out)  # without --resume: refused, the checkpoint kept
    assert_user_error(code, err, "pass --resume")
    code, _, err = cli(capsys, *args[:-1], 32, "--output", out, "--resume")  # another --ctx: refused
    assert_user_error(code, err, "checkpoint is for another --ctx (16 there, 32 here)")
    resumed = _json(capsys, *args, "--output", out, "--resume")
    assert resumed["resumed_units"] == sorted(saved.finished(), key=saved.order.index)
    assert resumed["execution"] is None  # computed in this process
    assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert not ckpt.exists()


def test_imatrix_corrupt_checkpoint_is_one_line(files, capsys, tmp_path):
    out = tmp_path / "i.gguf"
    Path(str(out) + ".ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    code, _, err = cli(capsys, "imatrix", files["six"], "--text", files["text"], "--ctx", 16, "--output", out, "--resume")
    assert_user_error(code, err, "checkpoint is truncated or corrupt")
    assert Path(str(out) + ".ckpt").exists()  # nothing measured is deleted


# ---- study ------------------------------------------------------------------------------------


def _without_timing(obj):
    """study.json without wall-clock fields, the execution record and the resume accounting."""
    drop = ("seconds", "execution", "run", "forward_seconds", "cost", "created", "resumed_steps")
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


@pytest.mark.slow  # three studies, two of them starting a local Ray cluster: 25-70 s
def test_study_resumes_after_the_driver_is_killed(files, capsys, tmp_path):
    """A study on 2 Ray workers killed (SIGKILL to the driver and its local cluster) inside its Q-PSA
    step, after the baselines were checkpointed; --resume (on 2 workers) takes the finished steps
    and the finished Q-PSA units as they are, and study.json equals an uninterrupted single-process run's."""
    pytest.importorskip("ray")
    args = ["study", files["six"], "--quick", "--text", files["text"]]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err
    whole = json.loads((tmp_path / "whole" / "study.json").read_text())
    out = tmp_path / "killed"

    def inside_qpsa():
        try:
            steps = json.loads((out / "study.ckpt").read_text())["steps"]
            units = json.loads((out / "qpsa-N25-6-layers.ckpt").read_text())["payload"]["units"]
        except (OSError, ValueError, KeyError):
            return None
        return (steps, units) if "baselines" in steps and units else None

    steps, units = _driver([*args, "--out", out, "--workers", 2], inside_qpsa, "a Q-PSA unit was checkpointed")
    assert "qpsa N=25" not in steps and 1 <= len(units) < 6
    code, _, err = cli(capsys, *args, "--out", out)  # without --resume: refused
    assert_user_error(code, err, "pass --resume")
    code, _, err = cli(capsys, *args, "--out", out, "--resume", "--seed", 7)  # another plan: refused, one line
    assert_user_error(code, err, "plan seed = 42, this run has 7")
    code, _, err = cli(capsys, *args, "--out", out, "--resume", "--workers", 2)
    assert code == 0, err
    resumed = json.loads((out / "study.json").read_text())
    assert {"forward", "baselines"} <= set(resumed["resumed_steps"])
    run = resumed["scores"]["methods"]["qpsa"]["details"]["run"]
    assert sorted(run["resumed_units"]) == sorted(units) and len(run["computed_units"]) == 6 - len(units)
    assert resumed["execution"]["backend"] == "ray"
    assert _without_timing(resumed) == _without_timing(whole)
    assert not any(out.glob("*.ckpt"))


# ---- worker options ---------------------------------------------------------------------------


def test_actor_options_take_one_gpu_on_cuda():
    from qpsa.parallel.ray_workers import MAX_RESTARTS, actor_options

    cpu = actor_options(torch.device("cpu"), 2)
    assert cpu == {"num_cpus": 2, "num_gpus": 0, "max_restarts": MAX_RESTARTS, "max_task_retries": 0}
    assert actor_options(None, 1)["num_gpus"] == 0
    for device in (torch.device("cuda"), torch.device("cuda", 1), "cuda:0", "cuda"):
        opts = actor_options(device, 1)
        assert opts["num_gpus"] == 1 and opts["num_cpus"] == 1, device


def test_a_joining_driver_sends_its_token(monkeypatch, tmp_path):
    from qpsa.parallel.ray_workers import join_auth_mode

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    assert not join_auth_mode() and "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert join_auth_mode() and os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit mode is respected
    assert not join_auth_mode() and os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc")
    assert join_auth_mode()
