"""The run header of every result: model, file sha256, architecture, text and its sha256, settings,
versions, device and time, from whatever of these the result file holds."""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from qpsa.report.html.load import Result
from qpsa.report.html.tables import definitions, settings_text

KIND_TITLES = {
    "study": "Q-PSA study",
    "scores": "Layer scores",
    "edits": "Layer edits",
    "sensitivity": "Quantization sensitivity",
    "plan": "Mixed-precision plan",
    "compare": "Comparison of two quantizations",
    "noise": "Input sensitivity (noise and typos)",
}


def model_of(result: Result) -> dict:
    d = result.data
    if result.kind == "study":
        return d.get("model", {})
    if result.kind == "compare":
        return d.get("base", {})
    if result.kind == "plan":
        return d.get("model") or result.extra.get("header", {}).get("model", {})
    return d.get("model", {})


def title_of(result: Result) -> str:
    """"<kind title>: <model file>" for the page's headings."""
    d, kind = result.data, result.kind
    model = model_of(result)
    name = Path(str(model.get("path") or model.get("name") or result.path.name)).name
    if kind == "scores":
        return f"{KIND_TITLES[kind]} ({d.get('command', 'score')}): {name}"
    if kind == "edits":
        return f"{'Pruning' if d.get('kind') == 'prune' else 'Looping'}: {name}"
    if kind == "sensitivity":
        return f"{KIND_TITLES[kind]} to {d.get('type')}, one {d.get('granularity')} at a time: {name}"
    if kind == "compare":
        other = d.get("other", {})
        if other.get("type"):
            other_name = f"{name} requantized to {other['type']}"
        else:
            other_name = Path(str(other.get("path") or other.get("name"))).name
        return f"{KIND_TITLES[kind]}: {name} vs {other_name}"
    return f"{KIND_TITLES[kind]}: {name}"


def run_header(result: Result) -> str:
    """A <dl> of what produced the numbers below it."""
    d, kind = result.data, result.kind
    items: list[tuple[str, str]] = [("results file", escape(str(result.path)))]
    if kind == "compare":
        items += _model_items("base", d.get("base", {})) + _model_items("other", d.get("other", {}))
    else:
        items += _model_items("model", model_of(result))
    text = _text_of(result)
    if text:
        items.append(("text", escape(_text_line(text))))
        items.append(("text sha256", f"<code>{escape(str(text.get('sha256')))}</code>"))
    settings = _settings_of(result)
    if settings:
        items.append(("settings", escape(settings)))
    versions = _versions_of(result)
    if versions:
        items.append(("versions", escape(", ".join(f"{k} {v}" for k, v in versions.items()
                                                  if k not in ("threads", "cpu_kernels")))))
        if "threads" in versions or "cpu_kernels" in versions:
            items.append(("device", escape(f"CPU, {versions.get('threads', '?')} torch threads, "
                                           f"{versions.get('cpu_kernels', '?')} kernels")))
    items.append(("time", escape(_time_of(result))))
    return definitions(items, raw_html=True)


def _model_items(label: str, m: dict) -> list[tuple[str, str]]:
    if not m:
        return [(label, "not recorded in this file")]
    parts = [escape(str(m.get("name") or Path(str(m.get("path"))).name))]
    if m.get("path") and str(m["path"]) != str(m.get("name")):
        parts.append(f"<span class=muted>{escape(str(m['path']))}</span>")
    if m.get("architecture"):
        parts.append(f"architecture {escape(str(m['architecture']))}")
    if m.get("n_layer"):
        parts.append(f"{m['n_layer']} layers")
    if m.get("type"):
        parts.append(f"requantized in memory to {escape(str(m['type']))}"
                     + (f" ({escape(', '.join(m.get('tensor_types') or []))})" if m.get("tensor_types") else ""))
    items = [(label, ", ".join(parts))]
    sha = m.get("sha256") or m.get("requantized_from")
    if sha:
        items.append((f"{label} sha256" + (" (of the file requantized)" if not m.get("sha256") else ""),
                      f"<code>{escape(str(sha))}</code>"))
    return items


def _text_of(result: Result) -> dict:
    d = result.data
    if result.kind == "study":
        return d["scores"].get("text", {})
    if result.kind == "edits":
        return d.get("eval_text", {})
    if result.kind == "plan":
        return d.get("text") or result.extra.get("header", {}).get("text", {})
    text = dict(d.get("text") or {})
    if result.kind in ("sensitivity", "compare") and d.get("windows"):
        text["windows"] = d["windows"]
    if result.kind == "noise" and isinstance(d.get("embedding"), dict):
        text["windows"] = d["embedding"].get("windows")
    return text


def _text_line(text: dict) -> str:
    """"prose.txt (/path, 5,460 characters); score span from token 0: 256 tokens, 255 scored"."""
    about = [str(text[k]) for k in ("source",) if text.get(k)]
    if text.get("chars"):
        about.append(f"{text['chars']:,} characters")
    line = str(text.get("name")) + (f" ({', '.join(about)})" if about else "")
    if text.get("span") is not None:
        line += (f"; {text['span']} span from token {text.get('start_token')}: {text.get('n_tokens')} tokens, "
                 f"{text.get('n_scored')} scored")
    if text.get("windows"):
        line += f"; {text['windows']}"
    return line


def _settings_of(result: Result) -> str:
    d, kind = result.data, result.kind
    if kind == "study":
        return settings_text({"plan": d.get("plan", {}), **d["scores"].get("settings", {})})
    if kind in ("scores", "edits", "noise"):
        return settings_text(d.get("settings", {}))
    if kind == "sensitivity":
        return settings_text({k: d.get(k) for k in ("type", "granularity", "ctx", "chunks", "n_tokens") if k in d})
    if kind == "plan":
        head = result.extra.get("header", {})
        return settings_text({"target_bpw": d.get("target_bpw"), "granularity": d.get("granularity"),
                              "types": d.get("types"), "ctx": d.get("ctx", head.get("ctx")),
                              "chunks": d.get("chunks", head.get("chunks"))})
    if kind == "compare":
        gen = d.get("generations", {})
        return settings_text({"ctx": d.get("ctx"), "chunks": d.get("chunks"), "n_scored": d.get("n_scored"),
                              "max_new_tokens": gen.get("max_new_tokens"), "prompt format": gen.get("format"),
                              "base log-probs from": (d.get("base_logits") or {}).get("read_from")})
    return ""


def _versions_of(result: Result) -> dict:
    d = result.data
    if result.kind == "study":
        return d["scores"].get("versions", {})
    return d.get("versions") or {}


def _time_of(result: Result) -> str:
    d = result.data
    created = d["scores"].get("created") if result.kind == "study" else d.get("created")
    seconds = d.get("seconds")
    if seconds is None and result.kind == "compare":
        seconds = (d.get("timings") or {}).get("total_s")
    parts = [f"created {created}" if created else
             "file written " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result.path.stat().st_mtime))]
    if isinstance(seconds, (int, float)):
        parts.append(f"took {seconds / 60:.1f} min" if seconds >= 120 else f"took {seconds:.1f} s")
    return ", ".join(parts)
