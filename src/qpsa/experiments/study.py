"""The original Q-PSA experiment in one run: every ranking method, then the rankings validated by
pruning and looping on held-out tokens, with rank agreement, Q-PSA's convergence over N, and the
cost of every method.

    result = run_study(loaded, text, StudyPlan.default())     # or StudyPlan.quick()
    write_study(result, Path("study-smollm2"))                 # results.md, study.json, PNG plots

Cost is reported in forward-pass equivalents: a method's wall time divided by the time of one
full forward pass over the same evaluation tokens, measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from qpsa.edits.pruning import EditReport, HeldOutEvaluator, LayerEdit, loop_candidates, prune_candidates, repeating, without
from qpsa.model.load import LoadedModel
from qpsa.progress import SILENT, Progress
from qpsa.scores.base import LayerScores, ScoreSettings, eval_tokens
from qpsa.scores.qpsa.settings import DEFAULT_PROBES
from qpsa.scores.registry import method_names
from qpsa.scores.results import ScoreRun, rank_agreement
from qpsa.sources.texts import EvalText

BASELINE_METHODS = tuple(method_names("baseline"))


@dataclass(frozen=True)
class StudyPlan:
    max_tokens: int = 500  # the original study's evaluation length; the held-out span has as many
    samples_per_matrix: int = 100  # Q-PSA's N, as in the original study
    probes: int = DEFAULT_PROBES["layer"]  # layer-scope probes per layer, as `q-psa score --estimator probe`
    convergence_n: tuple[int, ...] = (25, 50)  # smaller N, each ranked against the main N …
    convergence_every: int = 3  # … on every third layer (0, 3, 6, …), to keep the study's cost down
    prune_k: tuple[int, ...] = (1, 2, 4, 8)
    loop_k: tuple[int, ...] = (1, 2, 4)
    seed: int = 42

    @classmethod
    def quick(cls) -> StudyPlan:
        return cls(max_tokens=256, samples_per_matrix=25, probes=4, convergence_n=(10,), prune_k=(1, 2, 4),
                   loop_k=(1, 2))


@dataclass
class StudyResult:
    model: dict
    plan: dict
    scores: ScoreRun
    prune: EditReport
    loop: EditReport
    agreement: list[dict]
    convergence: list[dict]
    forward_seconds: float  # one full forward over the evaluation tokens
    cost: dict[str, dict] = field(default_factory=dict)  # method -> seconds, forward-pass equivalents
    seconds: float = 0.0
    execution: dict | None = None  # where the units ran (qpsa.parallel): backend, workers, per-unit timings
    resumed_steps: list[str] = field(default_factory=list)  # the steps taken from the checkpoint of a killed run

    def to_dict(self) -> dict:
        return {"model": self.model, "plan": self.plan, "scores": self.scores.to_dict(),
                "prune": self.prune.to_dict(), "loop": self.loop.to_dict(), "agreement": self.agreement,
                "convergence": self.convergence, "forward_seconds": self.forward_seconds, "cost": self.cost,
                "seconds": self.seconds, "execution": self.execution, "resumed_steps": self.resumed_steps}


def forward_seconds(loaded: LoadedModel, tokens: torch.Tensor, repeats: int = 3) -> float:
    """Median time of one full forward (logits at every position) over the tokens."""
    times = []
    with torch.inference_mode():
        loaded.model.forward(tokens)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            loaded.model.forward(tokens)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_study(loaded: LoadedModel, text: EvalText, plan: StudyPlan, progress: Progress = SILENT,
              log=print, executor=None, checkpoint=None) -> StudyResult:
    """Every registered score method, Q-PSA's convergence, and pruning and looping on held-out
    tokens; a progress task per method and per validation. `executor` (`qpsa.parallel`) runs the
    parts made of units (the layer ablation's batches, Q-PSA's layers); the rest runs here.
    `checkpoint` (a `qpsa.experiments.study_checkpoint.StudyCheckpoint` already checked against
    this run) keeps every finished step, and the units of the running one, in its folder; its
    finished steps are taken as they are."""
    from scipy.stats import spearmanr

    from qpsa.scores.base import LayerScores
    from qpsa.scores.results import ScoreRun

    start = time.perf_counter()
    n_layer = loaded.config.n_layer
    tokens = eval_tokens(loaded, text, plan.max_tokens)
    held_out = eval_tokens(loaded, text, plan.max_tokens, span="held-out")
    ckpt = checkpoint or _Unsaved()
    resumed = sorted(ckpt.steps)
    if resumed:
        log(f"resuming: {', '.join(resumed)} already finished")
    unit = ckpt.step("forward", lambda: forward_seconds(loaded, tokens.tokens))
    log(f"one forward over {tokens.tokens.shape[1]} tokens: {unit:.3f} s (the cost unit)")

    run = ckpt.step("baselines", lambda: _baselines(loaded, tokens, plan, progress, executor, checkpoint),
                    encode=ScoreRun.to_dict, decode=ScoreRun.from_dict)
    run.command = "study"

    def qpsa_at(n: int, layers: list[int]) -> LayerScores:
        return ckpt.step(f"qpsa N={n}" + ("" if len(layers) == n_layer else f" layers {','.join(map(str, layers))}"),
                         lambda: _qpsa(loaded, tokens, plan, n, layers, progress, executor, checkpoint),
                         encode=LayerScores.to_dict, decode=LayerScores.from_dict)

    main = qpsa_at(plan.samples_per_matrix, list(range(n_layer)))
    run.methods["qpsa"] = main
    run.settings["qpsa"] = {"estimator": "probe", "samples_per_matrix": plan.samples_per_matrix,
                            "probes": plan.probes, "probe_scope": "layer", "unit": "weight", "precision": "float32"}
    convergence = []
    subset = list(range(0, n_layer, plan.convergence_every))
    for n in plan.convergence_n:
        def row(n=n) -> dict:
            smaller = qpsa_at(n, subset)
            both = [i for i in subset if smaller.scores[i] is not None and main.scores[i] is not None]
            rho, p = spearmanr([smaller.scores[i] for i in both], [main.scores[i] for i in both])
            return {"n": n, "against_n": plan.samples_per_matrix, "layers": subset, "spearman": float(rho),
                    "p": float(p), "seconds": smaller.seconds, "scores": smaller.scores}

        convergence.append(ckpt.step(f"convergence N={n}", row))
        log(f"Q-PSA N={n} vs N={plan.samples_per_matrix}: Spearman ρ = {convergence[-1]['spearman']:.3f} "
            f"(p = {convergence[-1]['p']:.2g})")

    evaluator = HeldOutEvaluator(loaded, held_out)
    settings = {"model_sha256": loaded.file.sha256, "rankings": "this study"}
    prune = EditReport("prune", evaluator.base_ppl, held_out.describe(), settings=dict(settings, ks=list(plan.prune_k)))
    loop = EditReport("loop", evaluator.base_ppl, held_out.describe(), settings=dict(settings, ks=list(plan.loop_k), repeat=1))
    methods = list(run.methods)
    for report, ks, candidates, layer_order in ((prune, plan.prune_k, prune_candidates, without),
                                                (loop, plan.loop_k, loop_candidates, repeating)):
        saved = ckpt.steps.setdefault(report.kind, [])
        report.edits = [LayerEdit(**e) for e in saved]
        with progress.task(report.kind, len(methods) * len(ks) - len(saved)) as advance:
            for j, (m, k) in enumerate((m, k) for m in methods for k in ks):
                if j < len(saved):
                    continue
                chosen = candidates(run.methods[m], k, n_layer)
                report.edits.append(evaluator.edit(m, k, chosen, layer_order(n_layer, chosen)))
                saved.append(json.loads(json.dumps(asdict(report.edits[-1]))))
                ckpt.save()
                advance(f"{m} K={k}")

    prune.seconds = sum(e.seconds for e in prune.edits)
    loop.seconds = sum(e.seconds for e in loop.edits)
    cost = {m: {"seconds": s.seconds, "forward_equivalents": s.seconds / unit} for m, s in run.methods.items()}
    return StudyResult(
        model=loaded.describe(),
        plan=asdict(plan), scores=run, prune=prune, loop=loop, agreement=rank_agreement(run.methods),
        convergence=convergence, forward_seconds=unit, cost=cost, seconds=time.perf_counter() - start,
        execution=None if executor is None else executor.describe(), resumed_steps=resumed)


class _Unsaved:
    """The checkpoint of a study run without one: every step computed, nothing written."""

    def __init__(self):
        self.steps: dict = {}

    def step(self, name, compute, encode=None, decode=None):
        return compute()

    def save(self) -> None:
        pass


def _baselines(loaded, tokens, plan: StudyPlan, progress: Progress, executor, checkpoint):
    """Every baseline method; the layer ablation's batches in `layer_ablation.ckpt` beside the study's checkpoint."""
    from qpsa.scores.baselines import run_baselines

    inner = None
    if checkpoint is not None:
        import hashlib

        from qpsa.experiments.study_checkpoint import ABLATION
        from qpsa.scores.checkpoint import AblationCheckpoint

        header = {"model": loaded.file.sha256, "text": tokens.text.sha256, "max_tokens": plan.max_tokens,
                  "tokens": hashlib.sha256(tokens.tokens.numpy().astype("<i8").tobytes()).hexdigest()}
        path = checkpoint.inner(ABLATION)
        inner = AblationCheckpoint.load(path) if path.exists() else AblationCheckpoint(path, header)
        inner.check_matches(header)
    run = run_baselines(loaded, tokens, list(BASELINE_METHODS), ScoreSettings(plan.seed, plan.max_tokens), progress,
                        executor, inner)
    if inner is not None:
        checkpoint.steps["baselines"] = json.loads(json.dumps(run.to_dict()))  # saved before the inner one goes
        checkpoint.save()
        inner.delete()
    return run


def _qpsa(loaded, tokens, plan: StudyPlan, n: int, layers: list[int], progress: Progress, executor, checkpoint):
    """Q-PSA at N samples over `layers` (layer-scope probes); its units in `qpsa-N{n}.ckpt` beside the study's checkpoint."""
    import hashlib

    from qpsa.scores.checkpoint import Checkpoint
    from qpsa.scores.qpsa.run import score_qpsa
    from qpsa.scores.qpsa.settings import QpsaSettings

    settings = QpsaSettings(samples_per_matrix=n, seed=plan.seed, max_tokens=plan.max_tokens,
                            estimator="probe", probes=plan.probes, probe_scope="layer")
    inner = None
    if checkpoint is not None:
        header = {"model": {"sha256": loaded.file.sha256, "path": str(loaded.path), "n_layer": loaded.config.n_layer},
                  "text": {"sha256": tokens.text.sha256, "span": tokens.span, "start_token": tokens.start,
                           "n_tokens": int(tokens.tokens.shape[1]),
                           "tokens_sha256": hashlib.sha256(tokens.tokens.numpy().astype("<i8").tobytes()).hexdigest()},
                  "settings": settings.to_dict(), "layers": list(layers)}
        path = checkpoint.inner(f"qpsa-N{n}-{len(layers)}-layers.ckpt")
        inner = Checkpoint.load(path) if path.exists() else Checkpoint(path, header)
        inner.check_matches(header)
    with progress.task(f"qpsa N={n}", len(layers)) as advance:
        scores = score_qpsa(loaded, tokens, settings, layers, checkpoint=inner, advance=advance, noise_floor=False,
                            executor=executor).scores
    if inner is not None:
        inner.delete()  # the caller saves the step at once; a kill between the two recomputes only this step
    return scores
