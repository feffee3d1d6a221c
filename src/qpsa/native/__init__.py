"""C sources compiled on first use: the build, its cache and loading through ctypes.

`build(source, name, flags, compiler())` compiles one C file into a shared library and returns its
path, or raises OSError/SubprocessError (no compiler, a failed build); the callers load it with
ctypes once per process and, where `enabled()` is False (QPSA_KERNEL=0 in the environment, not
Linux or macOS) or the build fails, use their pure-Python path instead. Each
library goes to <q-psa cache>/kernels/<name>-<key>.so, the key a hash of the source, the compiler's
version, the flags, the CPU (model and feature flags: what -march=native depends on) and the
machine type, so a change of any rebuilds it; it is written to a temporary file and renamed into
place, so concurrent processes never load half a library. Users: the model's inference kernels
(qpsa/model/kernel.py, kernels.c) and the quantizers' scale searches (qpsa/gguf/quants/native.py,
searches.c).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from qpsa.fsutil import cache_root


def enabled() -> bool:
    """False where compiled code is switched off (QPSA_KERNEL=0) or the platform has no build for it."""
    return os.environ.get("QPSA_KERNEL", "1") != "0" and platform.system() in ("Linux", "Darwin")


def compiler() -> str:
    return os.environ.get("CC", "cc")


def cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(lines)))


def build(source: Path, name: str, flags: list[str], cc: str, key_extra: bytes = b"") -> Path:
    """Compile `source` with `cc` and `flags` into <cache>/kernels/<name>-<key>.so, or return the cached
    library. Raises OSError or subprocess.SubprocessError when the compiler is missing or fails
    (nothing half-written is left behind)."""
    text = source.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    key = hashlib.sha256(text + version.encode() + cpu_id().encode() + platform.machine().encode() + key_extra).hexdigest()[:16]
    library = cache_root() / "kernels" / f"{name}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
    os.close(fd)
    try:
        command = [cc, *flags, "-fPIC", "-shared", str(source), "-o", partial]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library
