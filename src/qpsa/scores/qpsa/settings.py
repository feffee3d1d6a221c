"""Q-PSA's settings and constants: what a run measures, and how (see `qpsa.scores.qpsa.run`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qpsa.errors import QpsaError
from qpsa.model.config import ALL_MATRICES, DENSE_MATRICES

MATRICES = DENSE_MATRICES  # a dense layer's seven; a model's own are ModelConfig.matrices (MoE, phi3)
# each matrix's number in the sample streams' seeds (the dense ones first, so their draws never change)
MATRIX_IDS = {m: k for k, m in enumerate(ALL_MATRICES)}
UNITS = ("weight", "block", "byte")
ESTIMATORS = ("exact", "probe")
PROBE_SCOPES = ("layer", "matrix")
# probes per layer (scope layer) or per matrix (scope matrix): ~410 and ~480 forward equivalents for
# SmolLM2 at N = 100 (30 layers × 2 directions × K (×7 matrices) × ~0.57 equivalents per direction)
DEFAULT_PROBES = {"layer": 12, "matrix": 2}
LAYER = "layer"  # the unit key's matrix part for a layer-scope probe
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_PRECISION = {"exact": "float64", "probe": "float32"}
DEFAULT_BATCH = 8  # no speed-up from larger batches on 2 CPU cores (GEMMs over 500 tokens already saturate them)
ALGORITHM = 1  # bump when a change alters the numbers for the same settings (checkpoints compare it)

FLOOR_LAYER = 0  # the noise floor is measured here: the most recomputation, so the largest floor
FLOOR_SAMPLES_PER_MATRIX = 1  # exact: this many samples of each matrix of FLOOR_LAYER (probe: 1 probe)
STREAMS = {"samples": 0, "probes": 1}
# float64 rounding relative to float32's: used to scale the measured float32 floor to float64's
ROUNDOFF_RATIO = 2.0**-52 / 2.0**-23


@dataclass(frozen=True)
class QpsaSettings:
    samples_per_matrix: int = 100
    seed: int = 42
    max_tokens: int = 500
    unit: str = "weight"
    estimator: str = "exact"
    probes: int | None = None  # None: DEFAULT_PROBES of the scope
    precision: str | None = None  # None: float64 for exact, float32 for probe
    batch_size: int = DEFAULT_BATCH
    probe_scope: str = "layer"
    # the layer's matrices: set from the model by score_qpsa (ModelConfig.matrices); not a setting of the numbers
    matrices: tuple[str, ...] = field(default=MATRICES, compare=False)

    def __post_init__(self):
        def whole(name, v, low):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise QpsaError(f"--{name} must be an integer ≥ {low} (got {v!r})")

        whole("samples-per-matrix", self.samples_per_matrix, 1)
        whole("seed", self.seed, 0)
        whole("max-tokens", self.max_tokens, 2)
        if self.probe_scope not in PROBE_SCOPES:
            raise QpsaError(f"--probe-scope must be one of {', '.join(PROBE_SCOPES)} (got {self.probe_scope!r})")
        if self.probes is None:
            object.__setattr__(self, "probes", DEFAULT_PROBES[self.probe_scope])
        whole("probes", self.probes, 1)
        whole("batch-size", self.batch_size, 1)
        if self.unit not in UNITS:
            raise QpsaError(f"--unit must be one of {', '.join(UNITS)} (got {self.unit!r})")
        if self.estimator not in ESTIMATORS:
            raise QpsaError(f"--estimator must be one of {', '.join(ESTIMATORS)} (got {self.estimator!r})")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise QpsaError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.estimator == "probe" and self.unit == "byte":
            raise QpsaError("--estimator probe needs --unit weight or block: raw byte moves are not sign-symmetric "
                            "and one scale hit makes a whole probe non-finite (use --estimator exact)")

    @property
    def resolved_precision(self) -> str:
        return self.precision or DEFAULT_PRECISION[self.estimator]

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.resolved_precision]

    def to_dict(self) -> dict:
        """Every setting that changes the numbers."""
        d = {"estimator": self.estimator, "unit": self.unit, "samples_per_matrix": self.samples_per_matrix,
             "seed": self.seed, "max_tokens": self.max_tokens, "precision": self.resolved_precision,
             "batch_size": self.batch_size, "algorithm": ALGORITHM}
        if self.estimator == "probe":
            d["probes"] = self.probes
            d["probe_scope"] = self.probe_scope
        return d

    @property
    def layer_probes(self) -> bool:
        return self.estimator == "probe" and self.probe_scope == "layer"

    @property
    def units_of_layer(self) -> tuple[str, ...]:
        """The checkpoint units of one layer: its matrices, or the whole layer for layer-scope probes."""
        return (LAYER,) if self.layer_probes else self.matrices
