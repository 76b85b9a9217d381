"""The whole pack through the detect job on real third-party logs: the 2004 Honeynet honeypot's
flood and scanner are found and explained; ordinary traffic (elastic-examples/apache_logs) is quiet."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_settings
from pipeline.jobs import detect_range, ingest_paths, load_frame
from pipeline.schema import Outcome
from pipeline.store import Store


def run_pack(tmp_path: Path, files: list[str]) -> tuple[Store, list[dict]]:
    url = f"sqlite:///{tmp_path / 'real.db'}"
    settings = load_settings(database_url=url, pepper="real-logs-pepper")
    store = Store.open(url)
    ingest_paths(store, settings, files)
    detect_range(store, settings)
    return store, store.list_alerts(limit=10_000)


@pytest.mark.slow
def test_the_honeypot_flood_and_scanner_are_found_and_explained(shared_data: Path, tmp_path: Path) -> None:
    files = sorted(str(p) for p in (shared_data / "honeynet-redhat-2004").glob("access_log*"))
    store, alerts = run_pack(tmp_path, files)
    try:
        events = load_frame(store, *store.event_time_range())
    finally:
        store.close()
    by = {(a["detector"], a["entity"]) for a in alerts}
    # The WebDAV flood the honeypot's write-up describes.
    assert ("ip_burst", "82.82.97.119") in by
    # The scanner: every enumeration alert names an IP that asked for that many missing paths.
    scans = [a for a in alerts if a["detector"] == "enumeration"]
    assert scans
    missing = events[events["outcome"].eq(Outcome.CLIENT_ERROR.value) & events["status"].eq(404)]
    for alert in scans:
        distinct = missing.loc[missing["source_ip"].eq(alert["entity"]), "path"].nunique()
        assert distinct >= alert["evidence"]["min_distinct"]
    # Every alert explains itself: its entity in the title, evidence pointing back to stored events.
    stored_ids = set(events["event_id"])
    for alert in alerts:
        assert alert["entity"] in alert["title"]
        assert alert["evidence"].get("sample_event_ids"), alert["title"]
        assert set(alert["evidence"]["sample_event_ids"]) <= stored_ids
    # Only the few heavy hitters: a honeypot month is mostly quiet background.
    assert len({a["entity"] for a in alerts}) <= 5, [a["title"] for a in alerts]


@pytest.mark.slow
def test_ordinary_web_traffic_raises_little(shared_data: Path, tmp_path: Path) -> None:
    """10,000 real requests over four days (Googlebot, heavy single clients, a few probes)."""
    store, alerts = run_pack(tmp_path, [str(shared_data / "elastic-examples" / "apache_logs")])
    try:
        assert store.count_events() == 10_000
    finally:
        store.close()
    assert len(alerts) <= 2, [a["title"] for a in alerts]
