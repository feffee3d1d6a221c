"""Progress bars with ETA on stderr: the CLI's `qpsa.progress.Progress`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from qpsa.progress import Advance, no_progress


class ConsoleProgress:
    """One rich display on stderr with a bar per open task (several may be open at once, as
    compare's two models are); `quiet` shows nothing (for --json)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._display = None
        self._open = 0

    @contextmanager
    def task(self, label: str, total: int) -> Iterator[Advance]:
        if self.quiet:
            yield no_progress
            return
        if self._display is None:
            self._display = _display()
            self._display.start()
        display = self._display
        task = display.add_task(label, total=total, status="")
        self._open += 1
        try:
            yield lambda status="", steps=1: display.update(task, advance=steps, status=status)
        finally:
            self._open -= 1
            if self._open == 0:
                display.stop()
                self._display = None


def _display():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    return Progress(*columns, console=Console(stderr=True), transient=False)


def progress_bar(label: str, total: int, quiet: bool = False):
    """One bar: `with progress_bar(label, total) as advance:` (a ConsoleProgress with one task)."""
    return ConsoleProgress(quiet).task(label, total)
