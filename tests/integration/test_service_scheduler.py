"""The scheduler's wiring on real stores: job options, and the daily train job with catch-up from its watermark."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from pipeline.config import Settings
from pipeline.parsers.base import conform
from pipeline.scheduler import TRAIN_WATERMARK, Service, train_due
from pipeline.schema import event_ids
from pipeline.store import Store

T0 = datetime(2026, 11, 30, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store.open(database_url)
    try:
        yield store
    finally:
        store.close()


def _settings(tmp_path: Path, store: Store, **extra) -> Settings:
    url = store.engine.url.render_as_string(hide_password=False)
    return Settings(database_url=url, pepper="scheduler-test-pepper", data_dir=tmp_path / "state", **extra)


def _steady_traffic(store: Store, start: datetime, hours: int, key: str) -> datetime:
    """20 customers, each sending every 5 minutes from its own address with its own key."""
    rows = []
    for step in range(hours * 12):
        for c in range(20):
            rows.append(
                {
                    "ts": start + timedelta(minutes=5 * step, seconds=c),
                    "source_ip": f"198.51.100.{c + 1}",
                    "service": "api",
                    "scheme": "https",
                    "method": "POST",
                    "path": "/v3/mail/send",
                    "status": 202,
                    "outcome": "ok",
                    "api_key_id": f"key{c:02d}",
                    "account": f"acct{c:02d}",
                    "recipients": 1 + c % 3,
                    "bytes": 500 + 10 * c,
                    "row": len(rows),
                }
            )
    frame = conform(pl.DataFrame(rows)).drop("row")
    offsets = list(range(len(rows)))
    frame = frame.with_columns(
        pl.Series("event_id", event_ids(key * 32, offsets)), pl.Series("origin", [f"t.log:{o}" for o in offsets])
    )
    store.write_batch(frame, [], None)
    return max(r["ts"] for r in rows)


@pytest.mark.slow
def test_train_fits_the_models_and_catches_up_from_its_watermark(tmp_path: Path, store: Store) -> None:
    settings = _settings(tmp_path, store)
    assert train_due(store, settings) is None, "nothing stored, nothing to train on"
    newest = _steady_traffic(store, T0, 9, "a")

    fitted = train_due(store, settings)
    assert {"iforest_ip", "iforest_key"} <= set(fitted)
    # Nine hours of 20 steady customers are enough rows (past each row's 6 h history) to fit on.
    for name in ("iforest_ip", "iforest_key"):
        assert fitted[name].rows >= 50 and fitted[name].trained_to is not None, fitted[name]
    assert store.get_watermark(TRAIN_WATERMARK) == newest

    # The next tick, with no new day of data, does nothing.
    assert train_due(store, settings) is None
    # A service down for two days comes back to data a training period past the watermark: it trains.
    later = _steady_traffic(store, T0 + timedelta(hours=48), 9, "b")
    assert train_due(store, settings) is not None
    assert store.get_watermark(TRAIN_WATERMARK) == later
    assert train_due(store, settings) is None
    assert train_due(store, settings, force=True) is not None


def test_a_disabled_model_is_not_trained(tmp_path: Path, store: Store) -> None:
    settings = _settings(tmp_path, store, detectors={"iforest_key": {"enabled": False}})
    _steady_traffic(store, T0, 9, "c")
    assert "iforest_key" not in train_due(store, settings)


@pytest.mark.slow
def test_service_schedules_every_job_without_overlap_and_trains_at_start(tmp_path: Path, store: Store) -> None:
    _steady_traffic(store, T0, 9, "d")
    settings = _settings(tmp_path, store, schedule={"detect_seconds": 30, "notify_seconds": 30, "train_hours": 24})
    service = Service(settings, store)
    service.start()
    try:
        jobs = {job.id: job for job in service.scheduler.get_jobs()}
        assert {"detect", "notify", "train"} <= set(jobs)
        for job in jobs.values():
            assert (job.max_instances, job.coalesce) == (1, True), job.id
        assert jobs["train"].trigger.interval == timedelta(hours=24)
        assert jobs["detect"].trigger.interval == timedelta(seconds=30)
        # No train watermark yet: the first tick runs at start, not a day later.
        deadline = time.monotonic() + 120  # a bound for a loaded CI machine; ~1 s when quiet
        while not service.models and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.models, (
            f"no training within 120 s; database: {_what_the_database_is_doing(store)}; "
            f"threads: {_thread_stacks(tmp_path)}"
        )
        assert service.models["iforest_ip"].trained_to is not None
        assert store.get_watermark(TRAIN_WATERMARK) is not None
    finally:
        service.stop()


def _what_the_database_is_doing(store: Store) -> str:
    """For a stalled start-up: the sessions and lock waits of this database (PostgreSQL only).
    (Seen once in a full run on PostgreSQL and never alone: this says why, next time.)"""
    if store.dialect != "postgresql":
        return "SQLite"
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT pid, state, wait_event_type, wait_event, left(query, 120) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )).all()
    return "; ".join(" | ".join(str(c) for c in r) for r in rows) or "no other sessions"


def _thread_stacks(tmp_path: Path) -> str:
    """Where every thread of this process is (a stalled job thread shows what it waits for)."""
    import faulthandler

    dump = tmp_path / "threads.txt"
    with dump.open("w") as handle:
        faulthandler.dump_traceback(handle, all_threads=True)
    return dump.read_text()[-6000:]
