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
