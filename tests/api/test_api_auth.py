"""Authentication, scopes, the failed-auth limiter and the audit log, against a real store."""

from __future__ import annotations

import hashlib
import re

import pytest

from api.auth import (
    FailureLimiter,
    KeyRing,
    Scope,
    client_address,
    client_bucket,
    generate_key,
    hash_key,
    parse_scopes,
    split_key,
)
from pipeline.schema import ConfigError


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_but_health_needs_a_key(sqlite_api) -> None:
    # The OpenAPI document lists every API route (FastAPI wraps included routers lazily).
    paths = sqlite_api.app.openapi()["paths"]
    open_paths = set()
    for path, operations in paths.items():
        for method in operations:
            response = sqlite_api.client.request(method.upper(), _concrete(path))
            if response.status_code != 401:
                open_paths.add(path)
            else:
                assert response.headers["WWW-Authenticate"] == "Bearer"
    assert open_paths == {"/health"}
    for path in ("/alerts", "/alerts/{alert_id}/ack", "/alerts/{alert_id}/resolve", "/silences", "/events",
                 "/stats", "/plots/{name}", "/ingest", "/metrics", "/health"):
        assert path in paths
    # Missing keys are not guesses: they do not count towards a lockout.
    assert sqlite_api.client.get("/health").status_code == 200


def test_header_and_bearer_both_authenticate(api) -> None:
    headers = api.key("alerts:read")
    raw = headers["X-API-Key"]
    assert api.client.get("/alerts", headers=headers).status_code == 200
    assert api.client.get("/alerts", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    # The stored row holds the hash, never the key.
    stored = api.state.keys.list()
    assert [k["key_id"] for k in stored] == [split_key(raw)]
    assert raw not in str(stored)


def test_wrong_key_is_401_and_audited(api) -> None:
    good = api.key("alerts:read")
    wrong = generate_key()[1]
    response = api.client.get("/alerts?status=open", headers={"X-API-Key": wrong})
    assert response.status_code == 401
    api.client.get("/alerts", headers=good)
    rows = api.audit_rows()
    assert [(r["path"], r["status"], r["outcome"], r["key_id"]) for r in rows] == [
        ("/alerts?status=open", 401, "bad_key", None),
        ("/alerts", 200, "ok", split_key(good["X-API-Key"])),
    ]
    assert rows[0]["client_ip"] == "testclient"
    assert rows[1]["key_name"] == "test"
    assert rows[1]["ts"] >= rows[0]["ts"]


def test_secrets_in_query_strings_are_redacted_in_the_audit_table(api) -> None:
    headers = api.key("alerts:read")
    leaked_key, leaked_password = "SG.AuditLeak0123456789abcdef", "AuditPw999"
    api.client.get(f"/alerts?limit=1&api_key={leaked_key}&password={leaked_password}", headers=headers)
    path = api.audit_rows()[-1]["path"]
    assert path.startswith("/alerts?limit=1&")
    assert leaked_key not in path and leaked_password not in path
    assert "api_key=REDACTED" in path and "password=REDACTED" in path


def test_uvicorn_access_log_lines_are_redacted() -> None:
    import logging

    from api.middleware import RedactAccessLog

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/events?token=TOKLEAK777&ip=1.2.3.4", "1.1", 200), None)
    assert RedactAccessLog().filter(record) is True
    line = record.getMessage()
    assert "TOKLEAK777" not in line
    assert line == '127.0.0.1:5000 - "GET /events?token=REDACTED&ip=1.2.3.4 HTTP/1.1" 200'


def test_revoked_key_is_refused(api) -> None:
    headers = api.key("alerts:read")
    key_id = split_key(headers["X-API-Key"])
    assert api.state.keys.revoke(key_id) is True
    assert api.state.keys.revoke(key_id) is False
    assert api.client.get("/alerts", headers=headers).status_code == 401
    assert api.audit_rows()[-1]["outcome"] == "revoked_key"


def test_ten_wrong_keys_lock_the_client_out(api) -> None:
    good = api.key("alerts:read")
    for _ in range(10):
        assert api.client.get("/alerts", headers={"X-API-Key": generate_key()[1]}).status_code == 401
    locked = api.client.get("/alerts", headers={"X-API-Key": generate_key()[1]})
    assert locked.status_code == 429
    retry_after = int(locked.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    # A right key does not get through a lockout either: guessing right must not be observable.
    assert api.client.get("/alerts", headers=good).status_code == 429
    outcomes = [r["outcome"] for r in api.audit_rows()]
    assert outcomes == ["bad_key"] * 10 + ["rate_limited"] * 2
    assert api.state.metrics.value("mailwarden_api_rate_limited_total") == 2
    # /health stays open to the locked-out client.
    assert api.client.get("/health").status_code == 200


def test_scopes_are_enforced(api, alert_factory) -> None:
    alert = alert_factory()
    api.store.upsert_alerts([alert])
    alert_id = alert.alert_id
    reader = api.key("events:read", name="reader")
    response = api.client.post(f"/alerts/{alert_id}/ack", headers=reader)
    assert response.status_code == 403
    assert "alerts:read" in response.json()["detail"]  # the router-level scope is checked first
    assert api.client.get("/events", headers=reader).status_code == 200
    viewer = api.key("alerts:read", name="viewer")
    assert api.client.post(f"/alerts/{alert_id}/ack", headers=viewer).status_code == 403
    assert api.client.post("/ingest", headers=viewer, content="x").status_code == 403
    assert api.client.get("/audit", headers=viewer).status_code == 403
    writer = api.key("alerts:write", name="writer")  # write implies read
    assert api.client.post(f"/alerts/{alert_id}/ack", headers=writer).status_code == 200
    admin = api.key("admin", name="admin")
    audit = api.client.get("/audit?outcome=forbidden", headers=admin).json()
    assert [(a["key_name"], a["detail"]) for a in reversed(audit)] == [
        ("reader", "missing scope alerts:read"),
        ("viewer", "missing scope alerts:write"),
        ("viewer", "missing scope ingest"),
        ("viewer", "missing scope admin"),
    ]
    # Forbidden is not a failed authentication: the callers are not locked out.
    assert api.client.get("/alerts", headers=viewer).status_code == 200


def test_key_format_and_hash() -> None:
    key_id, raw = generate_key()
    assert raw.startswith(f"mwk_{key_id}_") and len(key_id) == 12
    assert split_key(raw) == key_id
    assert hash_key(raw) == hashlib.sha256(raw.encode()).hexdigest()
    malformed = ("", "mwk_", f"mwk_{key_id}", f"mwk_{key_id}_", "xyz_" + raw[4:], raw + " ", raw + "!",
                 "mwk_" + "G" * 12 + "_abc", raw + "x" * 100)
    for bad in malformed:
        assert split_key(bad) is None, bad
    assert generate_key()[1] != raw


def test_scope_names_are_checked() -> None:
    assert parse_scopes(["alerts:read", "events:read,ingest"]) == {Scope.ALERTS_READ, Scope.EVENTS_READ, Scope.INGEST}
    with pytest.raises(ConfigError, match="unknown scope 'alerts:delete'"):
        parse_scopes(["alerts:delete"])
    with pytest.raises(ConfigError, match="at least one scope"):
        parse_scopes([])


def test_keyring_ignores_malformed_keys_without_a_query(tmp_path) -> None:
    from pipeline.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'k.db'}")
    ring = KeyRing(store.engine)
    raw, principal = ring.create("ci", ["ingest"])
    assert ring.verify(raw)[0] == principal
    # Same key id, different secret: the hash comparison refuses it.
    forged = raw[:-4] + ("BBBB" if raw.endswith("AAAA") else "AAAA")
    assert ring.verify(forged) == (None, "bad_key")
    assert ring.verify("not a key") == (None, "bad_key")
    store.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_window_slides() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, window_seconds=60, clock=clock)
    for step in range(3):
        assert limiter.retry_after("198.51.100.7") is None
        limiter.record_failure("198.51.100.7")
        clock.now += 10
    # Failures at t=1000, 1010, 1020; now t=1030: the oldest leaves the window at 1060.
    assert limiter.retry_after("198.51.100.7") == 30
    assert limiter.retry_after("198.51.100.8") is None
    clock.now = 1060.0
    assert limiter.retry_after("198.51.100.7") is None


def test_limiter_counts_ipv6_by_64_and_bounds_memory() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=2, window_seconds=60, max_clients=3, clock=clock)
    limiter.record_failure("2001:db8:1:2::1")
    limiter.record_failure("2001:db8:1:2:ffff::9")
    assert limiter.retry_after("2001:db8:1:2::77") == 60
    assert limiter.retry_after("2001:db8:1:3::1") is None
    assert client_bucket("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_bucket("::ffff:192.0.2.1") == "192.0.2.1"
    for i in range(5):
        limiter.record_failure(f"192.0.2.{i}")
    # Only the three most recent clients are remembered.
    assert limiter.retry_after("2001:db8:1:2::1") is None


def test_client_address_believes_only_trusted_proxies() -> None:
    import ipaddress

    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address("203.0.113.5", "198.51.100.1", trusted) == "203.0.113.5"
    assert client_address("10.0.0.2", "198.51.100.1, 10.0.0.3", trusted) == "198.51.100.1"
    # The left-most entry is whatever the client wrote; the right-most untrusted hop is the truth.
    assert client_address("10.0.0.2", "1.2.3.4, 198.51.100.1", trusted) == "198.51.100.1"
    assert client_address("10.0.0.2", "garbage", trusted) == "10.0.0.2"
    assert client_address("10.0.0.2", None, trusted) == "10.0.0.2"
    assert client_address("10.0.0.2", "198.51.100.1", []) == "10.0.0.2"
