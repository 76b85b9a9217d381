"""The detect job on real stores: a replayed day equals 96 live ticks, reruns never duplicate, an
ongoing attack extends one alert, and SQLite and PostgreSQL give the same alerts."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from pipeline.generate import API_FILE, EDGE_FILE, SMTP_FILE, generate
from pipeline.jobs import detect_once, detect_range, ingest_paths, load_frame, read_revocation_file, revoke_keys
from pipeline.store import Store

PEPPER = "job-test-pepper"
DAY = timedelta(days=1)


def settings_for(url: str, **extra) -> Settings:
    return load_settings(database_url=url, log_format="mailapi", pepper=PEPPER, **extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated days with every attack, small enough for many detect runs."""
    out = tmp_path_factory.mktemp("corpus")
    generate(out, days=2, seed=3, scale=0.05)
    return out


def loaded(url: str, corpus: Path) -> tuple[Store, Settings]:
    settings = settings_for(url)
    store = Store.open(url)
    ingest_paths(store, settings, [str(corpus / name) for name in (API_FILE, EDGE_FILE, SMTP_FILE)])
    revoke_keys(store, read_revocation_file(corpus / "revoked_keys.txt"), PEPPER.encode())
    return store, settings


def shape(store: Store) -> set[tuple]:
    return {(r["alert_id"], r["detector"], r["entity"], r["window_start"], r["window_end"])
            for r in store.list_alerts(limit=100_000)}


@pytest.mark.slow
def test_a_day_replayed_in_one_run_equals_the_day_run_as_96_ticks(tmp_path: Path, corpus: Path) -> None:
    replay, settings = loaded(f"sqlite:///{tmp_path / 'replay.db'}", corpus)
    live, _ = loaded(f"sqlite:///{tmp_path / 'live.db'}", corpus)
    first, last = replay.event_time_range()
    day = first.replace(hour=0, minute=0, second=0, microsecond=0) + DAY
    end = min(day + DAY, last)
    detect_range(replay, settings, day, end)
    # Live: the service's ticks, each from the watermark to its `now`, every 15 minutes.
    live.set_watermark("detect", day)
    for tick in range(1, 97):
        detect_once(live, settings, now=min(day + tick * timedelta(minutes=15), end))
    assert live.get_watermark("detect") == end
    found = shape(replay)
    assert {r[1] for r in found} >= {"password_spraying", "revoked_key"} or len(found) >= 5, found
    assert shape(live) == found


@pytest.mark.slow
def test_two_detect_runs_never_duplicate_an_alert(database_url: str, corpus: Path) -> None:
    store, settings = loaded(database_url, corpus)
    try:
        first = detect_range(store, settings)
        before = shape(store)
        second = detect_range(store, settings)
        assert first.alerts_new == len(before) > 0
        assert (second.alerts_new, second.alerts_updated) == (0, len(before))
        assert shape(store) == before
    finally:
        store.close()


def flood_lines(start: datetime, minutes: int, per_minute: int) -> list[str]:
    """A flood of refused calls with made-up keys from one address, as the mail API logs them."""
    lines = []
    for i in range(minutes * per_minute):
        at = start + timedelta(seconds=i * 60 / per_minute)
        lines.append(json.dumps({
            "time": at.isoformat().replace("+00:00", "Z"), "client_ip": "198.51.100.23", "method": "POST",
            "path": "/v3/mail/send", "status": 401, "api_key": f"mk_live_bogus{i % 50:04d}", "account": None,
            "user_agent": "curl/8.5.0",
        }))
    return lines


@pytest.mark.slow
def test_an_ongoing_flood_extends_one_alert_tick_after_tick(database_url: str, tmp_path: Path) -> None:
    """A 40-minute flood seen by a tick every 5 minutes: one ip_burst alert from the tick where it
    crossed the threshold, its window_end following the flood, never a second alert."""
    start = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
    log = tmp_path / "api.jsonl"
    log.write_text("\n".join(flood_lines(start, 40, 300)) + "\n")
    settings = settings_for(database_url)
    store = Store.open(database_url)
    try:
        ingest_paths(store, settings, [str(log)])
        store.set_watermark("detect", start)
        ends = []
        for tick in range(1, 10):
            detect_once(store, settings, now=start + tick * timedelta(minutes=5))
            bursts = [r for r in store.list_alerts() if r["detector"] == "ip_burst" and r["entity_kind"] == "ip"]
            assert len(bursts) <= 1
            if bursts:
                ends.append(bursts[0]["window_end"])
                assert bursts[0]["window_start"] == start
        # The 1,500th request (10:04:59.8) crosses 600 in 5 min after the first tick; from then on
        # every tick extends the same alert until the flood's last minute (10:39 -> end 10:40).
        assert ends == sorted(ends) and len(ends) == 9
        assert ends[-1] == start + timedelta(minutes=40)
        assert ends[0] < ends[-1]
    finally:
        store.close()


@pytest.mark.slow
def test_sqlite_and_postgresql_give_the_same_frame_and_alerts(pg_database_url: str, tmp_path: Path, corpus: Path) -> None:
    """The columnar loaders of both stores hand the detectors the same frame, so the same alerts."""
    import pandas as pd

    lite, settings = loaded(f"sqlite:///{tmp_path / 'lite.db'}", corpus)
    pg, pg_settings = loaded(pg_database_url, corpus)
    try:
        lo, hi = lite.event_time_range()
        assert pg.event_time_range() == (lo, hi)
        a = load_frame(lite, lo, hi).drop(columns=["origin"])
        b = load_frame(pg, lo, hi).drop(columns=["origin"])
        pd.testing.assert_frame_equal(a, b)
        detect_range(lite, settings)
        detect_range(pg, pg_settings)
        assert shape(lite) == shape(pg) and shape(lite)
    finally:
        lite.close()
        pg.close()
