"""`q-psa study`: the original Q-PSA experiment in one command.

Registered in `qpsa.cli.app`; heavy imports happen inside the function so `q-psa --help` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qpsa.cli.options import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    ModelArg,
    RayAddressOpt,
    TextOpt,
    WorkersOpt,
    compute_options,
    console,
    model_stem,
    open_workers,
    results_folder,
)
from qpsa.errors import QpsaError


def study(
    model: ModelArg = "smollm2-135m",
    out: Annotated[Optional[str], typer.Option(help="folder for results.md, JSON and plots (default study-MODEL)")] = None,
    quick: Annotated[bool, typer.Option(help="smaller N, fewer tokens and K: a few minutes instead of ~20")] = False,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seed: Annotated[int, typer.Option(help="seed for sampling and the random baseline")] = 42,
    resume: Annotated[bool, typer.Option("--resume", help="continue a killed study from OUT/study.ckpt: "
                                                            "finished steps are not computed again")] = False,
    workers: WorkersOpt = None, ray_address: RayAddressOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
):
    """The original Q-PSA experiment in one command: all methods, pruning and looping tables, agreement, plots."""
    import dataclasses

    from qpsa.experiments.study import StudyPlan, run_study
    from qpsa.model.load import load_model
    from qpsa.report.progress import ConsoleProgress
    from qpsa.report.study_files import write_study
    from qpsa.sources.texts import resolve_text

    if seed < 0:
        raise QpsaError(f"--seed must be zero or more (got {seed})")
    out_dir = results_folder(out, f"study-{model_stem(model)}")
    eval_text = resolve_text(text, dataset)
    plan = dataclasses.replace(StudyPlan.quick() if quick else StudyPlan(), seed=seed)
    from qpsa.experiments.study_checkpoint import NAME, StudyCheckpoint

    ckpt_path, ckpt = out_dir / NAME, None
    if ckpt_path.exists():
        if not resume:
            raise QpsaError(f"{ckpt_path}: a checkpoint of an unfinished study exists; pass --resume to continue it "
                            "or delete it to start over")
        ckpt = StudyCheckpoint.load(ckpt_path)
    compute = compute_options(device, dtype, max_memory)
    executor = open_workers(workers, ray_address, model, compute["device"])
    loaded = load_model(model, batch=1, ctx=1024, grad=True, whole="fisher", **compute)
    header = StudyCheckpoint.header_of(loaded, eval_text, plan)
    if ckpt is None:
        if resume:
            console().print(f"no checkpoint at {ckpt_path}; starting from the beginning")
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = StudyCheckpoint(ckpt_path, header)
        ckpt.clear_inner()
        ckpt.save()
    ckpt.check_matches(header)
    screen = console()
    screen.print(f"[bold]Q-PSA study[/] of {loaded.path.name} ({loaded.config.n_layer} layers) on {eval_text.name} "
                 f"(sha256 {eval_text.sha256[:12]}…), {'quick' if quick else 'full'} plan")
    result = run_study(loaded, eval_text, plan, ConsoleProgress(), log=lambda line: screen.print(line),
                       executor=executor, checkpoint=ckpt)
    written = write_study(result, out_dir)
    ckpt.delete()
    from qpsa.report.tables import edit_report

    edit_report(screen, result.prune)
    edit_report(screen, result.loop)
    screen.print(f"study finished in {result.seconds / 60:.1f} min; wrote " + ", ".join(str(p) for p in written[:-1]))
    screen.print(f"report: {written[-1]}")
