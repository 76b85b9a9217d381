"""Golden tests: each folder under tests/golden/detectors/<detector>/<case>/ pins a detector's alerts.

A case is `case.json` plus an optional `events.csv`:

- `events.csv` holds only the columns the case needs (ts, source_ip, outcome, account, api_key_id,
  path, service, event_id…); the rest become nulls with the schema's dtypes. Two extra columns keep
  big cases small: `repeat` (n events from this line) and `every` (seconds between them). String cells
  may use `{n}` (or `{n:02d}`), replaced by 0..repeat-1, for many distinct accounts or keys.
  `event_id` defaults to `L<line>.<n>`.
- `case.json`: `now` (ISO-8601), optional `params` (as in `[detectors.<name>]`), optional `noise`
  ({seed, ips, requests, start, end}: quiet background traffic from random addresses in
  100.64.0.0/10 that must never alert), a `description` that derives the expected values from the
  case definition, and `expect`: the complete list of alerts, `[]` for a quiet case. Each expected
  alert names `entity` and `entity_kind` and may pin `severity`, `score`, `min_score`, `mitre`,
  `window_start`, `window_end`, `title`, `title_contains`, and `evidence` (listed keys must be equal).
"""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from detectors.features import conform_events
from detectors.registry import DETECTORS
from pipeline.schema import Alert, Outcome

GOLDEN = Path(__file__).parent / "golden" / "detectors"
CASES = sorted(p.parent for p in GOLDEN.glob("*/*/case.json"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_PATHS = ["/v3/mail/send", "/v3/messages/{id}", "/v3/stats"]


def expand_events(table: pd.DataFrame) -> pd.DataFrame:
    """One row per event from a case table with optional `repeat`/`every` columns."""
    records: list[dict[str, Any]] = []
    for line, row in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        repeat = int(row.pop("repeat", None) or 1)
        every = pd.Timedelta(seconds=float(row.pop("every", None) or 0))
        start = pd.Timestamp(row.pop("ts"))
        for n in range(repeat):
            record = {
                key: value.format(n=n) if isinstance(value, str) and "{n" in value else value
                for key, value in row.items()
            }
            record["ts"] = start + n * every
            record.setdefault("event_id", None)
            record["event_id"] = record["event_id"] or f"L{line}.{n}"
            records.append(record)
    return pd.DataFrame.from_records(records)


def noise_events(spec: dict[str, Any]) -> pd.DataFrame:
    """Background traffic: `requests` spread at random over `ips` addresses and [start, end).

    About 15 requests per address per hour and 3 % auth failures: nowhere near any threshold, so a
    case with noise must give exactly the alerts it gives without it.
    """
    rng = np.random.default_rng(spec["seed"])
    offsets = rng.choice(_CGNAT.num_addresses, size=spec["ips"], replace=False)
    pool = np.array([str(_CGNAT[int(o)]) for o in offsets], dtype=object)
    n = spec["requests"]
    start, end = pd.Timestamp(spec["start"]), pd.Timestamp(spec["end"])
    seconds = rng.uniform(0, (end - start).total_seconds(), n)
    return pd.DataFrame(
        {
            "event_id": [f"noise-{i}" for i in range(n)],
            "ts": start + pd.to_timedelta(seconds, unit="s"),
            "source_ip": pool[rng.integers(0, len(pool), n)],
            "service": "api",
            "path": rng.choice(np.array(_PATHS, dtype=object), n),
            "outcome": np.where(rng.random(n) < 0.03, Outcome.AUTH_FAILED.value, Outcome.OK.value),
            "account": [f"acct_{i}" for i in rng.integers(0, 500, n)],
        }
    )


def load_case(case: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    spec = json.loads((case / "case.json").read_text())
    parts = []
    if (case / "events.csv").exists():
        table = pd.read_csv(case / "events.csv", dtype=str, keep_default_na=False, na_values=[""])
        parts.append(expand_events(table))
    if "noise" in spec:
        parts.append(noise_events(spec["noise"]))
    assert parts, f"{case}: needs events.csv or noise"
    frame = pd.concat(parts, ignore_index=True)
    return spec, conform_events(frame)


def _order(kind: str, entity: str, window_start: str | None) -> tuple[str, str, str]:
    return kind, entity, window_start or ""


def check_alert(alert: Alert, want: dict[str, Any], where: str) -> None:
    if "severity" in want:
        assert str(alert.severity) == want["severity"], f"{where}: severity {alert.severity}"
    if "score" in want:
        assert alert.score == pytest.approx(want["score"]), f"{where}: score {alert.score}"
    if "min_score" in want:
        assert alert.score >= want["min_score"], f"{where}: score {alert.score}"
    if "mitre" in want:
        assert alert.mitre == want["mitre"], f"{where}: mitre {alert.mitre}"
    for bound in ("window_start", "window_end"):
        if bound in want:
            got = getattr(alert, bound)
            assert got == datetime.fromisoformat(want[bound]), f"{where}: {bound} {got.isoformat()}"
    if "title" in want:
        assert alert.title == want["title"], f"{where}: title {alert.title!r}"
    if "title_contains" in want:
        assert want["title_contains"] in alert.title, f"{where}: title {alert.title!r}"
    # Evidence goes to JSON (store, chat): compare what a reader of that JSON would see.
    evidence = json.loads(json.dumps(alert.evidence))
    for key, value in want.get("evidence", {}).items():
        assert key in evidence, f"{where}: evidence lacks {key!r} (has {sorted(evidence)})"
        assert evidence[key] == value, f"{where}: evidence[{key!r}] = {evidence[key]!r}, expected {value!r}"


# The model cases carry a day and a half of traffic for the forests to fit on: seconds each.
_SLOW = {c for c in CASES if c.parent.name.startswith("iforest_")}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW else c for c in CASES],
    ids=[f"{c.parent.name}/{c.name}" for c in CASES],
)
def test_golden_detector_case(case: Path) -> None:
    name = case.parent.name
    assert name in DETECTORS, f"no detector registered as {name!r}"
    spec, events = load_case(case)
    detector = DETECTORS[name].from_params(spec.get("params"))
    alerts = detector.detect(events, datetime.fromisoformat(spec["now"]))

    got = sorted(alerts, key=lambda a: _order(str(a.entity_kind), a.entity, a.window_start.isoformat()))
    want = sorted(spec["expect"], key=lambda w: _order(w["entity_kind"], w["entity"], w.get("window_start")))
    summary = [f"{a.entity_kind} {a.entity} {a.window_start.isoformat()}: {a.title}" for a in got]
    assert [(str(a.entity_kind), a.entity) for a in got] == [(w["entity_kind"], w["entity"]) for w in want], (
        f"alerts: {summary}"
    )
    for alert, expected in zip(got, want, strict=True):
        check_alert(alert, expected, f"{alert.entity_kind} {alert.entity}")


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_has_a_firing_and_a_quiet_case(name: str) -> None:
    cases = [c for c in CASES if c.parent.name == name]
    expectations = [json.loads((c / "case.json").read_text())["expect"] for c in cases]
    assert any(expectations), f"tests/golden/detectors/{name}/ needs a case where it fires"
    assert any(e == [] for e in expectations), f"tests/golden/detectors/{name}/ needs a quiet case"
