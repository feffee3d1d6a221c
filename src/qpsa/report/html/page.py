"""The page: one self-contained HTML file (styles and script inline, charts as inline SVG, no
fetch of any kind). Numbers are HTML tables, readable without JavaScript; the script (below, ~60
lines) only adds sorting by column, instant tooltips on chart marks, a copy button, and records
any script error in the `data-script-errors` attribute of <html> for the browser tests."""

from __future__ import annotations

from html import escape

CSS = """
:root { --fg: #1d232b; --muted: #5b6470; --line: #d9dee5; --bg: #ffffff; --band: #f4f6f9; --accent: #2f5d9b; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--fg); background: var(--bg); line-height: 1.45;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", sans-serif; }
header.page { padding: 1.2rem 1.5rem 0.6rem; border-bottom: 1px solid var(--line); background: var(--band); }
header.page h1 { margin: 0 0 0.3rem; font-size: 1.45rem; }
header.page p { margin: 0.2rem 0; color: var(--muted); font-size: 0.9rem; }
nav.toc { display: flex; flex-wrap: wrap; gap: 0.3rem 1.2rem; margin-top: 0.6rem; font-size: 0.88rem; }
nav.toc ol { margin: 0.2rem 0 0.4rem; padding-left: 1.1rem; }
main.results { display: grid; gap: 1.5rem; padding: 1rem 1.5rem 2rem;
               grid-template-columns: repeat(auto-fit, minmax(min(100%, 36rem), 1fr)); }
main.results > article { min-width: 0; }
article > h2 { font-size: 1.25rem; margin: 0.4rem 0 0.6rem; padding-bottom: 0.3rem;
               border-bottom: 2px solid var(--accent); }
section { margin: 1.4rem 0 0; }
section h3 { font-size: 1.08rem; margin: 0 0 0.3rem; }
section h4 { font-size: 0.98rem; margin: 1rem 0 0.2rem; }
p.what { color: var(--muted); font-size: 0.88rem; margin: 0 0 0.6rem; max-width: 62rem; }
dl.defs { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 0.15rem 0.9rem; margin: 0;
          font-size: 0.88rem; background: var(--band); padding: 0.6rem 0.8rem; border-radius: 6px; }
dl.defs dt { font-weight: 600; color: var(--muted); }
dl.defs dd { margin: 0; overflow-wrap: anywhere; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, monospace; font-size: 0.82rem; }
.muted { color: var(--muted); }
ul.units { font-size: 0.86rem; margin: 0.2rem 0 0.6rem; padding-left: 1.2rem; }
.charts { display: grid; gap: 0.6rem; grid-template-columns: repeat(auto-fit, minmax(min(100%, 22rem), 1fr));
          margin: 0.4rem 0 0.8rem; }
.charts.one { grid-template-columns: minmax(0, 1fr); }
.charts.one svg.chart { max-width: 52rem; }
svg.chart { width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; margin: 0.4rem 0 0.8rem; max-width: 100%; }
.side { display: flex; flex-wrap: wrap; gap: 0 1.2rem; align-items: flex-start; }
.side .scroll { flex: 1 1 18rem; }
table { border-collapse: collapse; font-size: 0.84rem; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-size: 0.84rem; color: var(--muted); padding: 0.2rem 0; }
th, td { padding: 0.22rem 0.55rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; position: sticky; top: 0; }
td.num { text-align: right; white-space: nowrap; }
tbody tr:hover { background: #eef3fa; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " ▲"; font-size: 0.7em; }
table.sortable th[aria-sort=descending]::after { content: " ▼"; font-size: 0.7em; }
mark.diff { background: #ffe08a; color: #5a3b00; padding: 0 0.1rem; border-radius: 2px; }
.command { position: relative; }
.command pre { background: #1f2630; color: #e8edf3; padding: 0.7rem 0.8rem; border-radius: 6px; overflow-x: auto;
               white-space: pre-wrap; word-break: break-all; margin: 0.3rem 0; }
.command button { position: absolute; top: 0.35rem; right: 0.35rem; font-size: 0.78rem; }
#tip { position: fixed; z-index: 10; max-width: 26rem; background: #1f2630; color: #fff; font-size: 0.8rem;
       padding: 0.3rem 0.5rem; border-radius: 4px; pointer-events: none; }
footer { color: var(--muted); font-size: 0.8rem; padding: 0 1.5rem 1.5rem; }
@media (max-width: 600px) {
  header.page, main.results, footer { padding-left: 0.7rem; padding-right: 0.7rem; }
  body { font-size: 14px; }
  dl.defs { grid-template-columns: minmax(0, 1fr); }
  dl.defs dd { margin-bottom: 0.3rem; }
}
@media print { #tip, button { display: none; } }
"""

SCRIPT = r"""
(function () {
  var root = document.documentElement, errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message || e));
    root.setAttribute('data-script-errors', errors.join(' | '));
  });
  function key(td) {
    var v = td ? td.getAttribute('data-v') : null;
    if (v !== null && v !== '' && !isNaN(Number(v))) return Number(v);
    return td ? td.textContent.trim().toLowerCase() : '';
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable th'), function (th) {
    th.tabIndex = 0;
    th.title = (th.title ? th.title + ' (' : '(') + 'click to sort)';
    function sort() {
      var table = th.closest('table'), body = table.tBodies[0];
      var col = Array.prototype.indexOf.call(th.parentNode.children, th);
      var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
      Array.prototype.forEach.call(table.querySelectorAll('th'), function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a.cells[col]), y = key(b.cells[col]);
        if (typeof x !== typeof y) return (typeof x === 'number' ? -1 : 1);  // numbers before text
        return (x < y ? -1 : x > y ? 1 : 0) * dir;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener('click', sort);
    th.addEventListener('keydown', function (e) {
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sort(); }
    });
  });
  var tip = document.getElementById('tip');
  document.addEventListener('mousemove', function (e) {
    var g = e.target && e.target.closest ? e.target.closest('svg g[id]') : null, text = null;
    while (g && text === null) {
      var t = g.querySelector(':scope > title');
      if (t) text = t.textContent; else g = g.parentElement ? g.parentElement.closest('svg g[id]') : null;
    }
    if (text === null) { tip.hidden = true; return; }
    tip.textContent = text;
    tip.hidden = false;
    var x = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 6);
    var y = e.clientY + 16 + tip.offsetHeight > window.innerHeight ? e.clientY - tip.offsetHeight - 8 : e.clientY + 16;
    tip.style.left = Math.max(4, x) + 'px';
    tip.style.top = y + 'px';
  });
  Array.prototype.forEach.call(document.querySelectorAll('.command'), function (box) {
    var button = box.querySelector('button.copy'), code = box.querySelector('code');
    button.hidden = false;
    button.addEventListener('click', function () {
      var done = function () { button.textContent = 'copied'; };
      var select = function () { var r = document.createRange(); r.selectNodeContents(code);
        var s = window.getSelection(); s.removeAllRanges(); s.addRange(r); button.textContent = 'selected: Ctrl+C'; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(code.textContent).then(done, select);
      } else select();
    });
  });
  root.setAttribute('data-script', 'ran');
})();
"""


def render_page(title: str, subtitle: str, articles: list[tuple[str, str, list[tuple[str, str]], str]]) -> str:
    """The whole document. `articles`: (anchor id, heading, [(section title, section html)], run header html)."""
    toc = "".join(f'<div><a href="#{aid}">{escape(heading)}</a><ol>'
                  + "".join(f'<li><a href="#{_section_id(html)}">{escape(t)}</a></li>' for t, html in sections)
                  + "</ol></div>" for aid, heading, sections, _ in articles)
    body = "".join(f'<article id="{aid}"><h2>{escape(heading)}</h2>{header}'
                   + "".join(html for _, html in sections) + "</article>"
                   for aid, heading, sections, header in articles)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f'<header class="page"><h1>{escape(title)}</h1><p>{escape(subtitle)}</p>'
            f'<nav class="toc" aria-label="contents">{toc}</nav></header>'
            f'<main class="results">{body}</main>'
            "<footer>Written by <code>q-psa report</code>. One self-contained file: the numbers are HTML tables "
            "(readable without JavaScript), the charts inline SVG; hover a chart's bar, point or cell for its value "
            "± its uncertainty, click a table header to sort.</footer>"
            f'<div id="tip" role="tooltip" hidden></div><script>{SCRIPT}</script></body></html>\n')


def _section_id(html: str) -> str:
    start = html.find('id="') + 4
    return html[start:html.find('"', start)]
