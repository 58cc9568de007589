"""What pyproject.toml and the Makefile promise a fresh clone on every Python the README names
(>= 3.10): the `trl` extra asks for TRL only where a TRL >= 1.16 exists (Python >= 3.11), ruff is
pinned exactly (a new ruff release cannot fail `ruff format --check`), and a test that needs TRL
skips on 3.10 saying why, and fails on 3.11+ where `make test` or CI installed the extra."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers import require_extra

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _extra(name: str) -> list[Requirement]:
    return [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"][name]]


def test_the_trl_extra_asks_for_trl_only_from_python_3_11():
    (trl,) = [r for r in _extra("trl") if r.name == "trl"]
    assert trl.specifier.contains("1.16.0") and not trl.specifier.contains("1.15.0")
    assert trl.marker is not None
    for version, wanted in (("3.10", False), ("3.11", True), ("3.12", True), ("3.13", True)):
        assert trl.marker.evaluate({"python_version": version}) is wanted, version
    # what the extra still installs on 3.10 has no marker: it resolves there
    assert all(r.marker is None for r in _extra("trl") if r.name != "trl")


def test_ruff_is_pinned_to_the_version_that_formatted_the_code():
    (ruff,) = [r for r in _extra("dev") if r.name == "ruff"]
    (pin,) = ruff.specifier
    assert pin.operator == "==", str(ruff)
    assert pin.version == importlib.metadata.version("ruff")  # `make test` installed the pin


def test_make_test_requires_the_extras_it_installs():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "IDEAL_EXTRAS_REQUIRED=1" in recipe


def test_a_test_that_needs_trl_skips_on_3_10_and_fails_where_it_must_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    for name in ("IDEAL_EXTRAS_REQUIRED", "IDEAL_TOOLS_REQUIRED", "CI"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"pip install 'ideal-mix\[trl\]'"):
        require_extra("trl", "trl")
    for name in ("IDEAL_EXTRAS_REQUIRED", "IDEAL_TOOLS_REQUIRED"):  # make test, backends-test
        monkeypatch.setenv(name, "1")
        with pytest.raises(pytest.fail.Exception, match="trl is not installed"):
            require_extra("trl", "trl")
        monkeypatch.delenv(name)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="trl is not installed"):
        require_extra("trl", "trl")
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    with pytest.raises(pytest.skip.Exception, match=r"needs Python >= 3\.11"):
        require_extra("trl", "trl")  # even where the extras are required: there is none


def test_no_test_skips_quietly_on_a_missing_extra_it_needs():
    """`pytest.importorskip` of an extra's package skips wherever it is missing, CI included:
    the tests take it through `require_extra`, which fails where the extra was installed."""
    offenders = [
        f"{path.name}:{number}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(f'importorskip("{m}' in line for m in ("trl", "lm_eval"))
    ]
    assert offenders == []
