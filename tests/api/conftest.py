"""API test fixtures: the app on a real store (SQLite file and PostgreSQL), with keys, events and alerts."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.deps import ApiLimits, ApiState
from api.main import create_app
from pipeline.config import Settings
from pipeline.parsers.base import conform
from pipeline.schema import Alert, EntityKind, Severity, event_ids
from pipeline.store import Store

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)  # the same instant in the test modules
# A small hard cap keeps the cap tests quick; everything else uses the defaults.
TEST_LIMITS = ApiLimits(max_event_rows=5, max_ingest_bytes=64 * 1024, max_ingest_lines=500)


@dataclass
class Api:
    app: FastAPI
    client: TestClient
    store: Store
    state: ApiState

    def key(self, *scopes: str, name: str = "test") -> dict[str, str]:
        """Headers carrying a fresh key with these scopes."""
        raw, _ = self.state.keys.create(name, scopes)
        return {"X-API-Key": raw}

    def add_events(
        self, rows: Sequence[dict[str, Any]], source_key: str = "e" * 32, first_offset: int = 0
    ) -> list[str]:
        """Store events (parser-shaped rows) directly; returns their ids in order."""
        offsets = [first_offset + 100 * i for i in range(len(rows))]
        ids = event_ids(source_key, offsets)
        frame = conform(pl.DataFrame([{**r, "row": i} for i, r in enumerate(rows)])).drop("row").with_columns(
            pl.Series("event_id", ids), pl.Series("origin", [f"test.log:{o}" for o in offsets])
        )
        self.store.write_batch(frame, [], None)
        return ids

    def audit_rows(self) -> list[dict[str, Any]]:
        return list(reversed(self.state.queries.list_audit(limit=10_000)))


def make_alert(
    detector: str = "ip_burst",
    entity: str = "203.0.113.9",
    kind: EntityKind = EntityKind.IP,
    severity: Severity = Severity.HIGH,
    start: datetime = T0,
    minutes: int = 10,
    score: float = 1.0,
    evidence: dict[str, Any] | None = None,
) -> Alert:
    return Alert(
        detector=detector,
        severity=severity,
        entity_kind=kind,
        entity=entity,
        window_start=start,
        window_end=start + timedelta(minutes=minutes),
        score=score,
        title=f"{entity}: test alert from {detector}",
        evidence=evidence or {},
    )


def build_api(settings_dir: Path, store: Store, limits: ApiLimits = TEST_LIMITS) -> Api:
    url = str(store.engine.url.render_as_string(hide_password=False))
    settings = Settings(database_url=url, pepper="api-test-pepper", data_dir=settings_dir / "state")
    app = create_app(settings, store=store, limits=limits)
    return Api(app, TestClient(app), store, app.state.api)


def _empty(store: Store) -> None:
    """Delete every row (migrations stay applied): each test starts from an empty store."""
    tables = [t for t in sa.inspect(store.engine).get_table_names() if t != "alembic_version"]
    with store.engine.begin() as conn:
        for table in tables:
            conn.execute(sa.text(f'DELETE FROM "{table}"'))


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def api_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One migrated store per backend for all API tests: a SQLite file, and a schema on the
    PostgreSQL test server (migrating once per backend instead of once per test keeps the suite fast)."""
    if request.param == "sqlite":
        store = Store.open(f"sqlite:///{tmp_path_factory.mktemp('api') / 'api.db'}")
        yield store
        store.close()
        return
    base = request.getfixturevalue("pg_database_url")
    schema = f"api_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    store = Store.open(f"{base}?options=-csearch_path%3D{schema}")
    try:
        yield store
    finally:
        store.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def api(api_store: Store, tmp_path: Path) -> Iterator[Api]:
    """A fresh app on an emptied store, once on SQLite and once on PostgreSQL."""
    _empty(api_store)
    harness = build_api(tmp_path, api_store)
    try:
        yield harness
    finally:
        harness.client.close()


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Api]:
    """The app on its own SQLite file, for behaviour that does not depend on the database."""
    store = Store.open(f"sqlite:///{tmp_path / 'api.db'}")
    harness = build_api(tmp_path, store)
    try:
        yield harness
    finally:
        harness.client.close()
        store.close()


@pytest.fixture
def api_factory(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """build_api on a store the test made (e.g. one whose database is down)."""
    made: list[Api] = []

    def factory(store: Store, limits: ApiLimits = TEST_LIMITS) -> Api:
        made.append(build_api(tmp_path, store, limits))
        return made[-1]

    yield factory
    for harness in made:
        harness.client.close()
        harness.store.close()


@pytest.fixture
def alert_factory() -> Callable[..., Alert]:
    """make_alert: an Alert with test defaults, any field overridable."""
    return make_alert
