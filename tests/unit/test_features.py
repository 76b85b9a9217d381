"""Window features: the vectorised sliding counts agree with a plain loop over every event."""

from __future__ import annotations

import ipaddress

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.features import (
    KeySpace,
    Timeline,
    conform_events,
    episodes,
    follow_ups,
    subnets,
    window_features,
)
from pipeline.schema import EVENT_COLUMNS, pandas_dtypes

# Small integer times (in µs) collide often, which is where off-by-one errors at window edges show.
events_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(0, 4)), min_size=1, max_size=60
)


def _timeline(rows: list[tuple[int, int, int]]) -> tuple[Timeline, np.ndarray]:
    codes = np.array([r[0] for r in rows], dtype=np.int64)
    times = np.array([r[1] for r in rows], dtype=np.int64)
    items = np.array([r[2] for r in rows], dtype=np.int64)
    space = KeySpace.covering(times, int(codes.max()) + 1, 25)
    return Timeline.build(codes, times, None, space), items


@settings(max_examples=300, deadline=None)
@given(events_strategy, st.integers(1, 25))
def test_trailing_count_and_distinct_match_a_loop(rows: list[tuple[int, int, int]], window: int) -> None:
    timeline, items = _timeline(rows)
    counts = timeline.trailing_count(window)
    distinct = timeline.trailing_distinct(items[timeline.rows], window)
    for i, (code, t) in enumerate(zip(timeline.codes, timeline.times, strict=True)):
        inside = [r for r in rows if r[0] == code and t - window < r[1] <= t]
        assert counts[i] == len(inside)
        assert distinct[i] == len({r[2] for r in inside})


@settings(max_examples=200, deadline=None)
@given(events_strategy, st.integers(1, 25), st.integers(1, 4))
def test_episodes_split_where_hot_events_are_a_window_apart(
    rows: list[tuple[int, int, int]], window: int, threshold: int
) -> None:
    timeline, _ = _timeline(rows)
    counts = timeline.trailing_count(window)
    found = episodes(timeline, counts, counts >= threshold, window)
    hot = [(int(c), int(t), int(n)) for c, t, n in zip(timeline.codes, timeline.times, counts, strict=True)
           if n >= threshold]
    # Loop version: a new episode at each entity change or gap of at least one window.
    expected = []
    for code, t, n in hot:
        if expected and expected[-1]["code"] == code and t - expected[-1]["last_t"] < window:
            expected[-1].update(last_t=t, peak=max(expected[-1]["peak"], n))
        else:
            expected.append({"code": code, "first_hot_t": t, "last_t": t, "peak": n})
    assert len(found) == len(expected)
    for ep, want in zip(found.to_dict("records"), expected, strict=True):
        assert ep["code"] == want["code"] and ep["peak"] == want["peak"]
        assert timeline.times[ep["first_hot"]] == want["first_hot_t"]
        assert timeline.times[ep["last"]] == want["last_t"]
        # The episode starts at the first event of the first window over the threshold.
        in_window = [r[1] for r in rows if r[0] == want["code"] and want["first_hot_t"] - window < r[1]]
        assert timeline.times[ep["first"]] == min(in_window)


def test_follow_ups_belong_to_the_latest_episode_begun_before_them() -> None:
    rows = [(0, 10, 0), (0, 11, 0), (0, 40, 0), (0, 41, 0), (1, 10, 0)]
    timeline, _ = _timeline(rows)
    found = episodes(timeline, np.ones(len(rows), dtype=np.int64), np.ones(len(rows), dtype=bool), 5)
    assert [timeline.times[f] for f in found["first"]] == [10, 40, 10]
    codes = np.array([0, 0, 0, 1, 2])
    times = np.array([5, 20, 50, 30, 30])
    positions, owner = follow_ups(timeline, found, codes, times, np.ones(5, dtype=bool))
    # t=5 comes before entity 0's first episode; entity 2 never had one.
    assert positions.tolist() == [1, 2, 3]
    assert owner.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "network"),
    [
        ("82.82.97.119", 24, 64, "82.82.97.0/24"),
        ("82.82.97.119", 16, 64, "82.82.0.0/16"),
        ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 24, 48, "2001:db8:1::/48"),
        ("::ffff:10.1.2.3", 24, 64, "10.1.2.0/24"),
        ("256.1.1.1", 24, 64, None),
        ("not an ip", 24, 64, None),
        (None, 24, 64, None),
    ],
)
def test_subnets(ip: str | None, v4: int, v6: int, network: str | None) -> None:
    assert subnets(np.array([ip, "192.0.2.1"], dtype=object), v4, v6)[0] == network


def test_subnets_agree_with_ipaddress_for_many_addresses() -> None:
    rng = np.random.default_rng(0)
    ips = [str(ipaddress.IPv4Address(int(v))) for v in rng.integers(0, 2**32, 500)]
    expected = [str(ipaddress.ip_network(f"{ip}/24", strict=False)) for ip in ips]
    assert subnets(np.array(ips, dtype=object)).tolist() == expected


def test_conform_events_fills_and_types_every_column() -> None:
    frame = conform_events(pd.DataFrame({"ts": ["2026-01-05T10:00:00+01:00"], "status": ["401"], "x": [1]}))
    assert list(frame.columns) == list(EVENT_COLUMNS)
    expected = {name: str(pd.Series(dtype=dtype).dtype) for name, dtype in pandas_dtypes().items()}
    assert frame.dtypes.astype(str).to_dict() == expected
    assert frame["ts"].iloc[0] == pd.Timestamp("2026-01-05T09:00:00Z")
    assert frame["status"].iloc[0] == 401
    assert frame["account"].isna().all()


def test_window_features_per_entity_and_bucket() -> None:
    frame = conform_events(
        pd.DataFrame(
            {
                "ts": ["2026-01-05T10:01:00Z", "2026-01-05T10:09:59Z", "2026-01-05T10:10:00Z",
                       "2026-01-05T10:02:00Z"],
                "source_ip": ["192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2"],
                "outcome": ["auth_failed", "ok", "ok", "ok"],
                "account": ["a", "b", "a", None],
                "path": ["/x", "/x", "/y", "/x"],
            }
        )
    )
    features = window_features(frame, by="source_ip", freq="10min").set_index(["source_ip", "bucket"])
    first = features.loc[("192.0.2.1", pd.Timestamp("2026-01-05T10:00Z"))]
    assert (first["requests"], first["auth_failures"], first["distinct_accounts"]) == (2, 1, 2)
    assert first["failure_ratio"] == 0.5
    assert features.loc[("192.0.2.1", pd.Timestamp("2026-01-05T10:10Z")), "requests"] == 1
    assert features.loc[("192.0.2.2", pd.Timestamp("2026-01-05T10:00Z")), "distinct_accounts"] == 0
