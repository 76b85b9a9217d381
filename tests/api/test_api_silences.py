"""/silences: create, read, update, expire; matchers on detector, entity and CIDR; expiry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from api.queries import silence_matches
from pipeline.schema import EntityKind


def test_silence_crud(api) -> None:
    writer = api.key("alerts:write", name="oncall")
    created = api.client.post(
        "/silences", headers=writer, json={"cidr": "203.0.113.7/24", "comment": "pen test", "duration_minutes": 90}
    )
    assert created.status_code == 201
    silence = created.json()
    assert silence["cidr"] == "203.0.113.0/24"  # normalised
    assert silence["active"] is True and silence["created_by"].startswith("oncall (")
    lasts = datetime.fromisoformat(silence["expires_at"]) - datetime.fromisoformat(silence["created_at"])
    assert lasts == timedelta(minutes=90)
    sid = silence["silence_id"]

    reader = api.key("alerts:read")
    assert api.client.get(f"/silences/{sid}", headers=reader).json() == silence
    assert [s["silence_id"] for s in api.client.get("/silences", headers=reader).json()] == [sid]
    # Readers read; only writers change.
    assert api.client.delete(f"/silences/{sid}", headers=reader).status_code == 403

    later = (datetime.now(timezone.utc) + timedelta(days=2)).replace(microsecond=0)
    patched = api.client.patch(f"/silences/{sid}", headers=writer, json={"comment": "pen test, extended",
                                                                         "expires_at": later.isoformat()})
    assert patched.status_code == 200
    assert patched.json()["comment"] == "pen test, extended"
    assert datetime.fromisoformat(patched.json()["expires_at"]) == later

    ended = api.client.delete(f"/silences/{sid}", headers=writer).json()
    assert ended["active"] is False
    assert api.client.get("/silences", headers=reader).json() == []
    assert [s["silence_id"] for s in api.client.get("/silences?include_expired=true", headers=reader).json()] == [sid]
    assert api.client.delete("/silences/nope", headers=writer).status_code == 404


@pytest.mark.parametrize(
    "body, message",
    [
        ({"comment": "no matcher", "duration_minutes": 5}, "at least one matcher"),
        ({"detector": "ip_burst", "comment": "no expiry"}, "exactly one of"),
        ({"cidr": "300.1.2.0/24", "comment": "x", "duration_minutes": 5}, "not a CIDR"),
        ({"detector": "ip_brust", "comment": "typo", "duration_minutes": 5},
         "unknown detector 'ip_brust' (known: auth_bruteforce, credential_stuffing,"),
        ({"detector": "ip_burst", "comment": "past", "expires_at": "2020-01-01T00:00:00Z"}, "in the future"),
        # A misspelt field is named, not ignored (a fresh user sent ends_at and matchers).
        ({"detector": "ip_burst", "comment": "x", "duration_minutes": 5, "ends_at": "2030-01-01T00:00:00Z"}, "ends_at"),
    ],
)
def test_invalid_silences_are_refused(sqlite_api, body, message) -> None:
    response = sqlite_api.client.post("/silences", headers=sqlite_api.key("alerts:write"), json=body)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


def test_silences_mute_matching_alerts_until_they_end(api, alert_factory) -> None:
    inside = alert_factory("ip_burst", "203.0.113.9")
    other_detector = alert_factory("auth_bruteforce", "203.0.113.10")
    outside = alert_factory("ip_burst", "198.51.100.1")
    subnet = alert_factory("ip_burst", "203.0.113.128/25", kind=EntityKind.SUBNET)
    api.store.upsert_alerts([inside, other_detector, outside, subnet])
    writer = api.key("alerts:write")
    sid = api.client.post(
        "/silences", headers=writer,
        json={"detector": "ip_burst", "cidr": "203.0.113.0/24", "comment": "scanner we run", "duration_minutes": 60},
    ).json()["silence_id"]

    listed = {a["alert_id"]: a for a in api.client.get("/alerts?limit=10", headers=writer).json()["items"]}
    assert {k for k, a in listed.items() if a["status"] == "silenced"} == {inside.alert_id, subnet.alert_id}
    assert listed[inside.alert_id]["silenced_by"] == sid
    assert listed[outside.alert_id]["silenced_by"] is None
    assert listed[other_detector.alert_id]["status"] == "open"

    api.client.delete(f"/silences/{sid}", headers=writer)
    listed = api.client.get("/alerts?limit=10", headers=writer).json()["items"]
    assert {a["status"] for a in listed} == {"open"}


def test_an_expired_silence_mutes_nothing(api, alert_factory) -> None:
    alert = alert_factory("ip_burst", "203.0.113.9")
    api.store.upsert_alerts([alert])
    now = datetime.now(timezone.utc)
    # Created two hours ago for one hour: it has run out by itself, no DELETE involved.
    old = api.state.queries.create_silence(
        detector="ip_burst", entity=None, cidr=None, comment="last night's maintenance", created_by="test",
        expires_at=now - timedelta(hours=1), now=now - timedelta(hours=2),
    )
    assert old["active"] is True  # as seen when it was made
    assert api.state.queries.get_silence(old["silence_id"])["active"] is False
    reader = api.key("alerts:read")
    assert api.client.get("/silences", headers=reader).json() == []
    assert api.client.get("/silences?include_expired=true", headers=reader).json()[0]["silence_id"] == old["silence_id"]
    assert api.client.get("/alerts", headers=reader).json()["items"][0]["silenced_by"] is None
    assert api.state.queries.apply_silences() == (0, 0)


def test_matcher_logic() -> None:
    alert = {"detector": "ip_burst", "entity_kind": "ip", "entity": "2001:db8::5"}
    assert silence_matches({"cidr": "2001:db8::/32"}, alert)
    assert not silence_matches({"cidr": "203.0.113.0/24"}, alert)
    assert silence_matches({"entity": "2001:db8::5"}, alert)
    assert not silence_matches({"detector": "auth_bruteforce"}, alert)
    account = {"detector": "credential_stuffing", "entity_kind": "account", "entity": "acct_1"}
    assert not silence_matches({"cidr": "0.0.0.0/0"}, account)
    assert silence_matches({"detector": "credential_stuffing", "entity": "acct_1"}, account)
