"""/plots (figure JSON from store aggregates), the pure figures, /metrics text and /health."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from api.metrics import Metrics, escape_label, format_value, gauge
from api.routers.plots import bucket_seconds
from dashboards.figures import FIGURES, requests_over_time, top_ips
from pipeline.store import Store, make_engine

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def _traffic():
    """90 minutes of events: every minute one ok request, every third minute also a failed login."""
    rows = []
    for minute in range(90):
        ts = T0 + timedelta(minutes=minute, seconds=7)
        rows.append({"ts": ts, "source_ip": "192.0.2.10", "outcome": "ok", "status": 200})
        if minute % 3 == 0:
            rows.append({"ts": ts, "source_ip": f"203.0.113.{minute % 4}", "outcome": "auth_failed", "status": 401})
    return rows


def test_requests_over_time_figure(api) -> None:
    rows = _traffic()
    api.add_events(rows)
    headers = api.key("events:read")
    response = api.client.get("/plots/requests_over_time", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    figure = response.json()
    traces = {t["name"]: t for t in figure["data"]}
    assert set(traces) == {"ok", "auth_failed"}
    for outcome, trace in traces.items():
        assert sum(trace["y"]) == sum(r["outcome"] == outcome for r in rows)
        assert trace["type"] == "bar"
    # 89 minutes of data: one-minute buckets (at most 300 of them).
    assert len(traces["ok"]["x"]) == 90
    assert traces["ok"]["x"][0] == T0.isoformat()
    assert figure["layout"]["barmode"] == "stack"

    # An explicit range narrows the buckets to it; wider ranges get wider buckets.
    until = T0 + timedelta(minutes=29, seconds=59)
    narrow = api.client.get(
        "/plots/requests_over_time", headers=headers,
        params={"since": T0.isoformat(), "until": until.isoformat()},
    ).json()
    assert sum(next(t for t in narrow["data"] if t["name"] == "ok")["y"]) == 30


def test_plot_ranges_are_cut_to_the_stored_span(api) -> None:
    """Years 0001..9999 used to be counted bucket by bucket (seconds of CPU per request)."""
    rows = _traffic()
    api.add_events(rows)
    headers = api.key("events:read")
    stored = api.client.get("/plots/requests_over_time", headers=headers).json()
    wide = api.client.get("/plots/requests_over_time", headers=headers,
                          params={"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:00Z"})
    assert wide.status_code == 200 and wide.json()["data"] == stored["data"]
    assert wide.json()["layout"]["xaxis"]["range"] == [(T0 + timedelta(seconds=7)).isoformat(), (T0 + timedelta(minutes=89, seconds=7)).isoformat()]
    # Wholly after (or before) the stored span: the labelled empty figure, not an error.
    later = api.client.get("/plots/auth_failures_over_time", headers=headers,
                           params={"since": "2030-01-01T00:00:00Z", "until": "2030-01-02T00:00:00Z"})
    assert later.status_code == 200 and later.json()["layout"]["meta"]["empty"] is True
    backwards = api.client.get("/plots/top_ips", headers=headers,
                               params={"since": "2026-12-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"})
    assert backwards.status_code == 422


def test_top_ips_figure_and_unknown_names(api) -> None:
    rows = _traffic()
    api.add_events(rows)
    headers = api.key("events:read")
    figure = api.client.get("/plots/top_ips", headers=headers).json()
    ok, failed = figure["data"]
    assert ok["y"][-1] == "192.0.2.10"  # busiest on top: Plotly draws the last category highest
    totals = {ip: o + f for ip, o, f in zip(ok["y"], ok["x"], failed["x"])}
    assert totals == pd.Series([r["source_ip"] for r in rows]).value_counts().to_dict()
    missing = api.client.get("/plots/pie_of_doom", headers=headers)
    assert missing.status_code == 404 and "requests_over_time" in missing.json()["detail"]
    # A zone the server does not know is drawn in UTC rather than failing the viewer's page.
    mars = api.client.get("/plots/top_ips?tz=Mars/Olympus", headers=headers)
    assert mars.status_code == 200 and mars.json()["data"] == figure["data"]
    stray = api.client.get("/plots/top_ips?alert_id=zzz", headers=headers)
    assert stray.status_code == 422 and "alert_activity" in stray.json()["detail"]
    both = api.key("events:read", "alerts:read")
    bare = api.client.get("/plots/alert_activity", headers=both)
    assert bare.status_code == 422 and bare.json()["detail"] == "alert_activity needs alert_id"
    unknown = api.client.get("/plots/alert_activity?alert_id=zzz", headers=both)
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no alert 'zzz'"


def test_plots_on_an_empty_store(sqlite_api) -> None:
    figure = sqlite_api.client.get("/plots/requests_over_time", headers=sqlite_api.key("events:read")).json()
    assert figure["data"] == []
    assert "no events" in figure["layout"]["annotations"][0]["text"]


def test_figures_are_pure_functions_of_frames() -> None:
    frame = pd.DataFrame({
        "bucket": pd.to_datetime([T0, T0, T0 + timedelta(minutes=5)], utc=True),
        "outcome": ["ok", "rate_limited", "ok"],
        "count": [3, 1, 4],
    })
    before = frame.copy()
    fig = requests_over_time(frame)
    pd.testing.assert_frame_equal(frame, before)
    assert [t.name for t in fig.data] == ["ok", "rate_limited"]  # vocabulary order
    assert list(fig.data[0].y) == [3, 4]
    ips = top_ips(pd.DataFrame({"source_ip": ["a", "b"], "requests": [10, 4], "failures": [1, 4]}))
    assert list(ips.data[0].x) == [0, 9] and list(ips.data[1].x) == [4, 1]
    assert {"requests_over_time", "top_ips"} <= set(FIGURES)


@pytest.mark.parametrize("minutes, expected", [(10, 60), (300, 60), (301, 300), (24 * 60, 300), (7 * 24 * 60, 3600)])
def test_bucket_width_keeps_bars_few(minutes, expected) -> None:
    assert bucket_seconds(T0, T0 + timedelta(minutes=minutes)) == expected


def test_metrics_endpoint(api, alert_factory) -> None:
    api.add_events(_traffic())
    api.store.upsert_alerts([alert_factory("ip_burst"), alert_factory("auth_bruteforce")])
    headers = api.key("events:read", "metrics:read")
    api.client.get("/alerts", headers=headers)  # 403: events:read cannot read alerts
    api.client.get("/events", headers={"X-API-Key": "mwk_wrong"})
    for _ in range(3):
        api.client.get("/stats", headers=headers)
    response = api.client.get("/metrics", headers={"Authorization": f"Bearer {headers['X-API-Key']}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert 'mailwarden_api_requests_total{method="GET",route="/stats",status="200"} 3' in text
    assert 'mailwarden_api_requests_total{method="GET",route="/alerts",status="403"} 1' in text
    assert 'mailwarden_api_auth_failures_total{reason="bad_key"} 1' in text
    assert 'mailwarden_alerts{detector="auth_bruteforce",status="open"} 1' in text
    latest = max(r["ts"] for r in _traffic())
    assert f"mailwarden_events_latest_timestamp_seconds {format_value(latest.timestamp())}" in text
    # Every sample line is `name{labels} value`, the exposition format Prometheus parses.
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert api.client.get("/metrics").status_code == 401


def test_exposition_helpers() -> None:
    metrics = Metrics()
    metrics.inc("mailwarden_ingest_lines_total", 2, format='we"ird\\')
    metrics.observe("mailwarden_api_request_duration_seconds", 0.25, route="/x")
    metrics.observe("mailwarden_api_request_duration_seconds", 0.5, route="/x")
    text = metrics.render([gauge("mailwarden_test", "A gauge.", [({"a": "b"}, 1.5)])])
    assert 'mailwarden_ingest_lines_total{format="we\\"ird\\\\"} 2' in text
    assert 'mailwarden_api_request_duration_seconds_sum{route="/x"} 0.75' in text
    assert 'mailwarden_api_request_duration_seconds_count{route="/x"} 2' in text
    assert "mailwarden_api_rate_limited_total 0" in text
    assert 'mailwarden_test{a="b"} 1.5' in text and "# TYPE mailwarden_test gauge" in text
    assert escape_label("a\nb") == "a\\nb"
    assert format_value(float("inf")) == "+Inf" and format_value(3.0) == "3"


def test_health_checks_the_store(sqlite_api, api_factory) -> None:
    ok = sqlite_api.client.get("/health")
    assert ok.status_code == 200 and ok.json()["store"] == "ok"
    # An app whose database does not answer (nothing listens on port 1).
    url = "postgresql+psycopg://mailwarden:secret@127.0.0.1:1/gone?connect_timeout=2"
    down = api_factory(Store(make_engine(url)))
    response = down.client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "error"
    assert "secret" not in response.text and "127.0.0.1" not in response.text
    # Other routes answer 503 too, not a traceback.
    refused = down.client.get("/alerts", headers={"X-API-Key": "mwk_0123456789ab_secret"})
    assert refused.status_code == 503
