"""The package's shape (docs/architecture.md): imports point down the data flow, never in a cycle.

Every `import qpsa.X` / `from qpsa.X import …` in src/qpsa, at any depth of the file (imports
inside functions count: they are how the CLI defers heavy work, not a way around the rule), is
checked against LAYERS: a module may import from its own package and from packages on lower
layers only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qpsa"

# The data flow, bottom to top: GGUF file → model → evaluation → scores / edits / quantization →
# experiments → report → CLI. Packages on one layer may not import each other.
LAYERS = [
    {"__init__", "errors"},  # the package root holds only the version
    {"fsutil", "stats", "progress"},
    {"native"},  # compiled C helpers: the build and its cache (uses fsutil's cache folder)
    {"gguf"},
    {"sources", "reference"},
    {"model"},
    {"eval", "parallel"},
    {"scores"},
    {"edits", "quant"},
    {"experiments"},
    {"report"},
    {"cli"},
    {"__main__"},
]
LOOSE_MODULES_MAX = 6  # modules at the package top, __init__ included


def layer_of(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(top)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every qpsa import in the file, relative imports resolved."""
    out = []
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "qpsa"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qpsa":
                continue
            if target == "qpsa":  # `from qpsa import hub`: the names are modules
                out += [(f"qpsa.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((target, node.lineno))
    return out


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_package_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in all_modules()} - {"__init__"}
    unknown = sorted(t for t in tops if not any(t in names for names in LAYERS))
    assert not unknown, f"add these to LAYERS (and to docs/architecture.md): {unknown}"


def test_imports_point_down_the_flow():
    wrong = []
    for path in all_modules():
        me = module_name(path)
        mine = top_package(me)
        if mine == "__init__":
            continue
        for target, line in imports_of(path):
            theirs = top_package(target)
            if theirs == mine:
                continue
            if layer_of(theirs) >= layer_of(mine):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the flow (see docs/architecture.md):\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    names = {module_name(p) for p in all_modules()}
    for path in all_modules():
        me = module_name(path)
        for target, _ in imports_of(path):
            while target not in names and "." in target:  # `from qpsa.x import name`: the module is qpsa.x
                target = target.rsplit(".", 1)[0]
            if target != me and target in names:
                graph.setdefault(me, set()).add(target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a closed path, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_few_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= LOOSE_MODULES_MAX, f"modules loose at the package top: {loose}; give them a folder"


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"c"}}, None),
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_find_cycle(graph, expected):
    assert find_cycle(graph) == expected


def test_the_checks_catch_violations(tmp_path, monkeypatch):
    """A package with an upward import and a cycle: both checks must fail on it."""
    pkg = tmp_path / "qpsa"
    for rel, text in {"__init__.py": "", "gguf/__init__.py": "", "cli/__init__.py": "",
                      "gguf/read.py": "def f():\n    from qpsa.cli.app import main\n",
                      "cli/app.py": "from qpsa.gguf import read\nfrom .options import x\n",
                      "cli/options.py": "from qpsa.cli.app import y\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match=r"qpsa.gguf.read \(gguf\) imports qpsa.cli.app \(cli\)"):
        test_imports_point_down_the_flow()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
