"""One model and text for `sensitivity` and `plan`: the measured span's windows (and the held-out
span after it), the reference pass over them (made on first use), the importance matrix every
requantization is weighted by (if any), and the per-group measurements, checkpointed in the output
folder as each group finishes so a run can resume (only a run with the same imatrix, by sha256)."""

from __future__ import annotations

import json
from pathlib import Path

from qpsa.fsutil import write_atomic
from qpsa.progress import SILENT, Progress


class MeasurementSession:
    """One model and text for sensitivity and plan: the measured span's windows, the reference
    pass over them (made on first use), and the output folder."""

    def __init__(self, model: str, text: str | None, dataset: str | None, ctx: int, chunks: int, out: Path,
                 progress: Progress = SILENT, held_out: bool = False, imatrix: str | None = None,
                 compute: dict | None = None):
        from qpsa.eval.perplexity import make_windows
        from qpsa.model.load import load_model
        from qpsa.sources.texts import resolve_text

        self.out = out
        self.text = resolve_text(text, dataset)
        self.loaded = load_model(model, batch=1, ctx=ctx, **(compute or {}))
        self.imatrix = None  # with an importance matrix, every requantization is weighted by it
        self.imatrix_sha256 = None
        if imatrix is not None:
            from qpsa.gguf.read import file_sha256
            from qpsa.quant.imatrix import read_imatrix

            self.imatrix = read_imatrix(imatrix)
            self.imatrix.check_against(self.loaded.file)  # wrong model, zero counts: one line, before any work
            self.imatrix_sha256 = file_sha256(Path(imatrix))
        self.ctx, self.chunks, self.progress = ctx, chunks, progress
        windows = make_windows(self.loaded.tokenizer, self.text.text, ctx, 2 * chunks if held_out else chunks, None,
                               self.loaded.config.context_length)
        self.windows = _span(windows, 0, chunks)
        self.held_out = _span(windows, chunks, 2 * chunks) if held_out else None
        self._ref = None
        self.reference_seconds = None  # the reference pass's wall time: one forward over the windows
        self.executor = None  # where the groups run (qpsa.parallel; None: this process)
        self.measured = {}  # statistics by (group, exact types), shared across types
        self._rows = {}  # (type, granularity) -> {group: SensitivityRow} measured in this session

    def header(self) -> dict:
        return {"model": self.loaded.describe(),
                "text": self.text.describe(), "ctx": self.ctx, "chunks": self.chunks,
                "windows": f"windows 0..{self.chunks - 1} of {self.ctx} tokens (measured span)",
                "imatrix": None if self.imatrix is None else {"path": str(self.imatrix.path),
                                                              "sha256": self.imatrix_sha256}}

    def reference(self):
        from qpsa.quant.sensitivity import Reference
        if self._ref is None:
            import time

            start = time.perf_counter()
            with self.progress.task("reference pass", self.windows.tokens.shape[0]) as advance:
                self._ref = Reference(self.loaded.model, self.windows, advance)
            self.reference_seconds = time.perf_counter() - start
        return self._ref

    def checkpoint(self, qtype, granularity) -> Path:
        return self.out / f"sensitivity-{qtype.name}-{granularity}.json"

    def sensitivity(self, qtype, granularity: str, resume: bool, only: set[str] | None = None):
        """Every group requantized alone to qtype and measured; with `only`, just those groups (and
        the ones already measured in this session or, with `resume`, in the checkpoint)."""
        from qpsa.parallel import LocalExecutor
        from qpsa.quant.sensitivity import quant_groups, row_from_dict, run_sensitivity
        groups = quant_groups(self.loaded, granularity)
        path = self.checkpoint(qtype, granularity)
        done = {}
        if resume and path.exists():
            try:
                saved = json.loads(path.read_text())
                # the same imatrix by content (its sha256), wherever the file is now
                same = {k: saved.get(k) for k in ("model", "text", "ctx", "chunks", "type", "granularity")}
                same["imatrix"] = (saved.get("imatrix") or {}).get("sha256")
                want = {**{k: v for k, v in self.header().items() if k not in ("windows", "imatrix")},
                        "type": qtype.name, "granularity": granularity, "imatrix": self.imatrix_sha256}
                if same == json.loads(json.dumps(want)):
                    done = {r["group"]["name"]: row_from_dict(r) for r in saved["rows"]}
            except (OSError, ValueError, KeyError, TypeError):
                done = {}
        done.update(self._rows.get((qtype.name, granularity), {}))
        if only is not None:
            groups = [g for g in groups if g.name in only or g.name in done]
        self.out.mkdir(parents=True, exist_ok=True)
        ref = self.reference()
        rows = []

        def checkpoint(row):
            rows.append(row)
            partial = {**self.header(), "type": qtype.name, "granularity": granularity, "complete": False,
                       "rows": [r.to_dict() for r in list(done.values()) + rows]}
            write_atomic(path, json.dumps(partial, indent=2, default=str) + "\n")

        todo = len([g for g in groups if g.name not in done])
        with self.progress.task(f"requantizing to {qtype.name}, one {granularity} at a time", todo) as advance:
            def on_row(row):
                checkpoint(row)
                advance(f"{row.group.name}: KLD {row.stats.kld:.2e}")

            executor = self.executor or LocalExecutor(self.loaded)
            result = run_sensitivity(self.loaded, ref, qtype, groups, done, on_row, self.measured, self.imatrix,
                                     executor)
        result.granularity = granularity
        self._rows[(qtype.name, granularity)] = {r.group.name: r for r in result.rows}
        result.execution = executor.describe()
        return result


def _span(windows, first: int, last: int):
    from qpsa.eval.perplexity import Windows

    return Windows(windows.tokens[first:last], windows.score_from,
                   f"windows {first}..{last - 1} of {windows.tokens.shape[1]} tokens, second half scored")
