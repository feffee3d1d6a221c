"""One self-contained HTML page from any of q-psa's results (docs/report.md).

    write_report([Path("study-smollm2-135m")], None)           # -> study-smollm2-135m/report.html
    write_report([Path("a/study.json"), Path("b/study.json")], Path("both.html"))   # side by side
    write_report_beside(Path("noise-smollm2/noise.json"))      # -> noise-smollm2/noise.html

Pure: reads result files, writes one HTML file; imports nothing of q-psa but its errors and its
atomic write, so commands can call it after writing their JSON.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qpsa.errors import QpsaError
from qpsa.report.html.load import KINDS, Result, detect_kind, load_results

__all__ = ["KINDS", "detect_kind", "render_report", "write_report", "write_report_beside"]

log = logging.getLogger(__name__)

SIZE_WARNING = 10 * 2**20  # a study report is ~1 MB; much larger means something is drawn point by point


def write_report(paths: list[Path], output: Path | None = None) -> Path:
    """Write one HTML page for every result in `paths` (files or folders; several side by side) to
    `output`, or by default: FOLDER/report.html for one folder, FILE.html beside one file,
    ./report.html for several. Returns the path written. Bad input: QpsaError, one line."""
    paths = [Path(p) for p in paths]
    results = load_results(paths)
    output = Path(output) if output is not None else _default_output(paths)
    if output.is_dir():
        raise QpsaError(f"--output {output}: is a folder; give a file name ending in .html")
    if output.suffix.lower() not in (".html", ".htm"):
        raise QpsaError(f"--output {output}: give a file name ending in .html")
    if any(output.resolve() == r.path.resolve() for r in results):
        raise QpsaError(f"--output {output}: would overwrite an input")
    page = render_report(results)
    from qpsa.fsutil import write_atomic

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, page)
    except OSError as e:
        raise QpsaError(f"--output {output}: cannot write: {e.strerror or e}") from None
    if len(page.encode()) > SIZE_WARNING:
        log.warning("%s is %.1f MB", output, len(page.encode()) / 2**20)
    return output


def write_report_beside(json_path: Path) -> Path:
    """The report of one just-written results file, beside it: study.json -> report.html in its
    folder, any other NAME.json -> NAME.html."""
    json_path = Path(json_path)
    if json_path.name == "study.json":
        return write_report([json_path.parent], json_path.parent / "report.html")
    return write_report([json_path], json_path.with_suffix(".html"))


def render_report(results: list[Result]) -> str:
    """The page's HTML for results already loaded."""
    from qpsa.report.html.header import run_header, title_of
    from qpsa.report.html.page import render_page

    articles = []
    for k, r in enumerate(results):
        prefix = f"r{k}"
        try:
            sections = _sections(r, prefix)
            header = run_header(r)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
            raise QpsaError(f"{r.path}: a {r.kind} results file, but unreadable: missing or malformed "
                            f"{type(e).__name__}: {e}") from None
        articles.append((prefix, title_of(r), sections, header))
    title = articles[0][1] if len(articles) == 1 else f"q-psa report: {len(articles)} results side by side"
    subtitle = f"{len(results)} result(s) from {', '.join(str(r.path) for r in results)}; page written " \
               f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}"
    return render_page(title, subtitle, articles)


def _default_output(paths: list[Path]) -> Path:
    if len(paths) == 1:
        p = paths[0]
        return p / "report.html" if p.is_dir() else p.with_suffix(".html")
    return Path("report.html")


def _sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    """(title, html) of each section of one result, by its kind."""
    from qpsa.report.html import compare, noise, quant, study

    render = {"study": study.study_sections, "scores": study.scores_sections, "edits": study.edits_sections,
              "sensitivity": quant.sensitivity_sections, "plan": quant.plan_sections,
              "compare": compare.compare_sections, "noise": noise.noise_sections}[r.kind]
    return render(r, prefix)
