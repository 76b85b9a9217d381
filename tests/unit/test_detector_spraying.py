"""Password spraying from 300 addresses at one try per address per hour, over a day: caught, with
every address in the alert, and the same alert whether the day is seen at once or hour by hour."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from detectors.features import conform_events
from detectors.registry import DETECTORS
from pipeline.jobs import merge_overlapping
from pipeline.schema import EntityKind, Outcome

START = datetime(2026, 1, 5, 0, 0, tzinfo=timezone.utc)
SPRAYERS = [str(ipaddress.ip_address("203.0.113.0") + i) if i < 200 else f"2001:db8:{i:x}::7" for i in range(300)]
ACCOUNTS = [f"user{i:03d}@shop{i % 40}.example" for i in range(240)]


def spray(hours: int = 24) -> pd.DataFrame:
    """Every hour, each of the 300 addresses tries one account once, at a random minute; the
    accounts are walked in turn, so no account sees more than a couple of tries an hour."""
    rng = np.random.default_rng(7)
    rows = []
    for hour in range(hours):
        seconds = rng.uniform(0, 3600, len(SPRAYERS))
        for n, (ip, second) in enumerate(zip(SPRAYERS, seconds, strict=True)):
            rows.append({"ts": START + timedelta(hours=hour, seconds=float(second)), "source_ip": ip,
                         "service": "smtp", "outcome": Outcome.AUTH_FAILED.value,
                         "account": ACCOUNTS[(hour * len(SPRAYERS) + n) % len(ACCOUNTS)]})
    # Customers logging in as usual from their own servers all day: never counted.
    for hour in range(hours):
        for c in range(20):
            rows.append({"ts": START + timedelta(hours=hour, minutes=3 * c), "source_ip": f"198.51.100.{c + 1}",
                         "service": "smtp", "outcome": Outcome.OK.value, "account": f"mailer{c}@corp.example"})
    frame = pd.DataFrame(rows).sort_values("ts", kind="stable", ignore_index=True)
    frame["event_id"] = [f"s{i}" for i in range(len(frame))]
    return conform_events(frame)


def test_spray_of_300_ips_one_try_each_per_hour_lists_every_ip() -> None:
    events = spray()
    now = START + timedelta(hours=24)
    alerts = DETECTORS["password_spraying"]().detect(events, now)
    spread = [a for a in alerts if a.entity_kind is EntityKind.IP]
    assert len(spread) == 1, [a.title for a in alerts]
    alert = spread[0]
    assert set(alert.evidence["ips"]) == set(SPRAYERS)
    assert alert.evidence["ip_count"] == 300
    assert alert.entity in SPRAYERS
    assert alert.mitre == "T1110.003"
    # No single account or address crossed a per-account or brute-force limit.
    assert not [a for a in alerts if a.entity_kind is EntityKind.ACCOUNT]
    assert DETECTORS["auth_bruteforce"]().detect(events, now) == []


def test_the_spray_seen_hour_by_hour_is_the_same_alert() -> None:
    events = spray()
    detector = DETECTORS["password_spraying"]()
    whole = detector.detect(events, START + timedelta(hours=24))
    hourly = []
    for hour in range(1, 25):
        now = START + timedelta(hours=hour)
        frame = events[(events["ts"] >= pd.Timestamp(now - detector.lookback)) & (events["ts"] <= pd.Timestamp(now))]
        hourly += detector.detect(frame, now)
    merged = merge_overlapping(hourly)
    assert [(a.alert_id, a.window_start, a.window_end) for a in merged] == [
        (a.alert_id, a.window_start, a.window_end) for a in whole
    ]
    assert set(merged[0].evidence["ips"]) == set(SPRAYERS)
