"""Joining a real cluster, as docs/cluster.md says step by step: `ray start --head` with token
authentication (its own temporary folder and port, on 127.0.0.1), `ray status`, then `q-psa score
--ray-address`, whose scores equal the single-process run's. The finalizer stops exactly that
cluster: its processes are the process group that `ray start` led (plus any process naming the
cluster's private temporary folder), never a bare `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from helpers.cli_run import run as cli
from helpers.tiny import PROSE, write_tiny_gguf

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[2]
SCORE = ["--samples-per-matrix", 4, "--max-tokens", 64, "--estimator", "probe", "--probes", 2, "--probe-scope", "matrix",
         "--layers", "0-2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_naming(text: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                pass
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def head(request):
    """A one-node cluster from `ray start --head` (docs/cluster.md steps 1-2), its token in the
    environment; yields (address, env of a node or driver that holds the token)."""
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not on PATH")
    temp = tempfile.mkdtemp(prefix="qpsa-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    token = secrets.token_hex(16)
    node_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    start = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                              f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                             env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its pid leads the group every cluster process is in

    def stop():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _processes_naming(temp):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if _group_alive(start.pid):
                os.killpg(start.pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (_group_alive(start.pid) or _processes_naming(temp)):
                time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)

    request.addfinalizer(stop)
    output, _ = start.communicate(timeout=120)
    assert start.returncode == 0, output
    address = f"127.0.0.1:{port}"
    driver_env = {k: v for k, v in node_env.items() if k != "RAY_AUTH_MODE"}  # q-psa sets the mode for its token
    driver_env["PYTHONPATH"] = str(ROOT / "src")
    deadline = time.monotonic() + 60
    while True:  # step 4; "No cluster status" for the first seconds after the start
        status = subprocess.run([ray_cli, "status", f"--address={address}"], env=node_env, capture_output=True,
                                text=True, timeout=60)
        if "2.0 CPU" in status.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status.returncode == 0 and "2.0 CPU" in status.stdout, status.stdout + status.stderr
    return address, driver_env


@pytest.mark.slow
def test_score_on_a_cluster_started_with_ray_start(head, capsys, tmp_path):
    address, env = head
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    model = write_tiny_gguf(tmp_path / "six.gguf", "llama", n_layer=6, qtype=Q.Q4_1, std=0.04)
    args = ["score", str(model), "--text", str(text), *map(str, SCORE)]
    code, out, err = cli(capsys, *args, "--out", tmp_path / "one.json", "--json")
    assert code == 0, err
    one = json.loads(out)["methods"]["qpsa"]
    driver = subprocess.run([sys.executable, "-m", "qpsa", *args, "--out", str(tmp_path / "two.json"),
                             "--ray-address", address, "--workers", "2", "--json"],
                            env=env, capture_output=True, text=True, timeout=300)  # step 5
    assert driver.returncode == 0, driver.stderr[-3000:]
    assert "Token authentication" not in driver.stderr
    two = json.loads(driver.stdout)["methods"]["qpsa"]
    execution = two["details"]["run"]["execution"]
    assert execution["backend"] == "ray" and execution["address"] == address and execution["workers"] == 2
    assert len(execution["per_worker"]) == 2
    assert two["scores"] == one["scores"] and two["uncertainty"] == one["uncertainty"]
