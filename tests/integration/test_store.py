"""The store on a real SQLite file and the real PostgreSQL: idempotent writes, checkpoints, alerts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from pipeline.parsers.base import conform
from pipeline.schema import Alert, EntityKind, Severity, event_ids
from pipeline.store import Checkpoint, Store

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def _frame(n: int, key: str = "k" * 32, start_offset: int = 0) -> pl.DataFrame:
    offsets = [start_offset + 100 * i for i in range(n)]
    base = conform(
        pl.DataFrame(
            {
                "ts": [T0 + timedelta(seconds=i) for i in range(n)],
                "source_ip": [f"203.0.113.{i % 250}" for i in range(n)],
                "outcome": ["ok"] * n,
                "status": [200] * n,
                "row": list(range(n)),
            }
        )
    )
    return base.drop("row").with_columns(
        pl.Series("event_id", event_ids(key, offsets)), pl.Series("origin", [f"f:{o}" for o in offsets])
    )


def test_write_batch_is_idempotent_and_keeps_checkpoint(database_url: str) -> None:
    store = Store.open(database_url)
    cp = Checkpoint("k" * 32, "/var/log/x", 1, 2, "h", 1000, 11)
    first = store.write_batch(_frame(10), [], cp)
    again = store.write_batch(_frame(10), [], cp)
    assert (first.inserted, first.duplicates) == (10, 0)
    assert (again.inserted, again.duplicates) == (0, 10)
    assert store.count_events() == 10
    got = store.get_checkpoint("k" * 32)
    assert (got.byte_offset, got.line_no, got.path) == (1000, 11, "/var/log/x")
    # A stale writer must not move a checkpoint backwards.
    store.write_batch(_frame(0), [], Checkpoint("k" * 32, "/var/log/x", 1, 2, "h", 500, 6))
    assert store.get_checkpoint("k" * 32).byte_offset == 1000
    store.close()


def test_identical_lines_at_different_offsets_are_distinct_events(database_url: str) -> None:
    store = Store.open(database_url)
    frame = _frame(3).with_columns(pl.lit("198.51.100.1").alias("source_ip"), pl.lit(T0).alias("ts"))
    assert store.write_batch(frame, [], None).inserted == 3
    assert store.count_events() == 3
    store.close()


def test_quarantine_rows_are_not_duplicated(database_url: str) -> None:
    store = Store.open(database_url)
    rows = [
        {"quarantine_id": "q1", "source": "a.log", "source_key": "k", "line_no": 3, "byte_offset": 40,
         "parser": "combined", "reason": "bad line", "raw": "garbage\x00"},
    ]
    store.write_batch(_frame(0), rows, None)
    store.write_batch(_frame(0), rows, None)
    assert store.count_quarantine() == 1
    assert store.quarantine_summary() == {"bad line": 1}
    store.close()


def test_load_events_round_trips_types(database_url: str) -> None:
    store = Store.open(database_url)
    store.write_batch(_frame(5), [], None)
    frame = store.load_events(T0, T0 + timedelta(seconds=3))
    assert len(frame) == 4
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]"
    assert frame["ts"].iloc[0] == T0
    assert frame["status"].tolist() == [200] * 4
    assert store.event_time_range() == (T0, T0 + timedelta(seconds=4))
    store.close()


def test_alert_upsert_updates_instead_of_duplicating(database_url: str) -> None:
    store = Store.open(database_url)
    alert = Alert("ip_burst", Severity.HIGH, EntityKind.IP, "203.0.113.9", T0, T0 + timedelta(minutes=5), 2.0,
                  "IP 203.0.113.9: 1,200 requests in 5 min", {"peak": 1200})
    assert store.upsert_alerts([alert]) == (1, 0)
    alert.score = 3.0
    assert store.upsert_alerts([alert]) == (0, 1)
    rows = store.list_alerts()
    assert len(rows) == 1 and rows[0]["score"] == 3.0 and rows[0]["evidence"] == {"peak": 1200}
    assert rows[0]["window_start"] == T0
    store.close()


@pytest.mark.parametrize("url", ["sqlite:///", "nosuchdb://x"])
def test_bad_store_url_is_a_clear_error(url: str) -> None:
    from pipeline.schema import StoreError

    with pytest.raises(StoreError):
        Store.open(url if url != "sqlite:///" else "sqlite:////nonexistent-dir/\x00/x.db")
