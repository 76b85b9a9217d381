"""Daily partitions, the DEFAULT partition, retention and index use, on a real PostgreSQL and SQLite file."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone

import polars as pl
import pytest
import sqlalchemy as sa
from alembic import command

from api.queries import ApiQueries, EventQuery
from pipeline.migrations import alembic_config
from pipeline.parsers.base import conform
from pipeline.partitions import (
    DEFAULT_PARTITION,
    is_partitioned,
    maintain,
    partition_days,
    partition_name,
    retention_cutoff,
)
from pipeline.schema import event_ids
from pipeline.store import Store, make_engine

NOW = datetime(2026, 12, 4, 9, 30, tzinfo=timezone.utc)


def make_events(times: list[datetime], source_key: str, seed: int = 1) -> pl.DataFrame:
    """Store-ready events (ids from a source key and offsets, like a file read) at the given times."""
    rng = random.Random(seed)
    rows = [
        {
            "row": i,
            "ts": t,
            "source_ip": f"198.51.{rng.randrange(0, 40)}.{rng.randrange(1, 250)}",
            "service": "api",
            "scheme": "https",
            "method": "POST",
            "path": "/v3/mail/send",
            "status": 202,
            "outcome": rng.choice(["ok", "ok", "ok", "auth_failed"]),
            "api_key_id": rng.choice([None, f"key{rng.randrange(0, 300):04d}"]),
            "account": f"acct_{rng.randrange(0, 500)}",
        }
        for i, t in enumerate(times)
    ]
    offsets = [100 * i for i in range(len(times))]
    return (
        conform(pl.DataFrame(rows))
        .drop("row")
        .with_columns(
            pl.Series("event_id", event_ids(source_key, offsets)),
            pl.Series("origin", [f"part.log:{o}" for o in offsets]),
        )
    )


def spread(start: datetime, days: int, per_day: int) -> list[datetime]:
    step = timedelta(days=1) / per_day
    return [start + i * step for i in range(days * per_day)]


@pytest.fixture
def pg_store(database_url: str) -> Iterator[Store]:
    if not database_url.startswith("postgresql"):
        pytest.skip("partitions are a PostgreSQL feature (SQLite is covered by the retention test)")
    store = Store.open(database_url)
    yield store
    store.close()


def partition_counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1")).all()
    return {name.split(".")[-1]: n for name, n in rows}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_events_table_is_partitioned_by_day_with_a_default(pg_store: Store) -> None:
    with pg_store.engine.connect() as conn:
        assert is_partitioned(conn)
        days = partition_days(conn)
        kinds = dict(
            conn.execute(
                sa.text(
                    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass('events')"
                )
            ).all()
        )
        key = conn.execute(
            sa.text(
                "SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_index x "
                "JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey) "
                "WHERE x.indrelid = to_regclass('events') AND x.indisprimary"
            )
        ).scalar()
    assert kinds[DEFAULT_PARTITION] == "DEFAULT"
    today = datetime.now(timezone.utc).date()
    assert {today + timedelta(days=i) for i in range(0, 8)} <= set(days)
    assert sorted(key) == ["event_id", "ts"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_old_events_land_in_default_then_move_into_their_own_partition(pg_store: Store) -> None:
    old_day = date(2025, 3, 9)
    start = datetime(2025, 3, 9, tzinfo=timezone.utc)
    frame = make_events(spread(start, 1, 500) + spread(start + timedelta(days=1), 1, 300), "a" * 32)
    first = pg_store.write_batch(frame, [], None)
    assert first.inserted == frame.height  # nothing rejected although no partition covered those days
    assert partition_counts(pg_store) == {DEFAULT_PARTITION: frame.height}

    done = maintain(pg_store.engine, NOW, days_ahead=2)
    assert {partition_name(old_day), partition_name(old_day + timedelta(days=1))} <= set(done.created)
    assert done.moved_from_default == frame.height
    counts = partition_counts(pg_store)
    assert counts == {partition_name(old_day): 500, partition_name(old_day + timedelta(days=1)): 300}

    # The moved rows still deduplicate: a replay of the batch stores nothing.
    again = pg_store.write_batch(frame, [], None)
    assert (again.inserted, again.duplicates) == (0, frame.height)
    assert pg_store.count_events() == frame.height
    # A second run has nothing left to do.
    assert maintain(pg_store.engine, NOW, days_ahead=2).created == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_retention_drops_whole_partitions(pg_store: Store) -> None:
    start = datetime(2026, 11, 24, tzinfo=timezone.utc)
    frame = make_events(spread(start, 10, 240), "b" * 32)
    pg_store.write_batch(frame, [], None)
    maintain(pg_store.engine, NOW, days_ahead=1)  # every day gets its partition
    before = partition_days_of(pg_store)
    assert date(2026, 11, 24) in before

    done = maintain(pg_store.engine, NOW, days_ahead=1, retention_days=3)
    cutoff = retention_cutoff(NOW, 3)
    expected = frame.filter(pl.col("ts") >= cutoff).height
    assert cutoff == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert pg_store.count_events() == expected
    assert sorted(done.dropped) == sorted(
        partition_name(d) for d in before if d < cutoff.date()
    )
    assert min(partition_days_of(pg_store)) == cutoff.date()
    assert done.deleted == 0  # nothing was in DEFAULT: whole partitions went


def partition_days_of(store: Store) -> set[date]:
    with store.engine.connect() as conn:
        return set(partition_days(conn))


def test_retention_on_sqlite_deletes_in_batches(tmp_path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'retention.db'}")
    try:
        frame = make_events(spread(datetime(2026, 11, 20, tzinfo=timezone.utc), 14, 50), "c" * 32)
        store.write_batch(frame, [], None)
        done = maintain(store.engine, NOW, retention_days=5)
        cutoff = retention_cutoff(NOW, 5)
        assert done.deleted == frame.filter(pl.col("ts") < cutoff).height
        assert store.count_events() == frame.filter(pl.col("ts") >= cutoff).height
        lo, _hi = store.event_time_range()
        assert lo == cutoff
        assert done.created == [] and done.dropped == []  # SQLite has no partitions
    finally:
        store.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_upgrade_moves_existing_events_into_daily_partitions(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        command.upgrade(alembic_config(engine), "0003")
        plain = Store(engine)
        frame = make_events(spread(datetime(2026, 6, 1, tzinfo=timezone.utc), 3, 100), "d" * 32)
        # Rows written by the pre-partition schema (its key is event_id alone).
        with engine.connect() as conn:
            assert not is_partitioned(conn)
        plain.write_batch(frame, [], None)
        command.upgrade(alembic_config(engine), "head")
        store = Store(engine)
        assert store.count_events() == frame.height
        counts = partition_counts(store)
        assert counts == {partition_name(date(2026, 6, d)): 100 for d in (1, 2, 3)}
        assert store.write_batch(frame, [], None).inserted == 0
    finally:
        engine.dispose()


def _plans(store: Store, call) -> list[str]:
    """EXPLAIN of every SELECT on events that `call` runs, with the parameters it ran with."""
    captured: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and " events" in statement:
            captured.append((statement, parameters))

    for engine in {store.engine, store.read_engine}:
        sa.event.listen(engine, "before_cursor_execute", grab)
    try:
        call()
    finally:
        for engine in {store.engine, store.read_engine}:
            sa.event.remove(engine, "before_cursor_execute", grab)
    assert captured, "the call ran no query on events"
    plans = []
    with store.engine.connect() as conn:
        for statement, parameters in captured:
            rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars().all()
            plans.append("\n".join(rows))
    return plans


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_detector_and_api_queries_use_indexes_and_prune_partitions(pg_store: Store) -> None:
    start = datetime(2026, 11, 27, tzinfo=timezone.utc)
    frame = make_events(spread(start, 4, 15_000), "e" * 32, seed=3)
    pg_store.write_batch(frame, [], None)
    maintain(pg_store.engine, NOW, days_ahead=1)
    with pg_store.engine.connect() as conn:
        conn.execute(sa.text("ANALYZE events"))
        conn.commit()
    one_ip = frame["source_ip"][123]
    one_key = frame.filter(pl.col("api_key_id").is_not_null())["api_key_id"][7]
    hour = (datetime(2026, 11, 29, 10, tzinfo=timezone.utc), datetime(2026, 11, 29, 11, tzinfo=timezone.utc))
    queries = ApiQueries(pg_store)

    # The detectors' window read: one hour of one day, read through the ts index of one partition.
    window = _plans(pg_store, lambda: pg_store.load_events(*hour))
    assert any("ix_events_ts" in p or "events_p20261129_ts_idx" in p for p in window), window
    assert all("events_p20261129" in p for p in window)
    assert not any(f"events_p2026112{d}" in p for p in window for d in (7, 8)), "other days were scanned"

    # The API's searches by address and by key, newest first.
    by_ip = _plans(pg_store, lambda: queries.search_events(EventQuery(ip=one_ip), limit=50))
    by_key = _plans(pg_store, lambda: queries.search_events(EventQuery(api_key_id=one_key), limit=50))
    filled = {f"events_p2026{d}" for d in ("1127", "1128", "1129", "1130")}
    for plans, column in ((by_ip, "source_ip"), (by_key, "api_key_id")):
        scans = scan_kinds(plans)
        assert filled <= set(scans), plans
        # Every partition that holds data is read through an index on the searched column.
        for name in filled:
            assert scans[name].startswith(("Index", "Bitmap Heap")), (name, plans)
        assert any("Index" in p and column in p for p in plans), plans


def scan_kinds(plans: list[str]) -> dict[str, str]:
    """Partition name -> the plan node reading it ("Index Scan", "Seq Scan", ...)."""
    kinds: dict[str, str] = {}
    for plan in plans:
        for line in plan.splitlines():
            text = line.strip().removeprefix("->").strip()
            if " on events_p" in text:
                node, rest = text.split(" on ", 1)
                name = rest.split()[0]
                # "Index Scan using ix on events_p..": the node is what precedes "using".
                kinds[name] = node.split(" using ")[0]
    return kinds


@pytest.mark.slow
def test_db_maintain_command_reports_and_rejects_bad_retention(tmp_path) -> None:
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = Store.open(url)
    old = make_events(spread(datetime(2020, 1, 1, tzinfo=timezone.utc), 2, 30), "f" * 32)
    store.write_batch(old, [], None)
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWARDEN_")}
    env |= {"MAILWARDEN_CONFIG": os.devnull, "MAILWARDEN_DATABASE_URL": url, "MAILWARDEN_PEPPER": "p"}
    cmd = [sys.executable, "-m", "pipeline", "db", "maintain"]
    bad = subprocess.run(cmd, env={**env, "MAILWARDEN_RETENTION_DAYS": "0"}, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "retention_days" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    good = subprocess.run(cmd, env={**env, "MAILWARDEN_RETENTION_DAYS": "30"}, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert f"{old.height} old rows deleted" in good.stdout
    after = Store.open(url)
    assert after.count_events() == 0
    after.close()
