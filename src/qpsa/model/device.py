"""Where and in what precision the model computes, and how much memory there is to do it in.

    device = resolve_device("auto")              # cuda:0 where torch sees a GPU, else cpu
    dtype = resolve_dtype("bfloat16", device)    # QpsaError where the device cannot run it
    free, where = available_memory(device)       # bytes, and what limited them
    parse_size("12G")                            # 12 * 2**30

Memory on the CPU is what the kernel would give without swapping: /proc/meminfo's MemAvailable
(free memory plus reclaimable page cache), lowered by a cgroup's limit (v2 `memory.max` −
`memory.current`, or v1's `limit_in_bytes` − `usage_in_bytes`) where the process runs in one. On
CUDA it is `torch.cuda.mem_get_info`'s free memory plus what torch's caching allocator holds and
could reuse.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qpsa.errors import QpsaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda:0 where a GPU is visible, else cpu)"


def resolve_device(name: str | None) -> torch.device:
    """The torch device for --device; QpsaError for a name that is not a device here."""
    name = (name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise QpsaError(f"--device {name!r} is not a device: give {DEVICE_HELP}")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise QpsaError(f"--device {name}: {why}; use --device cpu")
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise QpsaError(f"--device {name}: there is no such GPU (this machine has {count}: cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The torch dtype for --dtype, checked by running the forward's operations in it on `device`."""
    name = (name or "float32").strip().lower()
    if name not in DTYPES:
        raise QpsaError(f"--dtype {name!r} is not supported: give one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype != torch.float32:
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise QpsaError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} cannot compute in bfloat16; "
                            "use --dtype float16 or float32")
        try:
            x = torch.ones(2, 4, 8, dtype=dtype, device=device)
            y = torch.nn.functional.linear(x, torch.ones(8, 8, dtype=dtype, device=device))
            torch.nn.functional.rms_norm(y, (8,), torch.ones(8, dtype=dtype, device=device))
            q = x.view(1, 2, 4, 8)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.log_softmax(y, dim=-1)
        except (RuntimeError, NotImplementedError) as e:
            raise QpsaError(f"--dtype {name}: the device {device} cannot compute in it ({str(e).splitlines()[0]})") from None
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from '24G', '1.5GB', '800M', '2GiB', '1000000' (powers of 1024); QpsaError otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise QpsaError(f"--max-memory {text!r} is not a size: give a number with K, M, G or T, e.g. 12G")
    unit = m.group(2).lower()
    value = float(m.group(1)) * (1024 ** ("kmgt".find(unit) + 1) if unit else 1)
    if value <= 0:
        raise QpsaError(f"--max-memory {text!r} must be more than zero")
    return int(value)


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free() -> int | None:
    """What a cgroup's limit leaves (limit − usage), or None where there is no limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(Path(limit)), _read_int(Path(usage))
        if cap is not None and used is not None and cap < 2**60:
            return max(0, cap - used)
    return None


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes this process could still allocate on `device`, where the figure comes from)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + reusable, f"free memory of {torch.cuda.get_device_name(device)}"
    available, where = None, "MemAvailable in /proc/meminfo"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    cgroup = _cgroup_free()
    if cgroup is not None and (available is None or cgroup < available):
        available, where = cgroup, "the cgroup's memory limit"
    if available is None:  # neither: not Linux; trust the physical memory
        import os

        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "physical memory"
    return available, where
