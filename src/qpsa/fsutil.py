"""Crash-safe file writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` so that a reader sees either the old file or the new one, whole."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def cache_root() -> Path:
    """Where q-psa keeps derived files (tokenizers, hashes, downloads): $QPSA_CACHE, else ~/.cache/q-psa."""
    root = Path(os.environ.get("QPSA_CACHE") or Path.home() / ".cache" / "q-psa").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def user_file(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a missing, directory or unreadable `path` met inside the block into one QpsaError line
    naming `what` the file should be."""
    from qpsa.errors import QpsaError

    try:
        yield
    except FileNotFoundError:
        raise QpsaError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise QpsaError(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise QpsaError(f"{path}: cannot read: {e.strerror}") from None


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    """A file's bytes; a missing, directory or unreadable path is one QpsaError line naming `what` it should be."""
    path = Path(path)
    with user_file(path, what):
        return path.read_bytes()
