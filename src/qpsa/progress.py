"""The one progress protocol: the caller passes it in, the computation reports through it.

A long computation takes either a `Progress` (when it has phases of its own, such as a study's
methods) and opens one task per phase, or, for a single phase whose size the caller knows, the
`Advance` that the caller's task yields. Domain code never draws anything: the CLI passes
`qpsa.report.progress.ConsoleProgress` (bars with ETA on stderr), library users pass their own
or nothing (`SILENT`).

    with progress.task("perplexity", n_windows) as advance:   # a Progress
        for w in windows:
            ...
            advance(f"PPL {ppl:.4f}")                          # one step done, a short status
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterator, Protocol


class Advance(Protocol):
    def __call__(self, status: str = "", steps: int = 1) -> None:
        """`steps` more units of the task are done; `status` is shown beside its bar."""


class Progress(Protocol):
    def task(self, label: str, total: int) -> AbstractContextManager[Advance]:
        """A task of `total` units, open for the `with` block; yields its Advance."""


def no_progress(status: str = "", steps: int = 1) -> None:
    """An Advance that reports nowhere (the default of every computation)."""


class Silent:
    """A Progress that reports nowhere."""

    @contextmanager
    def task(self, label: str, total: int) -> Iterator[Advance]:
        yield no_progress


SILENT = Silent()
