"""Architecture guard: parsers, detectors and figures stay pure (no database, HTTP or clock)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [*ROOT.glob("pipeline/parsers/*.py"), *ROOT.glob("detectors/**/*.py"), ROOT / "pipeline" / "privacy.py"]
FORBIDDEN = ("sqlalchemy", "psycopg", "sqlite3", "httpx", "requests", "pipeline.store", "pipeline.jobs",
             "pipeline.sources", "pipeline.cli", "fastapi", "apscheduler")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=[str(p.relative_to(ROOT)) for p in PURE])
def test_pure_modules_do_no_io(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if n.startswith(FORBIDDEN))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    source = path.read_text()
    # Detectors and parsers are given `now` / reference_time; they never read the clock.
    assert "datetime.now(" not in source or path.name == "base.py", f"{path.name} reads the clock"
    assert "time.time(" not in source


PROJECT_MODULES = sorted(p for p in ROOT.glob("[pda]*/**/*.py") if "alembic" not in p.parts)


@pytest.mark.parametrize("path", PROJECT_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_starts_with_a_docstring(path: Path) -> None:
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"
