"""Bounded detect (candidate pushdown) gives exactly the alerts of the whole-frame path, on a real
SQLite file and the real PostgreSQL server, and still finds the injected attacks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from detectors.registry import DETECTORS
from pipeline.config import load_settings
from pipeline.evaluate import alerts_frame, evaluate, load_labels
from pipeline.generate import API_FILE, EDGE_FILE, SMTP_FILE, generate
from pipeline.jobs import detect_range, ingest_paths, load_frame, read_revocation_file, revoke_keys, train_once
from pipeline.store import Store, alerts

PEPPER = "bounded-test-pepper"
# Attack kinds a scale-0.05 corpus makes detectable by some rule (the models are trained below).
ATTACKS = {"ip_flood", "smtp_bruteforce", "credential_stuffing", "path_enumeration", "plaintext_http",
           "secret_in_url", "revoked_key", "spam_volume_spike", "impossible_travel", "password_spraying_low_slow"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bounded")
    generate(out, days=3, seed=11, scale=0.05)
    return out


def shape(found) -> set[tuple]:
    return {(a.detector, str(a.entity_kind), a.entity, a.window_start, a.window_end, a.severity, a.score, a.title)
            for a in found}


def run_both(store: Store, settings, chunk_rows: int | None = None, **kwargs) -> tuple[list, list]:
    """The whole-frame run and the bounded run (candidates of local pushdowns in groups of at most
    `chunk_rows` rows), each on an empty alerts table."""
    runs = []
    for bounded in (False, True):
        with store.engine.begin() as conn:
            conn.execute(alerts.delete())
        extra = {"chunk_rows": chunk_rows} if bounded else {}
        runs.append(detect_range(store, settings, bounded=bounded, **kwargs, **extra).alerts)
    return runs[0], runs[1]


@pytest.mark.slow
def test_bounded_detect_gives_the_whole_frame_alerts_and_finds_the_attacks(database_url: str, corpus: Path) -> None:
    settings = load_settings(database_url=database_url, log_format="mailapi", pepper=PEPPER)
    store = Store.open(database_url)
    try:
        ingest_paths(store, settings, [str(corpus / name) for name in (API_FILE, EDGE_FILE, SMTP_FILE)])
        revoke_keys(store, read_revocation_file(corpus / "revoked_keys.txt"), PEPPER.encode())
        whole, bounded = run_both(store, settings)
        assert bounded and shape(bounded) == shape(whole)
        # Same evidence too: the pushed-down detectors saw every row that mattered.
        assert {a.alert_id: a.evidence for a in bounded} == {a.alert_id: a.evidence for a in whole}
        assert {a.detector for a in bounded} >= set(DETECTORS) - {"iforest_ip", "iforest_key", "key_sprawl", "new_country"}
        first, last = store.event_time_range()
        result = evaluate(alerts_frame([_row(a) for a in bounded]), load_labels(corpus / "labels.csv"),
                          PEPPER.encode(), days=(last - first).total_seconds() / 86_400)
        for kind in ATTACKS:
            assert result["by_kind"][kind]["recall"] == 1.0, (kind, result["by_kind"][kind])

        # One pass over the whole range (bench/detect.py's), with the first event's address
        # allowlisted: where the frame is known to start must not depend on the rows left out.
        frame = load_frame(store, first, first + timedelta(hours=1))
        allowed = load_settings(database_url=database_url, log_format="mailapi", pepper=PEPPER,
                                allowlist={"cidrs": [str(frame["source_ip"].iat[0])]})
        whole, bounded = run_both(store, allowed, step=timedelta(days=7))
        assert bounded and shape(bounded) == shape(whole)

        # Each candidate of a local pushdown alone (groups of one entity's rows): the same alerts.
        whole, bounded = run_both(store, settings, chunk_rows=1)
        assert bounded and shape(bounded) == shape(whole)

        # Trained models score each entity alone: pushed down too, in groups or not.
        train_once(store, settings)
        whole, bounded = run_both(store, settings)
        assert shape(bounded) == shape(whole)
        assert {a.detector for a in bounded} & {"iforest_ip", "iforest_key"}
        whole, bounded = run_both(store, settings, chunk_rows=200)
        assert shape(bounded) == shape(whole)
    finally:
        store.close()


def _row(alert) -> dict:
    return {"detector": alert.detector, "entity_kind": str(alert.entity_kind), "entity": alert.entity,
            "window_start": alert.window_start, "window_end": alert.window_end, "severity": str(alert.severity),
            "score": alert.score, "title": alert.title, "evidence": alert.evidence}


def test_a_pushdown_selects_in_the_database_what_pandas_would(tmp_path: Path) -> None:
    """The row conditions are null-safe like pandas' masks: NOT(outcome = ok AND key present) keeps
    rows without an outcome, and a prefix test is case-sensitive on SQLite as on PostgreSQL."""
    from detectors.pushdown import Clause, Measure, Pushdown, Rows
    from pipeline.aggregates import pushdown_table

    url = f"sqlite:///{tmp_path / 'p.db'}"
    store = Store.open(url)
    try:
        from pipeline.store import events

        base = {"service": "api", "scheme": "https", "method": "POST", "status": 200, "origin": "t"}
        rows = [
            {"event_id": "1", "ts": "2026-11-02 10:00:01", "source_ip": "1.1.1.1", "outcome": "ok", "api_key_id": "k1", "path": "/v3/mail/send"},
            {"event_id": "2", "ts": "2026-11-02 10:00:02", "source_ip": "1.1.1.1", "outcome": None, "api_key_id": "k1", "path": "/V3/MAIL/SEND/x"},
            {"event_id": "3", "ts": "2026-11-02 10:00:03", "source_ip": "1.1.1.1", "outcome": "auth_failed", "api_key_id": None, "path": "/v3/mail/send/x"},
            {"event_id": "4", "ts": "2026-11-02 10:07:00", "source_ip": "2.2.2.2", "outcome": "ok", "api_key_id": None, "path": None},
        ]
        with store.engine.begin() as conn:
            conn.execute(events.insert(), [{**base, **r, "ts": _ts(r["ts"])} for r in rows])
        plan = Pushdown(
            by="source_ip", bucket=timedelta(minutes=5), pick=lambda t: set(),
            measures={
                "unkeyed_ok": Measure(Rows(none_of=(Clause("outcome", "eq", "ok"), Clause("api_key_id", "notnull")))),
                "sends": Measure(Rows(any_of=(Clause("path", "prefix", "/v3/mail/send/"),))),
                "first": Measure(Rows(all_of=(Clause("outcome", "eq", "auth_failed"),)), first=True),
            },
        )
        table = pushdown_table(store.engine, _ts("2026-11-02 00:00:00"), _ts("2026-11-03 00:00:00"), plan)
        got = {(r.source_ip, r.bucket % 86_400, r.unkeyed_ok, r.sends, r.first % 86_400 if r.first == r.first else None)
               for r in table.itertuples()}
        assert got == {("1.1.1.1", 36_000, 2.0, 1.0, 36_003), ("2.2.2.2", 36_300, 1.0, 0.0, None)}
        assert table.attrs["bucket_seconds"] == 300
    finally:
        store.close()


def _ts(text: str):
    from datetime import datetime, timezone

    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def test_busy_finds_a_window_over_two_adjacent_buckets_only() -> None:
    """A 5-minute burst split over two buckets counts; the same counts two buckets apart do not; a
    subnet's addresses are summed and all of them returned."""
    import pandas as pd

    from detectors.pushdown import busy

    table = pd.DataFrame({
        "source_ip": ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.1.3", "10.0.1.4"],
        "bucket": [600, 900, 600, 1200, 300, 300],
        "requests": [300.0, 300.0, 300.0, 300.0, 200.0, 200.0],
    })
    table.attrs["bucket_seconds"] = 300
    assert busy(table, "source_ip", "requests", 600) == {"10.0.0.1"}
    assert busy(table, "source_ip", "requests", 601) == set()

    def subnet(ips):
        return [ip.rsplit(".", 1)[0] for ip in ips]

    assert busy(table, "source_ip", "requests", 400, group=subnet) == {"10.0.0.1", "10.0.0.2", "10.0.1.3", "10.0.1.4"}
    assert busy(table, "source_ip", "requests", 700, group=subnet) == {"10.0.0.1", "10.0.0.2"}
