"""Layering: the agent and the server are siblings that share runtime/, certs/ and protos/, and
each program's code imports only libraries its own install brings (the base dependencies plus
its extra). Read from the sources' import statements, so a lazy import counts as much as one at
the top of a module."""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("runtime", "certs", "protos")
FIRST_PARTY = {"agent", "server", *SHARED, "tests", "bench", "demo"}
# What each package may import of the others.
ALLOWED = {
    "agent": {"agent", *SHARED},
    "server": {"server", *SHARED},
    "runtime": {"runtime"},
    "certs": {"certs"},
    "protos": {"protos"},
}
# Developer tools shipped in the packages but never run by the programs.
DEVELOPER_TOOLS = {"protos/generate.py"}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def imported_top_levels(path: Path) -> set[str]:
    """Top-level names of everything ``path`` imports; relative imports stay in its package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add(path.relative_to(ROOT).parts[0])
            elif node.module:
                names.add(node.module.partition(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_packages_its_layer_allows(package):
    offenders = {
        path.relative_to(ROOT).as_posix(): sorted(forbidden)
        for path in modules(package)
        if (forbidden := (imported_top_levels(path) & FIRST_PARTY) - ALLOWED[package])
    }
    assert not offenders, f"{package}/ may import only {sorted(ALLOWED[package])}: {offenders}"


def test_import_reader_sees_imports_inside_functions():
    """The reader the layering rests on: the entry points import their own package only inside
    main(), after checking their extra, and those imports count."""
    assert {"runtime", "agent"} <= imported_top_levels(ROOT / "agent" / "__main__.py")
    assert {"runtime", "server"} <= imported_top_levels(ROOT / "server" / "__main__.py")


# --- Third-party libraries against the declared dependencies ---------------------------------


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _declared(extra: str | None) -> frozenset[str]:
    """podiam's base requirements plus those of ``extra``."""
    wanted = {None, extra}
    names = set()
    for requirement in metadata.requires("podiam") or []:
        found = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", requirement)
        if (found[1] if found else None) in wanted:
            names.add(_normal(_name(requirement)))
    return frozenset(names)


def _closure(names: frozenset[str]) -> set[str]:
    """The distributions ``names`` bring, with their own unconditional requirements."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in metadata.requires(name) or []:
            if ";" not in requirement:
                todo.append(_normal(_name(requirement)))
    return seen


def third_party_imports(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Third-party top-level module → the files of ``packages`` that import it."""
    found: dict[str, set[str]] = {}
    for package in packages:
        for path in modules(package):
            relative = path.relative_to(ROOT).as_posix()
            if relative in DEVELOPER_TOOLS:
                continue
            for name in imported_top_levels(path) - FIRST_PARTY - set(sys.stdlib_module_names):
                found.setdefault(name, set()).add(relative)
    return found


@pytest.mark.parametrize(
    ("component", "packages"),
    [
        ("agent", ("agent", *SHARED)),
        ("server", ("server", *SHARED)),
        (None, SHARED),  # podiam-certs, on the base install alone
    ],
)
def test_component_imports_only_libraries_its_install_brings(component, packages):
    provided = _closure(_declared(component))
    by_module = metadata.packages_distributions()
    undeclared = {
        module: sorted(files)
        for module, files in third_party_imports(packages).items()
        if not {_normal(d) for d in by_module.get(module, [])} & provided
    }
    install = f"podiam[{component}]" if component else "podiam"
    assert not undeclared, f"imported but not brought by {install}: {undeclared}"


def test_agent_install_brings_no_server_libraries():
    agent = _closure(_declared("agent"))
    for library in ("boto3", "botocore", "kubernetes-asyncio", "grpcio-health-checking"):
        assert library not in agent


def test_the_demo_builds_on_the_test_support_never_the_reverse():
    """demo/ is a developer tool made of tests/support's servers; the tests run it as a program
    (``python -m demo``) and import nothing from it, so it can leave or change freely."""
    importers = sorted(
        path.relative_to(ROOT).as_posix()
        for package in ("tests", "bench")
        for path in modules(package)
        if "demo" in imported_top_levels(path)
    )
    assert not importers, f"import from demo/: {importers}"
    assert {"tests"} <= set().union(*(imported_top_levels(p) for p in modules("demo")))
