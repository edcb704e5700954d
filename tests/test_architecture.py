"""postsim's packages: how each is installed, and the import direction between them (read from the AST).

core ← model_repository ← (server, client, models) ← (export, corpus, indexing, training, evaluation,
explanation) ← (bench, ui) ← cli. Within the fourth tier corpus/ is the format the others read, training uses
evaluation's metrics, and served evaluation embeds a corpus as indexing does; nothing else
imports sideways, so no cycle can form. A package imports another inside a function only
when that module needs an optional heavy dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TIERS: dict[str, int] = {
    "core": 0,
    "model_repository": 1,
    "server": 2,
    "client": 2,
    "models": 2,
    "export": 3,
    "corpus": 3,
    "indexing": 3,
    "training": 3,
    "evaluation": 3,
    "explanation": 3,
    "bench": 4,
    "ui": 4,
    "cli": 5,
}
"""Each top-level folder (package ``postsim.<folder>``) and its tier: a package imports lower tiers only."""

SIDEWAYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("export", "corpus"),
        ("indexing", "corpus"),
        ("training", "corpus"),
        ("evaluation", "corpus"),
        ("evaluation", "indexing"),
        ("training", "evaluation"),
    }
)
"""The imports allowed within one tier (importer, imported); their graph has no cycle."""

HEAVY_DEPENDENCIES = frozenset({"torch", "transformers", "optimum", "matplotlib", "pytorch_metric_learning"})
"""Optional dependencies (extras) that justify importing a module inside a function."""

LAZY_PACKAGES = frozenset({"cli"})
"""The command line imports each command's implementation when the command runs (instant ``--help``)."""


@dataclass(frozen=True)
class Import:
    source: Path
    line: int
    module: str
    in_function: bool

    @property
    def package(self) -> str | None:
        parts = self.module.split(".")
        return parts[1] if parts[0] == "postsim" and len(parts) > 1 else None


def imports(path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {
        id(inner)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(function)
        if inner is not function
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            yield Import(path.relative_to(ROOT), node.lineno, name, id(node) in nested)


def package_sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_path(module: str) -> Path | None:
    """The source file of ``postsim.<package>.<module...>``."""
    package, *rest = module.split(".")[1:]
    base = ROOT / package / Path(*rest) if rest else ROOT / package
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def needs_heavy_dependency(path: Path) -> bool:
    """Whether the module imports an optional heavy dependency at module level."""
    return any(not found.in_function and found.module.split(".")[0] in HEAVY_DEPENDENCIES for found in imports(path))


def test_every_top_level_package_is_placed_in_a_tier() -> None:
    folders = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert folders == set(TIERS), f"give the new package a tier in TIERS: {sorted(folders ^ set(TIERS))}"


def test_every_package_is_installed_typed_and_type_checked() -> None:
    """pyproject maps each folder onto postsim.<folder>, ships its py.typed, and mypy sees it through .ci/typecheck."""
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    expected = {f"postsim.{folder}": folder for folder in TIERS}
    assert setuptools["package-dir"] == expected
    assert sorted(setuptools["packages"]) == sorted(expected)
    for package, folder in expected.items():
        assert "py.typed" in setuptools["package-data"].get(package, []), package  # ui ships its page too
        assert (ROOT / folder / "py.typed").is_file(), folder
        link = ROOT / ".ci" / "typecheck" / "postsim" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), f"{link} must link to {folder}/"


def test_packages_import_only_downwards() -> None:
    against = [
        f"{found.source}:{found.line}: {importer} imports {found.module}"
        for importer in TIERS
        for source in package_sources(importer)
        for found in imports(source)
        if (imported := found.package) is not None
        and imported != importer
        and TIERS.get(imported, 0) >= TIERS[importer]
        and (importer, imported) not in SIDEWAYS
    ]
    direction = " ← ".join(
        "(" + ", ".join(name for name, rank in TIERS.items() if rank == tier) + ")"
        for tier in sorted(set(TIERS.values()))
    )
    assert not against, f"imports against the direction {direction}:\n" + "\n".join(against)


def test_postsim_modules_are_imported_inside_functions_only_for_optional_heavy_dependencies() -> None:
    lazy = [
        f"{found.source}:{found.line}: {found.module}"
        for importer in set(TIERS) - LAZY_PACKAGES
        for source in package_sources(importer)
        for found in imports(source)
        if found.in_function
        and found.package not in (None, importer)
        and (path := module_path(found.module)) is not None
        and not needs_heavy_dependency(path)
    ]
    assert not lazy, "import these at module level (they need no optional dependency):\n" + "\n".join(lazy)
