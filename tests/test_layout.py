"""The package's shape: no import cycles (function-level imports included) and no import up the pipeline
(data -> training -> evaluation -> analysis), read from the source with ``ast``, nothing imported."""

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"
PACKAGES = ("plwlab", "hydra_plugins")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (module level or inside functions)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (SRC / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from its package upward
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20  # the package was found
    assert cycles(graph) == []


# The pipeline, bottom to top: a module may import its own stage and the stages below, never one above.
STAGES = [
    ("plwlab", "plwlab.files"),  # the package's paths, atomic writes
    ("plwlab.data",),
    ("plwlab.config", "plwlab.rundir", "plwlab.runlock", "plwlab.results"),  # the contracts between stages: the
    # configs and their checks, a run directory (and its lock), the results table
    ("plwlab.training",),
    ("plwlab.evaluation",),
    ("plwlab.analysis",),
    ("plwlab.study",),
    ("plwlab.cli", "hydra_plugins"),
]


def stage(module: str) -> int:
    """The stage of a module: the longest prefix in :data:`STAGES` that names it."""
    best, rank = "", -1
    for i, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank >= 0, f"{module} belongs to no stage"
    return rank


def test_no_import_runs_up_the_pipeline():
    graph = import_graph()
    upward = [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets) if stage(b) > stage(a)]
    assert upward == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
