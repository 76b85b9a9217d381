"""MAILWARDEN_READ_DATABASE_URL: event reads of the API and the detectors go to the read URL.

The "replica" is a second schema on the test server, filled like the primary plus one event the
primary lacks, so every answer shows which connection served it. Alerts, keys and audit stay on
the primary (read-your-writes for triage).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.auth import KeyRing
from api.main import create_app
from pipeline.config import Settings
from pipeline.jobs import load_frame
from pipeline.parsers.base import conform
from pipeline.schema import Alert, EntityKind, Severity, event_ids
from pipeline.store import Store

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
MARKER_IP = "198.18.7.7"


def events_frame(ips: list[str], source_key: str, first_offset: int = 0) -> pl.DataFrame:
    rows = [
        {"row": i, "ts": T0 + timedelta(seconds=i), "source_ip": ip, "service": "api", "method": "POST",
         "path": "/v3/mail/send", "status": 202, "outcome": "ok", "account": "acct_1"}
        for i, ip in enumerate(ips)
    ]
    offsets = [first_offset + 10 * i for i in range(len(ips))]
    return conform(pl.DataFrame(rows)).drop("row").with_columns(
        pl.Series("event_id", event_ids(source_key, offsets)), pl.Series("origin", [f"r.log:{o}" for o in offsets])
    )


@pytest.fixture
def primary_and_replica(database_url: str) -> Iterator[tuple[str, str]]:
    if not database_url.startswith("postgresql"):
        pytest.skip("a read URL is for PostgreSQL replicas")
    base = database_url.split("?", 1)[0]
    schema = f"replica_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    replica = f"{base}?options=-csearch_path%3D{schema}"
    try:
        yield database_url, replica
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_api_and_detector_reads_use_the_read_url(primary_and_replica: tuple[str, str], tmp_path: Path) -> None:
    primary_url, replica_url = primary_and_replica
    primary, replica = Store.open(primary_url), Store.open(replica_url)
    shared = events_frame(["203.0.113.1", "203.0.113.2", "203.0.113.1"], "s" * 32)
    marker = events_frame([MARKER_IP], "m" * 32)
    for store in (primary, replica):
        store.write_batch(shared, [], None)
    replica.write_batch(marker, [], None)
    alert = Alert(
        detector="ip_burst", severity=Severity.HIGH, entity_kind=EntityKind.IP, entity="203.0.113.1",
        window_start=T0, window_end=T0 + timedelta(minutes=10), score=2.0, title="203.0.113.1: test", evidence={},
    )
    primary.upsert_alerts([alert])
    raw_key, _ = KeyRing(primary.engine).create("reader", ["events:read", "alerts:read"])
    replica.close()

    settings = Settings(database_url=primary_url, read_database_url=replica_url, pepper="p", data_dir=tmp_path)
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            headers = {"X-API-Key": raw_key}
            found = client.get("/events", params={"ip": MARKER_IP}, headers=headers)
            assert found.status_code == 200, found.text
            assert [e["event_id"] for e in found.json()["items"]] == marker["event_id"].to_list()
            both = client.get("/events", params={"ip": "203.0.113.1"}, headers=headers).json()["items"]
            want = shared.filter(pl.col("source_ip") == "203.0.113.1")["event_id"].to_list()
            assert sorted(e["event_id"] for e in both) == sorted(want)
            # Alerts come from the primary (the replica has none).
            listed = client.get("/alerts", headers=headers).json()["items"]
            assert [a["alert_id"] for a in listed] == [alert.alert_id]
    finally:
        app.state.api.store.close()

    # The detectors' window read goes to the read URL too; counts and watermarks stay on the primary.
    split = Store.open(primary_url, read_url=replica_url)
    try:
        window = split.load_events(T0 - timedelta(minutes=1), T0 + timedelta(minutes=1))
        assert MARKER_IP in set(window["source_ip"])
        detect_frame = load_frame(split, T0 - timedelta(minutes=1), T0 + timedelta(minutes=1))
        assert sorted(detect_frame["source_ip"]) == sorted([*shared["source_ip"], MARKER_IP])
        assert split.count_events() == shared.height
    finally:
        split.close()
        primary.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_second_connection_url_to_the_same_database(database_url: str, tmp_path: Path) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a read URL is for PostgreSQL replicas")
    tag = f"mw_read_{uuid.uuid4().hex[:8]}"
    read_url = f"{database_url}&application_name={tag}"
    store = Store.open(database_url)
    store.write_batch(events_frame(["203.0.113.9"] * 4, "t" * 32), [], None)
    raw_key, _ = KeyRing(store.engine).create("reader", ["events:read"])
    app = create_app(Settings(database_url=database_url, read_database_url=read_url, pepper="p", data_dir=tmp_path))
    try:
        with TestClient(app) as client:
            page = client.get("/events", params={"ip": "203.0.113.9"}, headers={"X-API-Key": raw_key}).json()
            assert len(page["items"]) == 4
            with store.engine.connect() as conn:
                sessions = conn.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :t"), {"t": tag}
                ).scalar_one()
            assert sessions >= 1  # the page was read over the second URL's connection
    finally:
        app.state.api.store.close()
        store.close()
