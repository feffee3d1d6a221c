"""--workers / --ray-address: the same numbers on a local Ray cluster of 2 workers as in one process,
nothing lost when a worker or the driver dies, and one line for every bad input.

One cluster (2 CPUs, no dashboard, loopback) serves the whole module; every run starts its own two
actors on it, each loading the tiny model from its file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from helpers.cli_run import assert_user_error
from helpers.cli_run import run as cli
from helpers.tiny import PROSE, write_tiny_gguf, write_wide_gguf

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    text = d / "prose.txt"
    text.write_text(PROSE)
    return {"wide": write_wide_gguf(d / "wide.gguf"),  # K-quants fit, separate head: sensitivity, plan
            "six": write_tiny_gguf(d / "six.gguf", "llama", n_layer=6, qtype=Q.Q4_1, std=0.04),  # 2 ablation batches
            "text": text, "dir": d}


SCORE = ["--samples-per-matrix", 4, "--max-tokens", 64, "--estimator", "probe", "--probes", 2, "--probe-scope", "matrix",
         "--layers", "0-2"]  # 21 units


@pytest.fixture(scope="module")
def local_score(files):
    """Q-PSA scores of SCORE computed in this process (the reference both score tests compare with)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from qpsa.cli.app import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(["score", str(files["six"]), "--text", str(files["text"]), *map(str, SCORE),
                     "--out", str(files["dir"] / "local.json"), "--json"]) == 0
    return json.loads(out.getvalue())["methods"]["qpsa"]


def _json(capsys, *args) -> dict:
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def _without_timing(obj):
    """Results with every wall-clock field and the execution record removed."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items()
                if k not in ("seconds", "execution", "run", "seconds_per_unit", "files", "out", "load_seconds")}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def test_sensitivity_and_plan_same_numbers(cluster, files, capsys, tmp_path):
    args = [files["wide"], "--text", files["text"], "--ctx", 64, "--chunks", 1]
    one = _json(capsys, "sensitivity", *args, "--to", "q4_0", "--granularity", "tensor", "--out", tmp_path / "a")
    code, out, err = cli(capsys, "sensitivity", *args, "--to", "q4_0", "--granularity", "tensor", "--out",
                         tmp_path / "b", "--workers", 2, "--json")
    assert code == 0, err
    two = json.loads(out)
    per_worker = [line for line in err.splitlines() if line.startswith("worker ")]  # the final summary
    assert len(per_worker) == 2 and all("units/s" in line for line in per_worker)
    assert [r["kld"] for r in two["rows"]] == [r["kld"] for r in one["rows"]]
    assert _without_timing(two["rows"]) == _without_timing(one["rows"])
    ex = two["execution"]
    assert ex["backend"] == "ray" and ex["workers"] == 2 and ex["ray_version"] == ray.__version__
    assert len(ex["units"]) == len(two["rows"]) and len(ex["per_worker"]) == 2  # both workers took units
    assert one["execution"]["backend"] == "local"

    plan = ["plan", *args, "--types", "q8_0", "q4_k", "--target-bpw", 6]
    p1 = _json(capsys, *plan, "--out", tmp_path / "p1")
    p2 = _json(capsys, *plan, "--out", tmp_path / "p2", "--workers", 2)
    assert _without_timing(p2["groups"]) == _without_timing(p1["groups"])
    assert p2["plan"]["kld"] == p1["plan"]["kld"] and p2["tensor_types"] == p1["tensor_types"]
    assert p2["execution"]["backend"] == "ray" and p1["execution"] is None
    assert json.loads((tmp_path / "p2" / "plan.json").read_text())["execution"]["workers"] == 2


def test_score_and_baseline_same_numbers(cluster, files, local_score, capsys, tmp_path):
    one = local_score
    two = _json(capsys, "score", files["six"], "--text", files["text"], *SCORE, "--out", tmp_path / "s2.json",
                "--workers", 2)["methods"]["qpsa"]
    assert two["scores"] == one["scores"] and two["uncertainty"] == one["uncertainty"]
    assert two["details"]["samples"] == one["details"]["samples"]
    assert two["details"]["run"]["execution"]["backend"] == "ray"
    assert two["details"]["run"]["n_directions"] == one["details"]["run"]["n_directions"]

    base = ["baseline", files["six"], "--methods", "layer_ablation", "--text", files["text"], "--max-tokens", 64]
    b1 = _json(capsys, *base, "--out", tmp_path / "b1.json")["methods"]["layer_ablation"]
    b2 = _json(capsys, *base, "--out", tmp_path / "b2.json", "--workers", 2)["methods"]["layer_ablation"]
    assert b2["scores"] == b1["scores"] and b2["uncertainty"] == b1["uncertainty"]
    assert sorted(b2["details"]["execution"]["units"]) == ["0-3", "4-5"]


def test_imatrix_same_numbers(cluster, files, capsys, tmp_path):
    from qpsa.quant.imatrix import read_imatrix

    args = ["imatrix", files["six"], "--text", files["text"], "--ctx", 32]
    _json(capsys, *args, "--output", tmp_path / "a.gguf")
    two = _json(capsys, *args, "--output", tmp_path / "b.gguf", "--workers", 2)
    assert two["execution"]["backend"] == "ray" and len(two["execution"]["units"]) >= 2
    a, b = read_imatrix(tmp_path / "a.gguf"), read_imatrix(tmp_path / "b.gguf")
    assert a.names == b.names
    for name in a.names:  # added in window order: the same bits
        assert (a.in_sum2[name] == b.in_sum2[name]).all() and (a.counts[name] == b.counts[name]).all()


def test_killed_worker_units_run_elsewhere(cluster, files):
    """A worker's process killed mid-run: its units run on the other worker (or on it, restarted),
    and the rows equal the single-process run's."""
    from qpsa.eval.perplexity import make_windows
    from qpsa.model.load import load_model
    from qpsa.parallel import LocalExecutor
    from qpsa.parallel.ray_workers import RayExecutor
    from qpsa.quant.sensitivity import Reference, quant_groups, run_sensitivity

    loaded = load_model(str(files["wide"]))
    windows = make_windows(loaded.tokenizer, PROSE, 64, 1, None, loaded.config.context_length)
    ref = Reference(loaded.model, windows)
    groups = quant_groups(loaded, "tensor")
    want = run_sensitivity(loaded, ref, Q.Q4_0, groups, executor=LocalExecutor(loaded))
    with RayExecutor(files["wide"], loaded.file.sha256, 2) as executor:
        victim = executor.pids()[1]
        killed = []

        def on_row(row):
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(row.group.name)

        got = run_sensitivity(loaded, ref, Q.Q4_0, groups, on_row=on_row, executor=executor)
        record = executor.describe()
    assert killed and record["retries"] >= 1
    assert [r.stats for r in got.rows] == [r.stats for r in want.rows]
    assert [r.group.name for r in got.rows] == [g.name for g in groups]


def test_resume_after_the_driver_is_killed(cluster, files, local_score, capsys, tmp_path):
    """The driver of a 2-worker score run killed (SIGKILL) once some units are in the checkpoint;
    --resume on workers computes only the rest, and the scores equal an uninterrupted run's."""
    out = tmp_path / "score.json"
    args = ["score", str(files["six"]), "--text", str(files["text"]), *SCORE]
    ckpt = Path(str(out) + ".ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    driver = subprocess.Popen([sys.executable, "-m", "qpsa", *map(str, args), "--out", str(out), "--workers", "2",
                               "--json"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            if ckpt.exists() and len(json.loads(ckpt.read_text())["payload"]["units"]) >= 3:
                break
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local cluster it started
        driver.wait()
    units = json.loads(ckpt.read_text())["payload"]["units"]
    assert 3 <= len(units) < 21, "the driver finished before it could be killed"
    resumed = _json(capsys, *args, "--out", out, "--resume", "--workers", 2)["methods"]["qpsa"]
    run = resumed["details"]["run"]
    assert sorted(run["resumed_units"]) == sorted(units) and len(run["computed_units"]) == 21 - len(units)
    assert resumed["scores"] == local_score["scores"] and resumed["uncertainty"] == local_score["uncertainty"]
    assert not ckpt.exists()


# ---- bad input: one line, exit 2 -------------------------------------------------------------


def test_workers_zero(files, capsys, tmp_path):
    code, _, err = cli(capsys, "sensitivity", files["wide"], "--to", "q4_0", "--text", files["text"], "--workers", 0,
                       "--out", tmp_path / "o")
    assert_user_error(code, err, "--workers must be at least 1")


def test_without_ray(files, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    code, _, err = cli(capsys, "baseline", files["six"], "--methods", "layer_ablation", "--workers", 2,
                       "--out", tmp_path / "b.json")
    assert_user_error(code, err, "pip install 'q-psa[cluster]'")


def test_ray_too_old(files, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(ray, "__version__", "2.3.1")
    code, _, err = cli(capsys, "imatrix", files["six"], "--text", files["text"], "--ctx", 32, "--workers", 2,
                       "--output", tmp_path / "i.gguf")
    assert_user_error(code, err, "Ray 2.3.1 is too old")


def test_address_that_does_not_answer(files, capsys, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    code, _, err = cli(capsys, "score", files["six"], "--text", files["text"], "--max-tokens", 64,
                       "--ray-address", f"127.0.0.1:{port}", "--out", tmp_path / "s.json")
    assert_user_error(code, err, f"127.0.0.1:{port}", "no Ray cluster answers")
    assert time.monotonic() - t < 30
    code, _, err = cli(capsys, "score", files["six"], "--max-tokens", 64, "--ray-address", "nonsense", "--out", tmp_path / "s.json")
    assert_user_error(code, err, "HOST:PORT")


def test_node_without_the_file_or_another_file(cluster, files, tmp_path):
    from qpsa.errors import QpsaError
    from qpsa.gguf.read import open_gguf
    from qpsa.parallel.ray_workers import RayExecutor

    sha = open_gguf(files["six"]).sha256
    with pytest.raises(QpsaError, match=r"node .*: no model file .*gone\.gguf"):
        RayExecutor(tmp_path / "gone.gguf", sha, 1)
    with pytest.raises(QpsaError, match=r"node .*: .*wide\.gguf has sha256 .*the driver's has"):
        RayExecutor(files["wide"], sha, 1)
    with pytest.raises(QpsaError, match="need 4 CPUs; the Ray cluster has 2"):
        RayExecutor(files["six"], sha, 4)
    with pytest.raises(QpsaError, match="on CUDA need 2 GPUs .one each.; the Ray cluster has 0"):  # a GPU per worker
        RayExecutor(files["six"], sha, 2, device="cuda")


def test_baseline_resumes_its_ablation_batches(cluster, files, capsys, tmp_path, monkeypatch):
    """A baseline run interrupted after its first ablation batch keeps it in <out>.ckpt; --resume on
    workers computes only the other batch, and the scores equal an uninterrupted run's."""
    import qpsa.scores.baselines as baselines

    args = ["baseline", files["six"], "--methods", "layer_ablation", "--text", files["text"], "--max-tokens", 64]
    whole = _json(capsys, *args, "--out", tmp_path / "whole.json")["methods"]["layer_ablation"]
    out = tmp_path / "b.json"
    real, calls = baselines.ablate_layers, []

    def ablate_then_die(state, unit):
        if calls:
            raise KeyboardInterrupt
        calls.append(unit)
        return real(state, unit)

    monkeypatch.setattr(baselines, "ablate_layers", ablate_then_die)
    code, _, err = cli(capsys, *args, "--out", out)
    assert code == 130, err
    monkeypatch.setattr(baselines, "ablate_layers", real)
    saved = json.loads(Path(str(out) + ".ckpt").read_text())["units"]
    assert list(saved) == ["0-3"]
    code, _, err = cli(capsys, *args, "--out", out)  # without --resume: refused, the checkpoint kept
    assert_user_error(code, err, "pass --resume")
    resumed = _json(capsys, *args, "--out", out, "--resume", "--workers", 2)["methods"]["layer_ablation"]
    assert list(resumed["details"]["execution"]["units"]) == ["4-5"]
    assert resumed["scores"] == whole["scores"] and resumed["uncertainty"] == whole["uncertainty"]
    assert not Path(str(out) + ".ckpt").exists()


def test_study_same_numbers(cluster, files):
    """The study's parts made of units (ablation batches, Q-PSA layers) on 2 workers: the same scores,
    hence the same pruning and looping."""
    from qpsa.experiments.study import StudyPlan, run_study
    from qpsa.model.load import load_model
    from qpsa.parallel.ray_workers import RayExecutor
    from qpsa.sources.texts import resolve_text

    loaded = load_model(str(files["six"]))
    text = resolve_text(str(files["text"]), None)
    plan = StudyPlan(max_tokens=64, samples_per_matrix=4, probes=2, convergence_n=(2,), prune_k=(1,), loop_k=(1,))
    one = run_study(loaded, text, plan, log=lambda line: None)
    with RayExecutor(files["six"], loaded.file.sha256, 2) as executor:
        two = run_study(loaded, text, plan, log=lambda line: None, executor=executor)
    for name in ("layer_ablation", "qpsa"):
        assert two.scores.methods[name].scores == one.scores.methods[name].scores, name
    assert [e.layers for e in two.prune.edits] == [e.layers for e in one.prune.edits]
    assert two.convergence[0]["scores"] == one.convergence[0]["scores"]
    assert two.execution["backend"] == "ray" and one.execution is None


def _on_demand_budget(path, ctx: int) -> int:
    """A --max-memory just above the on-demand minimum of `path` (batch 1, `ctx` tokens): layers dequantized as they run."""
    import torch

    from qpsa.gguf.read import open_gguf
    from qpsa.model.budget import plan_memory
    from qpsa.model.load import load_model
    from qpsa.model.weights import WeightStore

    config = load_model(str(path), tokenizer=False).config
    store = WeightStore.from_gguf(open_gguf(path), budget=0.0)
    return plan_memory(config, store, torch.device("cpu"), max_memory=2**40, batch=1, ctx=ctx).minimum + 1


def test_a_worker_loads_the_model_as_the_driver_did(cluster, files):
    """The Job carries the driver's load settings (device, --max-memory, the memory plan's inputs): a
    worker's model is on the same device, in the same dtype and weights mode, with the same cache budget."""
    from qpsa.model.load import load_model
    from qpsa.parallel.ray_workers import _Worker

    budget = _on_demand_budget(files["wide"], 64)
    driver = load_model(str(files["wide"]), max_memory=budget, batch=1, ctx=64)
    assert driver.compute()["weights"] == "on demand"
    worker = _Worker(str(files["wide"]), driver.file.sha256, 1)
    loaded = worker._model("float32", driver.model.load_options)
    assert loaded.compute() == driver.compute()
    assert loaded.model.load_options == driver.model.load_options


def test_sensitivity_on_demand_same_numbers_on_workers(cluster, files, capsys, tmp_path):
    budget = _on_demand_budget(files["wide"], 64)
    args = ["sensitivity", files["wide"], "--text", files["text"], "--ctx", 64, "--chunks", 1, "--to", "q4_0",
            "--max-memory", budget]
    one = _json(capsys, *args, "--out", tmp_path / "a")
    two = _json(capsys, *args, "--out", tmp_path / "b", "--workers", 2)
    assert one["model"]["weights"] == two["model"]["weights"] == "on demand"
    assert [r["kld"] for r in two["rows"]] == [r["kld"] for r in one["rows"]]


def test_a_unit_key_seen_again_is_counted_beside_the_first():
    """A study runs Q-PSA at several N on one executor with the same unit keys: every unit counts."""
    from qpsa.parallel.units import UnitLog

    log = UnitLog()
    log.add("0/layer", "w1", 1.0)
    log.add("0/layer", "w2", 2.0, attempts=2)
    log.add("0/layer", "w1", 3.0)
    assert list(log.units) == ["0/layer", "0/layer#2", "0/layer#3"]
    assert log.units["0/layer#2"]["attempts"] == 2 and "attempts" not in log.units["0/layer"]
    per = log.per_worker()
    assert per["w1"]["units"] == 2 and per["w2"]["units"] == 1 and per["w1"]["busy_seconds"] == 4.0
