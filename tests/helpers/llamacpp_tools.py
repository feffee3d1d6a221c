"""llama.cpp's command-line tools (llama-imatrix, llama-quantize, llama-perplexity) for cross-checks.

They are found in $QPSA_LLAMACPP_BIN, default ~/.cache/qpsa/llamacpp-build/bin (where the project's
build of a llama.cpp release puts them). Tests that need one are marked with `requires(...)`, which
skips them with the folder searched when a tool is absent.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

LLAMACPP_BIN = Path(os.environ.get("QPSA_LLAMACPP_BIN") or "~/.cache/qpsa/llamacpp-build/bin").expanduser()


def tool(name: str) -> Path:
    return LLAMACPP_BIN / name


def have(*names: str) -> bool:
    return all(os.access(tool(n), os.X_OK) for n in names)


def requires(*names: str):
    """pytest mark: skip unless every named tool is an executable in LLAMACPP_BIN."""
    return pytest.mark.skipif(not have(*names), reason=f"needs llama.cpp's {', '.join(names)} in {LLAMACPP_BIN} "
                                                       "(build llama.cpp there or set QPSA_LLAMACPP_BIN)")


def run_tool(name: str, *args, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run a tool; a failure shows its exit code and the end of its output."""
    proc = subprocess.run([str(tool(name)), *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc
