"""The package layout: data flows down. Every import is read from the code (ast), function-level
imports included, and checked against the parts' order (each part's __init__.py says the same)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import ideal

PACKAGE = Path(ideal.__file__).parent

# Higher imports lower, never the reverse; parts of one rank do not import each other.
RANKS = {
    "ideal": 30,  # the lazy top-level API (strings only)
    "ideal.__main__": 30,
    "ideal.cli": 29,
    "ideal.cli_options": 28,
    "ideal.run": 27,  # what runs a run: config ... loop, compare
    "ideal.methods": 20,  # the update rule reads the influence step's sensitivities
    "ideal.influence": 19,
    "ideal.backends.factory": 18,  # the trainer and evaluator a config names
    "ideal.backends.tools": 17,  # external trainers, parity checks
    "ideal.backends.evaluation": 16,
    "ideal.backends.training": 15,
    "ideal.backends": 14,  # protocol.py, settings.py
    "ideal.lm": 13,
    "ideal.data": 12,
    "ideal.report": 12,
    "ideal.records": 11,
    "ideal.artifacts": 10,
    "ideal.hf": 10,
    "ideal.paired": 2,  # statistics over seeds of `ideal compare` (pure)
    "ideal.settings": 1,
    "ideal.errors": 0,
    "ideal.distributed": 0,
    "ideal.progress": 0,
    "ideal.tiny": 0,
    "ideal.version": 0,
}
TOP_LEVEL_LIMIT = 16  # modules at the top of the package: the foundations and the command line


def module_name(path: Path) -> str:
    parts = ("ideal", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage (ideal.data.rows -> ideal.data), or itself."""
    for length in (3, 2, 1):
        name = ".".join(module.split(".")[:length])
        if name in RANKS:
            return name
    raise AssertionError(f"{module} is in no part of tests/test_layout.py's RANKS: give it a place")


def imports(path: Path) -> set[str]:
    """Every ideal module `path` imports, relative imports resolved against its package."""
    found = set()
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ideal"}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            found.add(".".join([*base, *([node.module] if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} if node.module.split(".")[0] == "ideal" else set()
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(module_name(path))
        for target in sorted(imports(path)):
            there = part_of(target)
            if there != here and RANKS[there] >= RANKS[here]:
                out.append(f"{module_name(path)} imports {target} ({here} -> {there})")
    return out


def test_no_module_imports_upward():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule bites: a data module importing the loop, inside a function, is found."""
    fake = tmp_path / "ideal"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake / "data" / "sneaky.py").write_text("def f():\n    from ideal.run.loop import run_loop\n")
    (fake / "data" / "relative.py").write_text("from ..methods import rules\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == [
        "ideal.data.relative imports ideal.methods (ideal.data -> ideal.methods)",
        "ideal.data.sneaky imports ideal.run.loop (ideal.data -> ideal.run)",
    ]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("**/__init__.py"):
        if init.parent == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, init
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert module.name in doc, f"{init} does not list {module.name}"


def test_the_public_names_resolve():
    for name in ideal.__all__:
        assert getattr(ideal, name) is not None


def module_graph() -> dict[str, set[str]]:
    """Module -> the ideal modules it imports (a package import counts as its __init__)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target in imports(path):
            while target not in modules and "." in target:  # `from ideal.x import name`
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    """No two modules import each other, directly or through others, function-level imports
    and imports for type checking included (the package __init__s only hold docstrings, except
    the lazy top-level API, which names modules as strings)."""
    assert circles(module_graph()) == []


def test_the_circle_check_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_top_level_keeps_the_foundations():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, top
