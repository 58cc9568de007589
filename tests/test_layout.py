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
    "ideal": 20,  # the lazy top-level API (strings only)
    "ideal.__main__": 20,
    "ideal.cli": 19,
    "ideal.cli_options": 18,
    "ideal.compare": 17,
    "ideal.loop": 16,
    "ideal.stages": 15,
    "ideal.summary": 14,
    "ideal.preflight": 14,
    "ideal.rundir": 14,
    "ideal.config": 13,
    "ideal.methods": 12,  # the update rule reads the influence step's sensitivities
    "ideal.influence": 11,
    "ideal.backends": 10,
    "ideal.lm": 9,
    "ideal.data": 8,
    "ideal.report": 8,
    "ideal.records": 7,
    "ideal.artifacts": 6,
    "ideal.hf": 6,
    "ideal.paired": 2,  # statistics over seeds of `ideal compare` (pure)
    "ideal.search": 2,  # the search recipe's settings (`search:`): read by the run config
    "ideal.settings": 1,
    "ideal.errors": 0,
    "ideal.distributed": 0,
    "ideal.progress": 0,
    "ideal.tiny": 0,
    "ideal.version": 0,
}


def module_name(path: Path) -> str:
    parts = ("ideal", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage (ideal.data.rows -> ideal.data), or itself."""
    for length in (2, 1):
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
    (fake / "data" / "sneaky.py").write_text("def f():\n    from ideal.loop import run_loop\n")
    (fake / "data" / "relative.py").write_text("from ..methods import rules\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == [
        "ideal.data.relative imports ideal.methods (ideal.data -> ideal.methods)",
        "ideal.data.sneaky imports ideal.loop (ideal.data -> ideal.loop)",
    ]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, init
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert module.name in doc, f"{init} does not list {module.name}"


def test_the_public_names_resolve():
    for name in ideal.__all__:
        assert getattr(ideal, name) is not None
