"""`q-psa report PATH…`: one self-contained HTML page from q-psa results.

Registered in `qpsa.cli.app`; the rendering is `qpsa.report.html` (see docs/report.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def report(
    paths: Annotated[list[str], typer.Argument(help="result files or folders: a study folder, scores, prune/loop, "
                                                    "sensitivity, plan, compare or noise JSON")],
    output: Annotated[Optional[str], typer.Option(help="the HTML file to write (default: beside the input)")] = None,
):
    """One self-contained HTML page from q-psa results (several side by side)."""
    from qpsa.report.html import write_report

    print(write_report([Path(p) for p in paths], Path(output) if output else None))
