"""/alerts on real stored alerts: filters, sort, pagination, evidence events, ack and resolve."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pipeline.schema import EntityKind, Severity

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def _seed(api, alert_factory):
    found = [
        alert_factory("ip_burst", "203.0.113.9", severity=Severity.HIGH, start=T0, score=5.0),
        alert_factory("ip_burst", "203.0.113.10", severity=Severity.MEDIUM, start=T0 + timedelta(hours=1), score=2.0),
        alert_factory("auth_bruteforce", "198.51.100.7", severity=Severity.CRITICAL, start=T0 + timedelta(hours=2),
                      score=9.0),
        alert_factory("credential_stuffing", "acct_1", kind=EntityKind.ACCOUNT, severity=Severity.LOW,
                      start=T0 + timedelta(hours=3), score=1.0),
        alert_factory("auth_bruteforce", "203.0.113.9", severity=Severity.HIGH, start=T0 + timedelta(hours=4),
                      score=7.0),
    ]
    assert api.store.upsert_alerts(found) == (5, 0)
    return found


def _entities(page):
    return [(a["detector"], a["entity"]) for a in page["items"]]


def test_filters(api, alert_factory) -> None:
    found = _seed(api, alert_factory)
    headers = api.key("alerts:read")
    get = lambda query: api.client.get(f"/alerts?{query}", headers=headers).json()  # noqa: E731

    brute = get("detector=auth_bruteforce")
    assert brute["total"] == 2 and {a["detector"] for a in brute["items"]} == {"auth_bruteforce"}
    assert get("entity=203.0.113.9")["total"] == 2
    assert _entities(get("entity_kind=account")) == [("credential_stuffing", "acct_1")]
    assert get("severity=high")["total"] == 2
    assert get("severity=low,critical")["total"] == 2
    assert {a["severity"] for a in get("min_severity=high")["items"]} == {"high", "critical"}
    # Windows overlapping [T0+1h30, T0+2h30]: only the alert starting at T0+2h (10-minute windows).
    since, until = (T0 + timedelta(minutes=90)).isoformat(), (T0 + timedelta(minutes=150)).isoformat()
    window = get(f"since={since.replace('+', '%2B')}&until={until.replace('+', '%2B')}")
    assert _entities(window) == [("auth_bruteforce", "198.51.100.7")]
    assert get("status=open")["total"] == len(found)
    assert get("status=resolved")["total"] == 0
    # Ack changes what a status filter returns.
    api.client.post(f"/alerts/{found[0].alert_id}/ack", headers=api.key("alerts:write"))
    assert [a["alert_id"] for a in get("status=acknowledged")["items"]] == [found[0].alert_id]
    assert get("status=open")["total"] == len(found) - 1


def test_sort_and_paginate(api, alert_factory) -> None:
    found = _seed(api, alert_factory)
    headers = api.key("alerts:read")
    default = api.client.get("/alerts", headers=headers).json()
    # Most severe first, then newest window first.
    expected = sorted(found, key=lambda a: (-int(a.severity), -a.window_start.timestamp()))
    assert [a["alert_id"] for a in default["items"]] == [a.alert_id for a in expected]
    assert default["items"][0]["severity"] == "critical" and default["items"][0]["severity_level"] == 50

    by_score = [a.alert_id for a in sorted(found, key=lambda a: a.score)]
    pages = []
    for offset in (0, 2, 4):
        page = api.client.get(f"/alerts?sort=score&limit=2&offset={offset}", headers=headers).json()
        assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == offset
        pages.extend(a["alert_id"] for a in page["items"])
    assert pages == by_score
    newest = api.client.get("/alerts?sort=-window_start&limit=1", headers=headers).json()["items"]
    assert newest[0]["window_start"] == (T0 + timedelta(hours=4)).isoformat().replace("+00:00", "Z")
    bad = api.client.get("/alerts?sort=colour", headers=headers)
    assert bad.status_code == 422 and "colour" in bad.json()["detail"]
    assert api.client.get("/alerts?status=closed", headers=headers).status_code == 422
    assert api.client.get("/alerts?severity=apocalyptic", headers=headers).status_code == 422
    # A reversed range is a mistake to report, not an empty answer (as /plots and /events do).
    reversed_range = api.client.get("/alerts?since=2026-01-01&until=2025-01-01", headers=headers)
    assert reversed_range.status_code == 422 and "since is after until" in reversed_range.json()["detail"]


def test_alert_detail_has_its_evidence_events(api, alert_factory) -> None:
    rows = [
        {"ts": T0 + timedelta(seconds=i), "source_ip": "203.0.113.9", "outcome": "auth_failed", "status": 401}
        for i in range(4)
    ] + [{"ts": T0 + timedelta(seconds=9), "source_ip": "192.0.2.1", "outcome": "ok", "status": 200}]
    ids = api.add_events(rows)
    evidence = {"sample_event_ids": ids[1:3], "failures": 4}
    with_samples = alert_factory("auth_bruteforce", "203.0.113.9", evidence=evidence)
    no_samples = alert_factory("ip_burst", "203.0.113.9")
    api.store.upsert_alerts([with_samples, no_samples])
    headers = api.key("alerts:read")

    detail = api.client.get(f"/alerts/{with_samples.alert_id}", headers=headers).json()
    assert detail["evidence"] == {"sample_event_ids": ids[1:3], "failures": 4}
    assert [e["event_id"] for e in detail["events"]] == ids[1:3]
    # Without sample ids: the entity's events inside the alert's window.
    fallback = api.client.get(f"/alerts/{no_samples.alert_id}", headers=headers).json()
    assert [e["event_id"] for e in fallback["events"]] == ids[:4]
    assert api.client.get("/alerts/nope", headers=headers).status_code == 404


def test_ack_and_resolve(api, alert_factory) -> None:
    alert = alert_factory()
    api.store.upsert_alerts([alert])
    reader, writer = api.key("alerts:read"), api.key("alerts:write", name="oncall")
    url = f"/alerts/{alert.alert_id}"

    acked = api.client.post(f"{url}/ack", headers=writer)
    assert acked.status_code == 200 and acked.json()["status"] == "acknowledged"
    assert api.client.get(url, headers=reader).json()["status"] == "acknowledged"
    assert api.client.post(f"{url}/ack", headers=writer).status_code == 200  # twice is harmless
    # A later detection run refreshes the alert but keeps the human's decision.
    api.store.upsert_alerts([alert])
    assert api.client.get(url, headers=reader).json()["status"] == "acknowledged"

    assert api.client.post(f"{url}/resolve", headers=writer).json()["status"] == "resolved"
    conflict = api.client.post(f"{url}/ack", headers=writer)
    assert conflict.status_code == 409 and "resolved" in conflict.json()["detail"]
    assert api.client.post("/alerts/nope/ack", headers=writer).status_code == 404
    who = [(r["key_name"], r["path"], r["status"]) for r in api.audit_rows() if r["method"] == "POST"]
    assert who[0] == ("oncall", f"{url}/ack", 200)


def test_an_id_copied_from_the_cli_table_resolves_through_the_api(sqlite_api, alert_factory) -> None:
    import re

    from typer.testing import CliRunner

    from pipeline.cli import app

    alert = alert_factory("ip_burst", "203.0.113.9")
    sqlite_api.store.upsert_alerts([alert])
    url = sqlite_api.store.engine.url.render_as_string(hide_password=False)
    listed = CliRunner().invoke(app, ["alerts", "--database-url", url], env={"COLUMNS": "200", "MAILWARDEN_CONFIG": "/dev/null"})
    assert listed.exit_code == 0, listed.output
    shown = re.findall(r"\b[0-9a-f]{10,}\b", listed.stdout)
    assert shown == [alert.alert_id]
    writer = sqlite_api.key("alerts:write")
    resolved = sqlite_api.client.post(f"/alerts/{shown[0]}/resolve", headers=writer)
    assert resolved.status_code == 200 and resolved.json()["status"] == "resolved"
