"""The dashboard's page and static files, the model's score plot, and the figure loaders giving the
same frames on SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import hashlib
import re
from datetime import timedelta
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from api.frames import LOADERS, FrameReader, Span
from api.main import create_app
from dashboards.figures import OVERVIEW
from dashboards.static import FIGURE_TRACES, trim_traces
from detectors.rules.auth_bruteforce import AuthBruteforce
from pipeline.demo_store import make_demo_key
from pipeline.store import Store

from .test_report import T0, _posture_rows, _store_with


@pytest.fixture
def client(demo_copy):
    store = Store.open(demo_copy.url)
    key = make_demo_key(store)
    store.close()
    with TestClient(create_app(demo_copy.settings())) as client:
        yield client, {"X-API-Key": key}, demo_copy


def test_page_and_static_files_come_from_mailwarden(client) -> None:
    http, _, _ = client
    page = http.get("/")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert f'data-figures="{",".join(OVERVIEW)}"' in page.text
    # Every script and stylesheet the page loads is one of ours.
    assert re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text) == [
        "/static/dashboard.css", "/static/dashboard.js", "/static/plotly.min.js"]
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)

    # plotly.js from the installed plotly package, registering only the trace types we draw.
    bundled = resources.files("plotly").joinpath("package_data", "plotly.min.js").read_text(encoding="utf-8")
    served = trim_traces(bundled, FIGURE_TRACES).encode()
    plain = http.get("/static/plotly.min.js", headers={"Accept-Encoding": "identity"})
    assert hashlib.sha256(plain.content).digest() == hashlib.sha256(served).digest()
    assert len(plain.content) == len(served) > 4_000_000 and served != bundled.encode()
    zipped = http.get("/static/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip" and zipped.content == served  # httpx unzips
    again = http.get("/static/plotly.min.js", headers={"If-None-Match": plain.headers["etag"]})
    assert again.status_code == 304
    assert http.get("/static/../pipeline/cli.py").status_code == 404


def test_score_plot_matches_the_scores_computed_from_the_events(client) -> None:
    from dashboards.scores import window_scores
    from detectors.models.iforest_ip import IforestIp

    http, headers, demo = client
    assert http.get("/plots/score_distribution").status_code == 401
    figure = http.get("/plots/score_distribution", headers=headers).json()
    store = Store.open(demo.url)
    try:
        first, last = store.event_time_range()
        detector = IforestIp()
        since = last - timedelta(hours=24)
        scored = window_scores(store.load_events(since - detector.history, last), last, detector)
    finally:
        store.close()
    expected = scored.frame[scored.frame["window_start"] >= since]
    assert sum(len(t["x"]) for t in figure["data"]) == len(expected) > 1000
    assert sorted(x for t in figure["data"] for x in t["x"]) == pytest.approx(sorted(expected["score"]))
    assert f"threshold {scored.threshold:.3g}" in figure["layout"]["annotations"][0]["text"]
    assert {t["name"] for t in figure["data"]} <= {"other windows", "IP named by an alert"}


def test_loaders_give_the_same_frames_on_sqlite_and_postgresql(pg_database_url: str, tmp_path: Path) -> None:
    import sqlalchemy as sa
    import uuid

    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    rows = _posture_rows()
    stores = {
        "sqlite": _store_with(f"sqlite:///{tmp_path / 's.db'}", rows),
        "postgresql": _store_with(f"{pg_database_url}?options=-csearch_path%3D{schema}", rows),
    }
    try:
        span = Span(T0, T0 + timedelta(hours=2))
        for store in stores.values():
            # Real alerts on both: the SMTP guessing of the rows, with a threshold it reaches.
            found = AuthBruteforce(threshold=5).detect(store.load_events(span.since, span.until), span.until)
            assert store.upsert_alerts(found)[0] == 1
        frames = {name: {fig: LOADERS[fig](FrameReader(store), span) for fig in OVERVIEW}
                  for name, store in stores.items()}
    finally:
        for store in stores.values():
            store.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
    for fig in OVERVIEW:
        lite, pg = frames["sqlite"][fig]["frame"], frames["postgresql"][fig]["frame"]
        assert len(lite) > 0, fig
        pd.testing.assert_frame_equal(lite.reset_index(drop=True), pg.reset_index(drop=True), check_dtype=False,
                                      obj=fig)
    traffic = frames["sqlite"]["requests_over_time"]["frame"]
    assert int(traffic["count"].sum()) == len(rows)


def test_aggregate_cache_computes_once_and_keeps_results_for_the_ttl_after_they_are_ready() -> None:
    import threading

    from api.frames import AggregateCache

    now = [100.0]
    cache = AggregateCache(ttl=15.0, clock=lambda: now[0])
    calls: list[int] = []
    release = threading.Event()

    def slow() -> int:
        calls.append(1)
        # Meanwhile the clock passes the ttl: a computation still running must not be started again.
        now[0] += 40
        release.wait(5)
        return len(calls)

    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(cache.get("k", slow)))
    first.start()
    while not calls:
        pass
    others = [threading.Thread(target=lambda: results.append(cache.get("k", slow))) for _ in range(3)]
    for t in others:
        t.start()
    release.set()
    for t in [first, *others]:
        t.join(5)
    assert results == [1, 1, 1, 1] and len(calls) == 1
    now[0] += 10
    assert cache.get("k", slow) == 1  # 10 s after it was ready: still cached
    now[0] += 10
    assert cache.get("k", slow) == 2 and len(calls) == 2  # 20 s after: computed afresh

    def broken() -> int:
        raise RuntimeError("store down")

    with pytest.raises(RuntimeError):
        cache.get("x", broken)
    assert cache.get("x", lambda: 7) == 7  # a failure is not kept


@pytest.mark.parametrize("hours, grain", [(24, 900), (None, 3600)])
def test_sqlite_column_scan_counts_what_the_sql_group_by_counts(demo_store, hours, grain) -> None:
    from api.frames import _fold_entities

    store = Store.open(demo_store.url)
    try:
        reader = FrameReader(store)
        first, last = reader.stored_range()
        since = last - timedelta(hours=hours) if hours else first
        assert reader._sqlite_counts(since, last, grain) is not None  # the fast path is the one measured
        fast = reader._compute_aggregates(since, last, grain)
        sql = _fold_entities(reader.traffic(since, last, grain), reader.per_entity(since, last), grain)
    finally:
        store.close()
    pd.testing.assert_frame_equal(fast.traffic, sql.traffic)
    assert int(fast.traffic["count"].sum()) == int(sql.ips["requests"].sum()) > 0
    for name, keys in (("ips", ["source_ip"]), ("keys_accounts", ["api_key_id", "account"])):
        a = getattr(fast, name).sort_values(keys).reset_index(drop=True)
        b = getattr(sql, name).sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_dtype=False, obj=name)


def test_hour_cache_serves_unchanged_hours_and_recounts_an_hour_that_gained_an_event(demo_copy) -> None:
    """Whole hours are counted once and kept; an event added to one of them (a late line) makes
    that hour counted again, and the answer always equals the SQL GROUP BY's."""
    from api.frames import _fold_entities, _whole_hours, hour_cache_for
    from pipeline.store import events

    store = Store.open(demo_copy.url)
    try:
        reader = FrameReader(store)
        first, last = reader.stored_range()
        since = last - timedelta(hours=20, minutes=17, seconds=3)  # ragged at both ends
        hours = _whole_hours(since, last)
        assert len(hours) == 19 and hours[0] > since and hours[-1] + timedelta(hours=1) <= last

        def both() -> tuple:
            fast = reader._compute_aggregates(since, last, 900)
            sql = _fold_entities(reader.traffic(since, last, 900), reader.per_entity(since, last), 900)
            return fast, sql

        fast, sql = both()
        pd.testing.assert_frame_equal(fast.traffic, sql.traffic)
        cache = hour_cache_for(store)
        assert len(cache._entries) == 19
        kept = {k: v[1] for k, v in cache._entries.items()}

        late = hours[5] + timedelta(minutes=30)
        with store.engine.begin() as conn:
            conn.execute(events.insert().values(event_id="late-line-1", ts=late, source_ip="198.51.100.77",
                                                outcome="auth_failed", service="smtp"))
        fast2, sql2 = both()
        pd.testing.assert_frame_equal(fast2.traffic, sql2.traffic)
        assert int(fast2.traffic["count"].sum()) == int(fast.traffic["count"].sum()) + 1
        row = fast2.ips[fast2.ips["source_ip"] == "198.51.100.77"]
        assert row[["requests", "auth_failures"]].values.tolist() == [[1, 1]]
        # Only the hour that gained the event was counted again.
        changed = [k for k, v in cache._entries.items() if v[1] is not kept[k]]
        assert changed == [(hours[5], 900)]
    finally:
        store.close()


def test_a_range_of_years_is_read_in_one_piece_not_hour_by_hour(demo_copy) -> None:
    """A store whose events span decades (yearless syslog dated this year beside a 2004 log) must
    not turn one page load into a count query per hour of those decades."""
    from api.frames import MAX_CACHED_SPAN, _fold_entities, hour_cache_for

    store = Store.open(demo_copy.url)
    try:
        reader = FrameReader(store)
        first, last = reader.stored_range()
        since = last - timedelta(days=22 * 365)
        assert last - since > MAX_CACHED_SPAN
        fast = reader._compute_aggregates(since, last, 3600)
        assert len(hour_cache_for(store)._entries) == 0
        sql = _fold_entities(reader.traffic(since, last, 3600), reader.per_entity(since, last), 3600)
        pd.testing.assert_frame_equal(fast.traffic, sql.traffic)
    finally:
        store.close()
