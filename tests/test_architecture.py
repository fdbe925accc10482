"""The layering rule of ARCHITECTURE.md: pages -> core -> models, and core/models never import streamlit."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_models_is_pure() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"core", "pages", "streamlit", "sqlalchemy", "alembic"})
        for p in _modules("models")
    }
    assert _modules("models"), "models/ has no modules"
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_never_imports_streamlit_or_pages() -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"streamlit", "pages"}) for p in _modules("core")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_pages_do_not_touch_sql_or_torch() -> None:
    pages = _modules("pages")
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"sqlalchemy", "torch", "torchvision", "timm", "models"})
        for p in pages
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _core_imports(path: Path) -> set[str]:
    """The core packages and modules a module imports, as 'core.<first part>' (core.catalog, core.db, ...), plus
    'models' when it imports the models library."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] if node.module != "core" else [f"core.{a.name}" for a in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "models":
                found.add("models")
            elif parts[0] == "core" and len(parts) > 1:
                found.add(f"core.{parts[1]}")
    return found


# What each part of core may not import. Only core.ml and core.jobs train or load networks (models); the views read
# what they show through core.ml, except models.metrics' pure calibration arithmetic for the dashboard.
FORBIDDEN = {
    "catalog": {"core.ml", "core.jobs", "core.views", "core.cli", "core.api", "models"},
    "ml": {"core.jobs", "core.views", "core.cli", "core.api"},
    "jobs": {"core.views", "core.cli", "core.api"},
    "views": {"core.cli", "core.api"},
}


def test_each_part_of_core_imports_only_what_lies_below_it() -> None:
    offenders = {}
    for package, forbidden in FORBIDDEN.items():
        for path in _modules(f"core/{package}"):
            bad = _core_imports(path) & forbidden
            if bad:
                offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_only_ml_and_jobs_import_models() -> None:
    allowed = {"core/ml", "core/jobs"}
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"models"})
        for p in _modules("core")
        if not any(str(p.relative_to(ROOT)).startswith(a) for a in allowed)
        and "models" in _imports(p)
        and str(p.relative_to(ROOT)) != "core/views/dashboard.py"  # models.metrics: calibration bins and ECE
    }
    assert offenders == {}


def test_the_cli_registers_its_commands_by_plain_imports() -> None:
    """Every command module is imported by name in core/cli/__init__.py: none found at run time, none missed."""
    tree = ast.parse((ROOT / "core/cli/__init__.py").read_text(encoding="utf-8"))
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "core.cli"
        for alias in node.names
    }  # fmt: skip
    modules = {p.stem for p in (ROOT / "core/cli").glob("*.py")} - {"__init__", "__main__", "app"}
    assert modules <= imported, sorted(modules - imported)
    assert not _imports(ROOT / "core/cli/__init__.py") & {"importlib", "pkgutil"}


def test_every_module_has_its_line_in_the_internals_map() -> None:
    """docs/internals.md is where a newcomer looks a module up: a module missing there is a module nobody finds."""
    text = (ROOT / "docs/internals.md").read_text(encoding="utf-8")
    missing = []
    for package in ("core", "models"):
        for path in _modules(package):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if (
                "migrations" in parts
                or parts[-1] in ("__main__", "app")
                or (parts[-1] == "__init__" and len(parts) <= 3)  # core/__init__, core/ml/__init__: the sections
            ):
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if f"`{name}`" not in text:
                missing.append(name)
    assert missing == []
