"""Running the q-psa CLI in-process from tests, and checking its one-line user errors."""

from __future__ import annotations

from qpsa.cli.app import main


def run(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `q-psa ARGS...`; arguments may be paths or numbers."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and exactly one non-empty line on stderr, "q-psa: error: …", holding every needle."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("q-psa: error: "), err
    for needle in needles:
        assert needle in lines[0], err
