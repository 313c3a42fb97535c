"""Imports point one way: no import cycle among ``sidnet`` modules, and ``sidnet`` never imports the entry packages.

Read from the source with :mod:`ast`, not by importing: function-level imports count (they hide a cycle from Python,
not from a reader), relative imports are resolved, ``from pkg import name`` counts as an import of ``pkg.name`` when
that is a module and of ``pkg`` otherwise. A package's ``__init__`` re-exporting its modules is an edge like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_PACKAGES = ("train", "export", "deploy")
# shared pieces (the deploy graph, quantization, data, models, evaluation, io...) sit below the workflows
SHARED = ("sidnet.graph", "sidnet.quant", "sidnet.data", "sidnet.models", "sidnet.evaluation", "sidnet.checkpoint",
          "sidnet.io", "sidnet.letterbox", "sidnet.config", "sidnet.anchors", "sidnet.kernels", "sidnet.postprocess",
          "sidnet.resolvers", "sidnet.environment", "sidnet.cli", "sidnet.safety", "sidnet.progress",
          "sidnet.plots")  # fmt: skip
WORKFLOWS = ("sidnet.engine", "sidnet.export", "sidnet.runtime")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports anywhere in its body (functions included), as dotted names."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{sidnet module: the modules it imports}`` (all of them, sidnet's and others')."""
    files = sorted((root / "sidnet").rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(f, root, known) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle among the graph's own nodes (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _within(module: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycle_among_sidnet_modules():
    graph = import_graph(ROOT)
    assert len(graph) > 50, f"read only {len(graph)} modules under {ROOT / 'sidnet'}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_sidnet_never_imports_the_entry_packages():
    bad = sorted(f"{mod} imports {imp}" for mod, imps in import_graph(ROOT).items() for imp in imps
                 if _within(imp, ENTRY_PACKAGES))  # fmt: skip
    assert not bad, "the library imports an entry package (not installed): " + "; ".join(bad)


def test_shared_pieces_do_not_import_the_workflows():
    bad = sorted(f"{mod} imports {imp}" for mod, imps in import_graph(ROOT).items() if _within(mod, SHARED)
                 for imp in imps if _within(imp, WORKFLOWS))  # fmt: skip
    assert not bad, "a shared piece reaches up into a workflow: " + "; ".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a cycle closed by a function-level relative import, and an entry-package import."""
    pkg = tmp_path / "sidnet" / "a"
    pkg.mkdir(parents=True)
    (tmp_path / "sidnet" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from sidnet.a import two\n")
    (pkg / "two.py").write_text("def f():\n    from .one import g\n    import train.evaluate\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) == ["sidnet.a.one", "sidnet.a.two", "sidnet.a.one"]
    assert "train.evaluate" in graph["sidnet.a.two"]
