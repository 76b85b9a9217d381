"""The figure registry and the pure figures: frames in, figures out, values drawn from the frames."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from api.frames import LOADERS, _rebucket, countries_frame, unrotated_keys
from dashboards import figures
from dashboards.figures import FIGURES, OVERVIEW, subnets_frame
from dashboards.report import REPORT_FIGURES
from dashboards.scores import flag_alerted, window_scores
from detectors.models.iforest_ip import IforestIp

T0 = datetime(2026, 11, 30, 0, 0, tzinfo=timezone.utc)  # a Monday


def test_every_overview_and_report_figure_is_served_by_range() -> None:
    assert set(OVERVIEW) <= set(LOADERS) and set(REPORT_FIGURES) <= set(LOADERS)
    # Everything in the registry is reachable: by range, or (alert_activity) by alert id.
    assert set(FIGURES) == set(LOADERS) | {"alert_activity"}


@pytest.mark.parametrize("name", sorted(set(FIGURES) - {"alert_activity"}))
def test_empty_frames_draw_a_labelled_empty_figure(name: str) -> None:
    fig = FIGURES[name](pd.DataFrame(columns=["bucket", "outcome", "service", "count", "score", "requests",
                                              "failures", "country", "source_ip", "subnet", "api_key_id",
                                              "account", "detector", "severity", "window_start", "window_end",
                                              "title"]))
    assert fig.layout.meta == {"empty": True}
    assert fig.layout.title.text  # every figure says what it is, even when empty
    json.loads(fig.to_json())


def test_requests_over_time_stacks_outcomes_and_marks_alerts() -> None:
    frame = pd.DataFrame({
        "bucket": pd.to_datetime([T0, T0, T0 + timedelta(minutes=5), T0 + timedelta(minutes=10)], utc=True),
        "outcome": ["ok", "auth_failed", "ok", "auth_failed"],
        "count": [7, 3, 9, 40],
    })
    alerts = pd.DataFrame({"window_start": [T0 + timedelta(minutes=10)], "severity": [40],
                           "title": ["IP 203.0.113.9: 40 failed logins"]})
    fig = figures.requests_over_time(frame, alerts=alerts, tz="Europe/Berlin")
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert {k: sum(v.y) for k, v in bars.items()} == frame.groupby("outcome")["count"].sum().to_dict()
    marker = next(t for t in fig.data if t.type == "scatter")
    assert marker.name == "high alert" and list(marker.x) == [(T0 + timedelta(minutes=10)).isoformat()]
    # Hover texts give UTC and the viewer's zone (Berlin is UTC+1 in November).
    assert "00:10 UTC" in marker.customdata[0][1] and "01:10 CET" in marker.customdata[0][1]


def test_time_figures_show_the_asked_range_whole_and_no_more() -> None:
    """An alert that began days before the range used to stretch the axis back to its start."""
    since, until = T0, T0 + timedelta(hours=24)
    frame = pd.DataFrame({"bucket": pd.to_datetime([T0 + timedelta(hours=2)], utc=True), "outcome": ["auth_failed"],
                          "service": ["api"], "count": [5]})
    alerts = pd.DataFrame({"window_start": [T0 - timedelta(days=3), T0 + timedelta(hours=5)],
                           "window_end": [T0 + timedelta(hours=1), T0 + timedelta(hours=6)], "severity": [40, 30],
                           "detector": ["key_sprawl", "ip_burst"], "title": ["old and ongoing", "new"]})
    axis = [since.isoformat(), until.isoformat()]
    fig = figures.requests_over_time(frame, alerts=alerts, since=since, until=until)
    assert list(fig.layout.xaxis.range) == axis
    marks = {t.name: list(t.x) for t in fig.data if t.type == "scatter"}
    # The older alert is marked at the range's left edge; its hover keeps its real start.
    assert marks == {"high alert": [since.isoformat()], "medium alert": [(T0 + timedelta(hours=5)).isoformat()]}
    high = next(t for t in fig.data if t.name == "high alert")
    assert high.customdata[0][1].startswith((T0 - timedelta(days=3)).strftime("%Y-%m-%d %H:%M"))
    assert list(figures.auth_failures_over_time(frame, since=since, until=until).layout.xaxis.range) == axis
    assert list(figures.alert_timeline(alerts, since=since, until=until).layout.xaxis.range) == axis
    # Without a range plotly fits the data, as before.
    assert figures.requests_over_time(frame, alerts=alerts).layout.xaxis.range is None


def test_failure_heatmap_counts_by_weekday_hour_and_blanks_uncovered_hours() -> None:
    stamps = [T0 + timedelta(hours=h, minutes=m) for h in (0, 0, 5, 26) for m in (1, 2)]
    frame = pd.DataFrame({"bucket": pd.to_datetime(stamps, utc=True), "count": [1, 2, 3, 4, 5, 6, 7, 8]})
    fig = figures.failure_heatmap(frame, since=T0, until=T0 + timedelta(hours=30))
    z = fig.data[0].z
    assert z[0][0] == 1 + 2 + 3 + 4  # Monday 00h: the first two hours' stamps
    assert z[0][5] == 5 + 6 and z[1][2] == 7 + 8  # Monday 05h, Tuesday 02h
    assert z[0][10] == 0  # covered, no failures
    assert z[3][10] is None  # Thursday was never in the range: blank, not "no failures"
    assert sum(v for row in z for v in row if v) == int(frame["count"].sum())


def test_top_bars_split_ok_and_failed_busiest_on_top() -> None:
    frame = pd.DataFrame({"source_ip": ["203.0.113.9", "192.0.2.1"], "requests": [50, 20], "failures": [45, 1]})
    fig = figures.top_ips(frame)
    ok, failed = fig.data
    assert list(ok.y) == ["192.0.2.1", "203.0.113.9"]  # reversed: the busiest is drawn last, on top
    assert list(ok.x) == [19, 5] and list(failed.x) == [1, 45]


def test_subnets_fold_addresses_into_networks() -> None:
    per_ip = pd.DataFrame({
        "source_ip": ["203.0.113.9", "203.0.113.77", "198.51.100.1", "2001:db8::1", "2001:db8::2", "junk"],
        "requests": [10, 5, 12, 3, 4, 99], "failures": [1, 1, 0, 3, 0, 0],
    })
    nets = subnets_frame(per_ip).set_index("subnet")
    assert nets.loc["203.0.113.0/24", ["requests", "failures", "addresses"]].tolist() == [15, 2, 2]
    assert nets.loc["2001:db8::/64", "requests"] == 7
    assert "junk" not in " ".join(nets.index)


def test_countries_frame_and_map_use_the_offline_lookup() -> None:
    import iptocc

    per_ip = pd.DataFrame({"source_ip": ["8.8.8.8", "8.8.4.4", "81.2.69.160"], "requests": [4, 6, 5],
                           "failures": [1, 0, 5]})
    frame = countries_frame(per_ip)
    expected = pd.Series(iptocc.country_code(list(per_ip["source_ip"]))).to_frame("country").assign(
        requests=per_ip["requests"]).groupby("country")["requests"].sum()
    assert frame.set_index("country")["requests"].to_dict() == expected.to_dict()
    fig = figures.countries_map(frame)
    hover = " ".join(str(t.text) for t in fig.data if t.text is not None)
    for code, requests in expected.items():
        assert f"({code})<br>{requests:,} requests" in hover


def test_alert_activity_draws_the_window_and_the_baseline_before_it() -> None:
    start = T0 + timedelta(hours=3)
    buckets = pd.date_range(T0, T0 + timedelta(hours=4), freq="10min", inclusive="left")
    counts = [5 if b < start else 80 for b in buckets]
    frame = pd.DataFrame({"bucket": buckets, "outcome": "auth_failed", "count": counts})
    alert = {"window_start": start, "window_end": start + timedelta(minutes=30), "title": "t", "entity": "203.0.113.9"}
    fig = figures.alert_activity(frame, alert=alert, since=T0, bucket_seconds=600)
    assert fig.layout.meta["baseline"] == pytest.approx(5.0)  # 18 buckets of 5 before the alert
    assert fig.layout.shapes[0].x0 == start.isoformat()
    assert sum(fig.data[0].y) == sum(counts)


def test_score_distribution_shows_threshold_and_the_share_above_it() -> None:
    scores = np.linspace(0.3, 0.9, 121)
    frame = pd.DataFrame({"score": scores, "label": scores > 0.85})
    fig = figures.score_distribution(frame, threshold=0.8, label_name="IP named by an alert")
    names = {t.name: len(t.x) for t in fig.data}
    assert names == {"other windows": int((scores <= 0.85).sum()), "IP named by an alert": int((scores > 0.85).sum())}
    above = int((scores >= 0.8).sum())
    assert f"{above} of 121 windows ({above / 121:.2%}) at or above" in fig.layout.annotations[0].text
    assert fig.layout.shapes[0].x0 == 0.8


def test_unrotated_keys_are_keys_whose_account_used_no_other() -> None:
    keys = pd.DataFrame({
        "api_key_id": ["k1", "k2", "k3", "k4"],
        "account": ["acct_a", "acct_b", "acct_b", None],
        "requests": [10, 5, 7, 2],
        "first_seen": [T0] * 4, "last_seen": [T0 + timedelta(hours=1)] * 4,
    })
    found = unrotated_keys(keys)
    # acct_b moved from k2 to k3 (rotated); k1 and the account-less k4 never changed.
    assert list(found["api_key_id"]) == ["k1", "k4"]


def test_rebucket_sums_into_wider_epoch_aligned_buckets() -> None:
    frame = pd.DataFrame({"bucket": pd.to_datetime([T0 + timedelta(minutes=m) for m in (0, 5, 20, 65)], utc=True),
                          "outcome": ["ok"] * 4, "count": [1, 2, 3, 4]})
    out = _rebucket(frame, 3600, ["outcome"])
    assert out["count"].tolist() == [6, 4] and out["bucket"].iloc[1] == pd.Timestamp(T0 + timedelta(hours=1))


def _windows_traffic(flood: bool) -> pd.DataFrame:
    """30 hours of 60 customers, each at its own pace and message size; optionally one address
    guessing logins with 1,500 requests in ten minutes."""
    rng = np.random.default_rng(3)
    rows = []
    for customer in range(60):
        ip, pace, size = f"198.51.100.{customer + 1}", 1 + customer % 12, int(rng.integers(300, 5000))
        for bucket in range(180):
            for _ in range(int(rng.poisson(pace))):
                rows.append((T0 + timedelta(minutes=10 * bucket, seconds=int(rng.integers(0, 600))), ip,
                             "/v3/mail/send", "ok", f"key{customer}", f"acct{customer}",
                             int(size * rng.lognormal(0, 0.3)), int(rng.integers(1, 1 + pace))))
    if flood:
        for i in range(1500):
            rows.append((T0 + timedelta(hours=29, seconds=i * 0.3), "203.0.113.66", "/v3/account",
                         "auth_failed", None, f"victim{i % 200}", 120, 0))
    frame = pd.DataFrame(rows, columns=["ts", "source_ip", "path", "outcome", "api_key_id", "account", "bytes",
                                        "recipients"])
    frame = frame.assign(ts=pd.to_datetime(frame["ts"], utc=True), service="api", method="POST",
                         user_agent="sendkit-python/4.2.1", status=202)
    frame["event_id"] = [f"e{i}" for i in range(len(frame))]
    return frame.sort_values("ts").reset_index(drop=True)


def test_window_scores_rank_a_flood_first_and_keep_normal_traffic_under_the_threshold() -> None:
    end = T0 + timedelta(hours=30)
    attacked = window_scores(_windows_traffic(flood=True), end, IforestIp())
    ranked = attacked.frame.sort_values("score", ascending=False)
    top = ranked.iloc[0]
    assert top["entity"] == "203.0.113.66" and top["requests"] == 1500 and top["first_seen"] == 1
    assert top["score"] > ranked.iloc[1]["score"]
    # Windows start one `history` (6 h) after the first event: before that every address looks new.
    assert attacked.frame["window_start"].min() >= T0 + timedelta(hours=6)

    detector = IforestIp()
    quiet = window_scores(_windows_traffic(flood=False), end, detector)
    assert len(quiet.frame) > 1000 and quiet.threshold is not None
    # The threshold is a high quantile of these very scores plus a margin: on ordinary traffic at
    # most that quantile's tail reaches it.
    assert (quiet.frame["score"] >= quiet.threshold).mean() <= 1 - detector.quantile
    assert "203.0.113.66" not in set(quiet.frame["entity"])


def test_flag_alerted_marks_only_the_named_entity_inside_its_window() -> None:
    scores = pd.DataFrame({"entity": ["a", "a", "b"],
                           "window_start": pd.to_datetime([T0, T0 + timedelta(hours=1), T0], utc=True),
                           "score": [0.5, 0.6, 0.7]})
    alerts = pd.DataFrame({"entity": ["a"], "window_start": [T0 + timedelta(minutes=5)],
                           "window_end": [T0 + timedelta(minutes=20)]})
    assert flag_alerted(scores, alerts).tolist() == [True, False, False]


def test_every_figure_on_the_demo_store_uses_only_the_trace_types_served_plotly_js_registers(demo_store) -> None:
    from api.frames import FrameReader, Span
    from dashboards.static import FIGURE_TRACES
    from pipeline.store import Store

    store = Store.open(demo_store.url)
    try:
        reader = FrameReader(store)
        first, last = reader.stored_range()
        span = Span(first, last, "Europe/Berlin")
        used: dict[str, set[str]] = {}
        for name in sorted(LOADERS):
            used[name] = {trace.type for trace in FIGURES[name](**LOADERS[name](reader, span)).data}
        alert = reader.queries.get_alert(store.list_alerts(limit=1)[0]["alert_id"])
        used["alert_activity"] = {t.type for t in FIGURES["alert_activity"](**reader.alert_activity(alert)).data}
    finally:
        store.close()
    assert set(used) == set(FIGURES)
    # Real figures with data: every kind of trace the registry draws shows up.
    assert set().union(*used.values()) == FIGURE_TRACES
    assert {name: types - FIGURE_TRACES for name, types in used.items() if types - FIGURE_TRACES} == {}


def test_served_plotly_js_registers_only_the_figure_traces_and_keeps_the_rest_whole() -> None:
    from dashboards import static

    full, served = static.plotly_js(), static.dashboard_plotly_js()
    assert served != full and len(served) < len(full)
    full_calls = static._REGISTER.findall(full)[-1].split(",")
    served_calls = static._REGISTER.findall(served)[-1].split(",")
    modules = static._module_texts(full, full.rindex(".register(["))
    kinds = {call: static._module_of(modules, call[:-2]) for call in full_calls}
    # Every entry of this bundle is identified: 46 trace types and the calendars component.
    assert None not in kinds.values() and len(full_calls) > 40
    assert {kinds[c] for c in served_calls} == {("trace", "bar"), ("trace", "heatmap"), ("trace", "histogram"),
                                                 ("component", "calendars")}
    # Only the register list differs: the text before and after it is the bundle's own.
    cut = full.rindex(".register([")
    assert served[:cut] == full[:cut] and served.endswith(full[full.index("])", cut):])


def test_trimming_refuses_a_bundle_it_does_not_understand() -> None:
    from dashboards import static

    with pytest.raises(ValueError, match="no register"):
        static.trim_traces("window.Plotly = {};", static.FIGURE_TRACES)
    # A wanted trace type the bundle does not have: the caller serves the bundle whole.
    with pytest.raises(ValueError, match="sankey9"):
        static.trim_traces(static.plotly_js(), frozenset({"bar", "sankey9"}))
