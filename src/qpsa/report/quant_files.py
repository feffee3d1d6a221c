"""The files `sensitivity` and `plan` write for each measured type: JSON, CSV and a plot."""

from __future__ import annotations

import json

from qpsa.fsutil import write_atomic
from qpsa.quant.sensitivity import SensitivityResult
from qpsa.quant.session import MeasurementSession
from qpsa.report.html import write_report_beside
from qpsa.report.plots import quant_sensitivity_plot


def write_sensitivity(session: MeasurementSession, result: SensitivityResult) -> list[str]:
    """The sensitivity JSON (with the session's header; `complete`), a CSV row per group and the plot; their paths."""
    path = session.out / f"sensitivity-{result.qtype}-{result.granularity}.json"
    write_atomic(path, json.dumps({**session.header(), **result.to_dict(), "complete": True}, indent=2, default=str) + "\n")
    csv_path = path.with_suffix(".csv")
    lines = ["group,type,bytes,bytes_before,kld,kld_se,kld_p99,dnll,dnll_se,ppl,ppl_base,same_top"]
    for r in result.rows:
        s = r.stats
        lines.append(f"{r.group.name},{r.qtype},{r.bytes},{r.bytes_before},{s.kld:.6g},{s.kld_se:.3g},"
                     f"{s.kld_p99:.6g},{s.dnll:.6g},{s.dnll_se:.3g},{s.ppl:.6g},{s.ppl_base:.6g},{s.same_top:.6f}")
    write_atomic(csv_path, "\n".join(lines) + "\n")
    png = path.with_suffix(".png")
    quant_sensitivity_plot(png, result, f"{session.loaded.path.name}: each {result.granularity} alone to {result.qtype} "
                                        f"({result.n_tokens} tokens of {session.text.name})")
    return [str(path), str(csv_path), str(png), str(write_report_beside(path))]


def write_predictors(session: MeasurementSession, result) -> list[str]:
    """predictors.json (with the session's header) and one scatter plot per type; their paths."""
    from qpsa.report.plots import predictor_scatter

    path = session.out / "predictors.json"
    write_atomic(path, json.dumps({**session.header(), **result.to_dict()}, indent=2, default=str) + "\n")
    files = [str(path)]
    for qtype, preds in result.predictions.items():
        png = session.out / f"predictors-{qtype}-{result.granularity}.png"
        rhos = {r.predictor: (r.rho, r.lo, r.hi) for r in result.rows if r.qtype == qtype}
        predictor_scatter(png, result.measured[qtype], {n: p.values for n, p in preds.items()}, rhos,
                          f"{session.loaded.path.name}: predicted vs measured KLD, each {result.granularity} to {qtype}")
        files.append(str(png))
    return files


def write_plan_plot(out, result) -> str:
    """plan.png beside plan.json: the plan's held-out KLD and size against the presets' and uniform
    types' (`PlanResult`); its path."""
    from qpsa.report.plots import plan_frontier

    points = [(m.label, m.bits_per_weight, m.stats.kld, m.stats.kld_se) for m in result.presets + result.uniform]
    plan = result.plan
    budget = f"the size of {result.target_preset}" if result.target_preset else f"{result.target_bpw:.3f} bpw"
    png = out / "plan.png"
    plan_frontier(png, points, result.frontier(), (plan.bits_per_weight, plan.stats.kld, plan.stats.kld_se),
                  result.target_bpw, f"{result.model_name}: plan at {budget} against llama-quantize's presets")
    return str(png)
