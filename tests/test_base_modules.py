"""The modules every layer shares: statistics, the progress protocol, atomic writes."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch

from qpsa.fsutil import atomic_output, write_atomic
from qpsa.progress import SILENT, no_progress
from qpsa.report.progress import ConsoleProgress
from qpsa.stats import llamacpp_covariance_of_means, llamacpp_mean_se, mean_se

# ---- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [np.asarray, lambda x: torch.tensor(x, dtype=torch.float64)])
def test_mean_se_is_the_sample_sd_over_root_n(make):
    x = [1.0, 2.0, 4.0, 7.0]
    mean, se = mean_se(make(x))
    m = sum(x) / 4
    assert mean == pytest.approx(m, rel=1e-15)
    assert se == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in x) / 3) / 2, rel=1e-14)


@pytest.mark.parametrize("make", [np.asarray, lambda x: torch.tensor(x, dtype=torch.float64)])
def test_one_sample_has_an_unknown_standard_error(make):
    mean, se = mean_se(make([3.0]))
    assert mean == 3.0 and math.isnan(se)
    mean, se = mean_se(make(np.zeros(0)))
    assert math.isnan(mean) and math.isnan(se)


def test_mean_se_along_a_dimension():
    x = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    mean, se = mean_se(x, dim=1)
    assert mean.tolist() == [2.0, 2.0] and se.tolist() == [1.0, 0.0]
    _, se1 = mean_se(x[:, :1], dim=1)
    assert torch.isnan(se1).all()


def test_llamacpp_formula_and_its_small_n_rule():
    x = np.array([1.0, 2.0, 4.0, 7.0] * 3)
    mean, se = llamacpp_mean_se(x)
    n = len(x)
    assert se == pytest.approx(math.sqrt((np.mean(x * x) - mean**2) / (n - 1)), rel=1e-14)
    assert llamacpp_mean_se(x, min_n=13) == (mean, 0.0)  # llama.cpp prints 0 below its threshold
    assert llamacpp_mean_se(np.zeros(0)) == (0.0, 0.0)
    assert llamacpp_covariance_of_means(x, x) == pytest.approx(se**2, rel=1e-12)
    assert llamacpp_covariance_of_means(x[:5], x[:5]) == 0.0


# ---- progress ---------------------------------------------------------------------------------


def test_silent_progress_and_advance_take_the_protocol():
    with SILENT.task("x", 3) as advance:
        advance()
        advance("status", steps=2)
    no_progress("status", steps=4)


def test_console_progress_counts_steps_of_tasks_open_together(capsys):
    progress = ConsoleProgress()
    with progress.task("base", 4) as a, progress.task("other", 2) as b:
        display = progress._display
        a(steps=3)
        a("done")
        b()
        totals = {t.description: (t.completed, t.total) for t in display.tasks}
    assert totals == {"base": (4, 4), "other": (1, 2)}
    assert progress._display is None  # the display closes with the last task
    with ConsoleProgress(quiet=True).task("q", 1) as advance:
        advance()
    assert capsys.readouterr().out == ""


# ---- atomic writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_keep_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        with atomic_output(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
