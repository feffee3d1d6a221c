"""HTML tables and number formats for the report: computes nothing, escapes everything.

Numbers are written as the study's results.md writes them: a value with 4 significant digits
(`format(x, ".4g")`), its standard error with 2 (`format(se, ".2g")`), joined by " ± ". Every
cell also carries its raw value in `data-v`, which the page's script sorts by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape


def num(x, spec: str = ".4g") -> str:
    """A number as text: `spec` for finite values, "—" for a missing one, "∞"/"nan" spelled out."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("∞" if x > 0 else "−∞")
    if isinstance(x, int) and spec == ".4g" and abs(x) < 10**7:
        return str(x)
    return format(x, spec)


def pm(x, se, spec: str = ".4g", se_spec: str = ".2g") -> str:
    """"value ± se" (just the value where se is missing)."""
    return num(x, spec) if se is None else f"{num(x, spec)} ± {uncertainty(se, se_spec)}"


def uncertainty(se, spec: str = ".2g") -> str:
    """A standard error with `spec` (2 significant digits), written out in full from 100 to 10⁶
    where ".2g" would switch to an exponent: 820, not 8.2e+02."""
    if spec == ".2g" and isinstance(se, (int, float)) and math.isfinite(se) and 100 <= abs(se) < 1e6:
        return f"{float(format(se, '.2g')):.0f}"
    return num(se, spec)


def pct(x, se=None, digits: int = 3) -> str:
    """A fraction as a percentage, as the compare tables print it: 0.98765 -> "98.765%"."""
    if x is None:
        return "—"
    text = f"{100 * x:.{digits}f}%"
    return text if se is None else f"{text} ± {100 * se:.{digits}f}%"


def size(n_bytes) -> str:
    """Bytes as MiB (or KiB below one MiB)."""
    if n_bytes is None:
        return "—"
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.1f} KiB"


@dataclass
class Cell:
    """One table cell: its text, the value it sorts by, an optional tooltip, and raw HTML if `html`."""

    text: str
    sort: float | str | None = None
    title: str | None = None
    html: bool = False
    cls: str = ""


def cell(text, sort=None, title=None, cls="") -> Cell:
    return Cell(str(text), sort, title, cls=cls)


def value_cell(x, se=None, spec=".4g", what: str | None = None, se_spec: str = ".2g") -> Cell:
    """A "value ± se" cell that sorts by the value."""
    return Cell(pm(x, se, spec, se_spec), _sortable(x), what, cls="num")


def pct_cell(x, se=None, what: str | None = None) -> Cell:
    """A fraction shown as a percentage (± se), sorting by the fraction."""
    return Cell(pct(x, se), _sortable(x), what, cls="num")


def _sortable(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def html_cell(markup: str, sort=None) -> Cell:
    return Cell(markup, sort, html=True)


def table(headers: list[str], rows: list[list[Cell | str]], caption: str | None = None, sortable: bool = True,
          header_titles: list[str | None] | None = None) -> str:
    """A <table> (sortable by clicking a header where the page's script runs), in a scrolling box."""
    out = ['<div class="scroll"><table' + (' class="sortable"' if sortable else "") + ">"]
    if caption:
        out.append(f"<caption>{escape(caption)}</caption>")
    titles = header_titles or [None] * len(headers)
    out.append("<thead><tr>" + "".join(
        f"<th{_attr('title', t)}>{escape(h)}</th>" for h, t in zip(headers, titles)) + "</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(_td(c) for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _td(c: Cell | str) -> str:
    if not isinstance(c, Cell):
        c = Cell(str(c))
    attrs = _attr("class", c.cls) + _attr("title", c.title)
    if c.sort is not None:
        attrs += _attr("data-v", repr(c.sort) if isinstance(c.sort, float) else str(c.sort))
    return f"<td{attrs}>{c.text if c.html else escape(c.text)}</td>"


def _attr(name: str, value) -> str:
    return "" if value in (None, "") else f' {name}="{escape(str(value), quote=True)}"'


def definitions(items: list[tuple[str, str]], raw_html: bool = False) -> str:
    """A <dl> of (term, description) pairs; descriptions are escaped unless `raw_html`."""
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{v if raw_html else escape(v)}</dd>" for k, v in items if v is not None)
    return f'<dl class="defs">{rows}</dl>'


def settings_text(settings: dict) -> str:
    """Settings as "key = value" pairs on one line, nested dicts flattened with dots."""
    parts = []
    for k, v in _flat(settings):
        if v is not None:
            parts.append(f"{k} = {v}")
    return "; ".join(parts)


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (list, tuple)):
            yield f"{prefix}{k}", ", ".join(map(str, v))
        else:
            yield f"{prefix}{k}", v
