"""Crash-safe file writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def user_mode() -> int:
    """The mode a new file gets from the user's umask (0o666 less the umask), as open() would give it."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_beside(path: Path) -> Path:
    """A new empty temporary file in `path`'s folder, with the user's umask mode (mkstemp's is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, user_mode())
    os.close(fd)
    return Path(tmp)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, and fsync the folder so the rename survives a crash."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new contents to; on success it replaces `path`
    (a reader sees the old file or the new one, whole), on any error it is removed."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` so that a reader sees either the old file or the new one, whole."""
    with atomic_output(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


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
