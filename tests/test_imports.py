"""One direction of imports in ``phds_serve``: no cycle, counting imports inside
functions (a deferred import hides a cycle from Python, not from the design).

The graph is read from the source (``ast``), module to module: ``from pkg import
sub`` is an edge to ``pkg.sub`` where ``sub`` is a module. And the config-level
decision imports no model or layer module (vLLM's direction: config -> registry
strings -> models -> layers).
"""

from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "phds_serve"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                          for alias in node.names]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycle():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_config_decision_imports_no_model_or_layer():
    graph = import_graph()
    seen, todo = set(), ["phds_serve.model_executor.contract"]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    # The registry of architecture names (strings) is allowed; model and layer modules are not.
    offending = sorted(m for m in seen if (".models." in m or ".layers" in m))
    assert not offending, offending


def test_the_check_sees_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    package = tmp_path / "phds_serve"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from phds_serve import b\n")
    (package / "b.py").write_text("def f():\n    from phds_serve.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    graph = import_graph()
    assert graph["phds_serve.a"] == {"phds_serve.b"} and graph["phds_serve.b"] == {"phds_serve.a"}


def level(module: str) -> int | None:
    """0: what k means (declared_k, routing); 1: kernels; 2: the engine plugin; None: the
    applications on top (server, train, eval, ...), which may import any of these."""
    if module in ("phds_serve.declared_k", "phds_serve.routing"):
        return 0
    if module.startswith("phds_serve.kernels"):
        return 1
    if module.startswith("phds_serve.model_executor"):
        return 2
    return None


def test_imports_point_down_from_the_meaning_of_k():
    upward = sorted(
        f"{src} -> {dst}"
        for src, targets in import_graph().items() if level(src) is not None
        for dst in targets if level(dst) is None or level(dst) > level(src)
    )
    assert not upward, upward
