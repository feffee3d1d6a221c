"""The reports in a real browser: headless Chromium (Debian's `chromium`; `make setup` installs it
where it can) opens each kind of report, the test fails on any console message or script error,
finds the result's key numbers in the rendered page, and takes screenshots that are not blank.

Set QPSA_SCREENSHOTS=DIR to keep the screenshots (desktop 1280 px and phone 390 px wide) there.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.report_inputs import data_of, key_numbers

from qpsa.report.html import write_report

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (`apt-get install chromium`; "
                                                          "`make setup` installs it where it can)")]
KINDS = ["study", "scores", "edits", "sensitivity", "plan", "compare", "noise"]


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium, headless, on a file: URL, with no network (every host name fails to resolve) and
    console messages logged to stderr."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--enable-logging=stderr", "--v=0", "--host-resolver-rules=MAP * ~NOTFOUND",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args,
               page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def console_messages(stderr: str) -> list[str]:
    """Chromium's log lines for console messages: script errors, failed loads, console.log/error."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def rendered(page: Path, tmp_path: Path) -> str:
    """The DOM after the page's script ran; fails on any console message or recorded script error."""
    done = browse(page, tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert console_messages(done.stderr) == []
    dom = done.stdout
    head = dom[:dom.find(">", dom.find("<html")) + 1]
    assert 'data-script="ran"' in head, f"the page's script did not run: {head}"
    assert "data-script-errors" not in head, head
    return dom


def screenshot(page: Path, tmp_path: Path, width: int, height: int, name: str) -> Path:
    png = tmp_path / f"{name}-{width}.png"
    done = browse(page, tmp_path, f"--screenshot={png}", f"--window-size={width},{height}")
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    assert console_messages(done.stderr) == []
    keep = os.environ.get("QPSA_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
    return png


def assert_not_blank(png: Path) -> None:
    """Many colours (text, charts) and some pixels clearly not white (a blank page has one colour)."""
    import numpy as np
    from matplotlib.image import imread

    pixels = (imread(png)[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) > 50, f"{png.name}: only {len(colours)} colours"
    assert (pixels.min(axis=1) < 235).mean() > 0.01, f"{png.name}: almost all white"


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_renders_without_errors(results, kind, tmp_path):
    page = write_report([results[kind]], tmp_path / f"{kind}.html")
    text = visible_text(rendered(page, tmp_path))
    for needle in key_numbers(kind, data_of(results[kind])):
        assert needle in text, needle
    assert_not_blank(screenshot(page, tmp_path, 1280, 2000, kind))
    if kind == "study":
        assert_not_blank(screenshot(page, tmp_path, 390, 1600, kind))


def test_a_script_error_fails_the_check(tmp_path):
    """The check can fail: a page whose script throws is caught both ways (console and DOM)."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>"
                    "window.addEventListener('error', function (e) {"
                    "document.documentElement.setAttribute('data-script-errors', e.message); });"
                    "document.documentElement.setAttribute('data-script', 'ran'); notDefined();</script></body></html>")
    with pytest.raises(AssertionError):
        rendered(page, tmp_path)
    done = browse(page, tmp_path, "--dump-dom")
    assert any("notDefined" in line for line in console_messages(done.stderr))
    assert "data-script-errors" in done.stdout


def test_tables_sort_in_the_browser(results, tmp_path):
    """Clicking a header (twice: descending) reorders the rows by the cells' numbers."""
    page = write_report([results["edits"]], tmp_path / "edits.html")
    probe = ("<script>(function () { var t = document.querySelector('table.sortable');"
             "var th = t.tHead.rows[0].cells[4]; th.click(); th.click();"
             "var v = Array.prototype.map.call(t.tBodies[0].rows, function (r) {"
             "  return r.cells[4].getAttribute('data-v'); });"
             "document.documentElement.setAttribute('data-sorted', v.join(' ')); })();</script></body>")
    page.write_text(page.read_text(encoding="utf-8").replace("</body>", probe), encoding="utf-8")
    dom = rendered(page, tmp_path)
    values = [float(v) for v in re.search(r'data-sorted="([^"]*)"', dom).group(1).split()]
    expected = sorted((e["ratio"] for e in data_of(results["edits"])["edits"]), reverse=True)
    assert values == pytest.approx(expected) and len(values) > 1
