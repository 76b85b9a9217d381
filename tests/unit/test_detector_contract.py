"""The contract every registered detector keeps (DESIGN.md section 4), and the registry's config errors."""

from __future__ import annotations

import ipaddress
import json
import math
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from detectors.base import Detector
from detectors.features import conform_events
from detectors.registry import DETECTORS, build_detectors
from pipeline.schema import Alert, ConfigError, EntityKind, Outcome, Severity

NOW = datetime.fromisoformat("2026-01-05T11:00:00+00:00")
START = NOW - timedelta(minutes=40)
# Detectors the scenario below is built to trigger; a new detector joins by extending the scenario.
FIRES_ON_SCENARIO = {"ip_burst", "auth_bruteforce", "credential_stuffing"}


def _burst(ip: str, count: int, start: datetime, every: float, **columns: str | None) -> pd.DataFrame:
    ts = pd.Timestamp(start) + pd.to_timedelta(np.arange(count) * every, unit="s")
    return pd.DataFrame({"ts": ts, "source_ip": ip, **columns})


def scenario() -> pd.DataFrame:
    """40 minutes of traffic with something for every rule in it, plus ordinary clients and junk."""
    rng = np.random.default_rng(5)
    n = 4_000
    background = pd.DataFrame(
        {
            "ts": pd.Timestamp(START) + pd.to_timedelta(rng.uniform(0, 2400, n), unit="s"),
            "source_ip": [f"100.{64 + a}.{b}.{c}" for a, b, c in rng.integers(0, 60, (n, 3))],
            "outcome": rng.choice(
                [Outcome.OK.value, Outcome.AUTH_FAILED.value, Outcome.CLIENT_ERROR.value],
                n,
                p=[0.9, 0.05, 0.05],
            ),
            "account": [f"acct_{i}" for i in rng.integers(0, 300, n)],
            "path": rng.choice(["/v3/mail/send", "/v3/stats"], n),
        }
    )
    t0 = START + timedelta(minutes=10)
    parts = [
        background,
        _burst("203.0.113.7", 900, t0, 0.25, outcome="ok", path="/v3/mail/send", api_key_id="key-a"),
        _burst("2001:db8::7", 700, t0, 0.4, outcome="ok", path="/v3/mail/send"),
        *[_burst(f"198.51.100.{i}", 150, t0, 1.9, outcome="ok", path="/v3/stats") for i in range(1, 11)],
        _burst("192.0.2.10", 30, t0, 12, outcome="auth_failed", account="alice", service="smtp"),
        _burst("192.0.2.10", 1, t0 + timedelta(minutes=7), 0, outcome="ok", account="alice", service="smtp"),
        pd.DataFrame(
            {
                "ts": pd.Timestamp(t0) + pd.to_timedelta(np.arange(15) * 60, unit="s"),
                "source_ip": "192.0.2.66",
                "outcome": "auth_failed",
                "api_key_id": [f"stuffed-{i}" for i in range(15)],
            }
        ),
        # Rows a real log also has: no address, no outcome, no time.
        pd.DataFrame(
            {
                "ts": [pd.Timestamp(t0), pd.Timestamp(t0), pd.NaT],
                "source_ip": [None, "10.0.0.1", "192.0.2.10"],
                "outcome": ["ok", None, "auth_failed"],
            }
        ),
    ]
    frame = pd.concat(parts, ignore_index=True)
    frame["event_id"] = [f"ev-{i}" for i in range(len(frame))]
    return conform_events(frame.sort_values("ts", kind="stable", ignore_index=True))


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return scenario()


def _window(events: pd.DataFrame, detector: Detector, now: datetime) -> pd.DataFrame:
    """What the detect job hands over: the events of [now - lookback, now]."""
    ts = events["ts"]
    return events[(ts >= pd.Timestamp(now - detector.lookback)) & (ts <= pd.Timestamp(now))]


def _fitted(name: str, events: pd.DataFrame) -> Detector:
    return DETECTORS[name]().fit(events)


def _rows(alerts: list[Alert]) -> list[dict]:
    return [alert.to_row() for alert in alerts]


NAMES = sorted(DETECTORS)


def test_scenario_names_only_registered_detectors() -> None:
    assert FIRES_ON_SCENARIO <= set(DETECTORS)


@pytest.mark.parametrize("name", NAMES)
def test_empty_input_gives_no_alerts(name: str, events: pd.DataFrame) -> None:
    detector = _fitted(name, events)
    assert detector.detect(events.iloc[:0], NOW) == []
    assert detector.detect(conform_events(pd.DataFrame()), NOW) == []


@pytest.mark.parametrize("name", NAMES)
def test_input_is_not_mutated(name: str, events: pd.DataFrame) -> None:
    frame = events.set_axis(np.arange(len(events)) * 3 + 7)  # an index that is not 0..n-1
    before = frame.copy(deep=True)
    _fitted(name, before).detect(frame, NOW)
    pd.testing.assert_frame_equal(frame, before)


@pytest.mark.parametrize("name", NAMES)
def test_two_runs_give_the_same_alerts(name: str, events: pd.DataFrame) -> None:
    first = _rows(_fitted(name, events).detect(events, NOW))
    second = _rows(_fitted(name, events).detect(events, NOW))
    assert first == second


@pytest.mark.parametrize("name", NAMES)
def test_alerts_are_well_formed(name: str, events: pd.DataFrame) -> None:
    detector = _fitted(name, events)
    alerts = detector.detect(events, NOW)
    if name in FIRES_ON_SCENARIO:
        assert alerts, f"{name} should fire on the contract scenario"
    for alert in alerts:
        assert alert.detector == name
        assert isinstance(alert.severity, Severity) and isinstance(alert.entity_kind, EntityKind)
        assert alert.entity in alert.title, "titles name the entity"
        assert alert.window_start <= alert.window_end
        assert alert.window_start.tzinfo is not None and alert.window_start <= NOW
        assert math.isfinite(alert.score) and alert.score > 0
        json.dumps(alert.evidence)  # plain JSON types only: no numpy scalars, no timestamps


@pytest.mark.parametrize("name", NAMES)
def test_every_alert_entity_appears_in_the_input(name: str, events: pd.DataFrame) -> None:
    ips = set(events["source_ip"].dropna())
    networks_of_input = {ipaddress.ip_address(ip) for ip in ips if _is_ip(ip)}
    present = {
        EntityKind.IP: ips,
        EntityKind.API_KEY: set(events["api_key_id"].dropna()),
        EntityKind.ACCOUNT: set(events["account"].dropna()),
    }
    for alert in _fitted(name, events).detect(events, NOW):
        if alert.entity_kind is EntityKind.SUBNET:
            network = ipaddress.ip_network(alert.entity)
            assert any(ip in network for ip in networks_of_input), alert.entity
        else:
            assert alert.entity in present[alert.entity_kind], alert.entity


@pytest.mark.parametrize("name", NAMES)
def test_alert_ids_do_not_depend_on_row_order(name: str, events: pd.DataFrame) -> None:
    shuffled = events.sample(frac=1.0, random_state=3)
    ids = sorted(a.alert_id for a in _fitted(name, events).detect(events, NOW))
    assert sorted(a.alert_id for a in _fitted(name, events).detect(shuffled, NOW)) == ids


@pytest.mark.parametrize("name", NAMES)
def test_live_runs_and_a_replay_agree_on_alert_ids(name: str, events: pd.DataFrame) -> None:
    """Run every 2 minutes as the scheduler would, then once later over the whole episode: every alert
    a live run raised is the same alert (same id) the later run reports, so re-runs update instead of
    duplicating. Then the events after `now` must not change what a run sees."""
    detector = _fitted(name, events)
    final_now = NOW + timedelta(minutes=15)
    final = {a.alert_id for a in detector.detect(_window(events, detector, final_now), final_now)}
    live: set[str] = set()
    now = START
    while now <= final_now:
        live |= {a.alert_id for a in detector.detect(_window(events, detector, now), now)}
        now += timedelta(minutes=2)
    assert live == final

    midway = START + timedelta(minutes=14)
    past_only = events[events["ts"] <= pd.Timestamp(midway)]
    assert _rows(detector.detect(events, midway)) == _rows(detector.detect(past_only, midway))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# --- registry ------------------------------------------------------------------------------------


def test_build_detectors_defaults_build_every_registered_detector() -> None:
    assert [d.name for d in build_detectors({})] == list(DETECTORS)
    assert [type(d) for d in build_detectors(None)] == list(DETECTORS.values())


def test_build_detectors_applies_parameters_and_enabled() -> None:
    built = {d.name: d for d in build_detectors({"ip_burst": {"threshold": 100, "window": "2min"},
                                                 "auth_bruteforce": {"enabled": False}})}
    assert "auth_bruteforce" not in built
    assert built["ip_burst"].threshold == 100
    assert built["ip_burst"].window == timedelta(minutes=2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ip_brust": {}}, "ip_brust"),
        ({"ip_burst": {"treshold": 5}}, "treshold"),
        ({"ip_burst": {"threshold": 0}}, "threshold"),
        ({"ip_burst": {"window": "soon"}}, "window"),
        ({"ip_burst": {"window": "2h"}}, "lookback"),
        ({"ip_burst": {"window": "300"}}, "unit"),
        ({"credential_stuffing": {"min_failure_ratio": 1.5}}, "min_failure_ratio"),
        ({"auth_bruteforce": {"enabled": "yes"}}, "enabled"),
        ({"auth_bruteforce": 20}, "table"),
    ],
)
def test_build_detectors_names_what_is_wrong(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_detectors(params)


@pytest.mark.parametrize("name", NAMES)
def test_detector_module_and_runbook(name: str) -> None:
    cls = DETECTORS[name]
    assert cls.__module__.rsplit(".", 1)[-1] == name, "name equals the module name"
    doc = (cls.__doc__ or "").lower()
    for part in ("what fires", "why it matters", "triage", "tuning"):
        assert part in doc, f"{name}'s docstring (the runbook) lacks {part!r}"
