"""`mailwarden demo` ends with how to open the dashboard (and a key that works), and the analyst
notebooks execute against the demo store and against a store given by URL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from pipeline.config import Settings
from pipeline.demo_store import make_demo_key
from pipeline.store import Store

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
def test_demo_says_how_to_open_the_dashboard_with_a_working_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {**os.environ, "MAILWARDEN_PEPPER": "demo-test-pepper", "MAILWARDEN_DATA_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--database-url", url,
                           "--data-dir", str(tmp_path / "logs")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tail = done.stderr[done.stderr.index("open the dashboard"):]
    assert f"mailwarden serve --database-url '{url}'" in tail
    assert "http://127.0.0.1:8000/" in tail and "mailwarden report" in tail
    keys = re.findall(r"\bmwk_\S+", tail)
    assert len(keys) == 1

    store = Store.open(url)
    try:
        stored = store.list_alerts(limit=10_000)
        app = create_app(Settings(database_url=url, pepper="demo-test-pepper"), store=store)
        with TestClient(app) as client:
            page = client.get("/alerts", params={"limit": 1}, headers={"X-API-Key": keys[0]})
            assert page.status_code == 200 and page.json()["total"] == len(stored) > 0
            assert client.get("/plots/top_ips", headers={"X-API-Key": keys[0]}).status_code == 200
            # Running the demo again replaces its key: the old one stops working.
            make_demo_key(store)
            assert client.get("/alerts", headers={"X-API-Key": keys[0]}).status_code == 401
    finally:
        store.close()


def test_notebooks_are_committed_without_outputs() -> None:
    assert [p.stem for p in NOTEBOOKS] == ["01_explore_traffic", "02_investigate_alert", "03_tune_thresholds",
                                           "04_isolation_forest"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
            # They import the packages; no project code is pasted into them.
            assert "def detect(" not in cell.source and "class " not in cell.source


def _run(path: Path, cwd: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return book


def _printed(book: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_the_demo_store(path: Path, demo_store, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILWARDEN_SAMPLE_DIR", str(demo_store.folder))
    monkeypatch.delenv("MAILWARDEN_DATABASE_URL", raising=False)
    monkeypatch.delenv("MAILWARDEN_ALERT_ID", raising=False)
    book = _run(path, tmp_path)
    text = _printed(book)
    store = Store.open(demo_store.url)
    try:
        events = store.count_events()
        alerts = store.list_alerts(limit=10_000)
    finally:
        store.close()
    if path.stem != "03_tune_thresholds":
        assert f"{events:,} events" in text
    if path.stem == "02_investigate_alert":
        # The most severe open alert (of the latest window among equals) is the one investigated.
        worst = max(int(a["severity"]) for a in alerts if a["status"] == "open")
        latest = max(a["window_start"] for a in alerts if a["status"] == "open" and int(a["severity"]) == worst)
        candidates = [a for a in alerts if a["status"] == "open" and int(a["severity"]) == worst
                      and a["window_start"] == latest]
        assert sum(a["title"] in text for a in candidates) == 1
    if path.stem == "03_tune_thresholds":
        assert "highest threshold with the best recall" in text
    # Figures come out as Plotly JSON, drawn from the store's data.
    figures = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures


@pytest.mark.slow
def test_explore_notebook_on_a_postgresql_store_given_by_url(pg_database_url: str, demo_store, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    import sqlalchemy as sa

    from pipeline.jobs import ingest_paths

    schema = f"nb_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = f"{pg_database_url}?options=-csearch_path%3D{schema}"
    try:
        store = Store.open(url)
        try:
            ingest_paths(store, demo_store.settings().model_copy(update={"database_url": url}),
                         [str(demo_store.logs / "api.jsonl")], "auto")
            events = store.count_events()
        finally:
            store.close()
        monkeypatch.setenv("MAILWARDEN_DATABASE_URL", url)
        text = _printed(_run(NOTEBOOKS[0], tmp_path))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
    assert "store postgresql+psycopg://" in text and f"{events:,} events" in text
