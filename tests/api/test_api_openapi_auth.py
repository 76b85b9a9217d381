"""Walks every operation of the OpenAPI document: no key, a wrong key and an under-scoped key are refused.

The table below is the access contract. An operation added to the API without an entry here fails
the test, so nobody ships an endpoint whose scope was never decided.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.auth import Scope, effective_scopes, generate_key
from api.deps import ApiLimits
from pipeline.store import Store

from .conftest import Api, _empty, build_api

# (method, path) -> the scope it needs; None: open.
REQUIRED: dict[tuple[str, str], Scope | None] = {
    ("GET", "/health"): None,
    ("GET", "/alerts"): Scope.ALERTS_READ,
    ("GET", "/alerts/{alert_id}"): Scope.ALERTS_READ,
    ("POST", "/alerts/{alert_id}/ack"): Scope.ALERTS_WRITE,
    ("POST", "/alerts/{alert_id}/resolve"): Scope.ALERTS_WRITE,
    ("GET", "/silences"): Scope.ALERTS_READ,
    ("POST", "/silences"): Scope.ALERTS_WRITE,
    ("GET", "/silences/{silence_id}"): Scope.ALERTS_READ,
    ("PATCH", "/silences/{silence_id}"): Scope.ALERTS_WRITE,
    ("DELETE", "/silences/{silence_id}"): Scope.ALERTS_WRITE,
    ("GET", "/events"): Scope.EVENTS_READ,
    ("GET", "/stats"): Scope.EVENTS_READ,
    ("GET", "/plots/{name}"): Scope.EVENTS_READ,
    ("GET", "/dashboard/range"): Scope.EVENTS_READ,
    ("POST", "/ingest"): Scope.INGEST,
    ("GET", "/metrics"): Scope.METRICS_READ,
    ("GET", "/audit"): Scope.ADMIN,
}


@pytest.fixture
def walk_api(api_store: Store, tmp_path: Path) -> Iterator[Api]:
    """The app with a lockout threshold no walk reaches: every wrong key must meet a 401, not a 429."""
    _empty(api_store)
    harness = build_api(tmp_path, api_store, ApiLimits(auth_failures=100_000))
    try:
        yield harness
    finally:
        harness.client.close()


def _operations(api: Api) -> list[tuple[str, str]]:
    return sorted(
        (method.upper(), path) for path, operations in api.app.openapi()["paths"].items() for method in operations
    )


def _call(api: Api, method: str, path: str, headers: dict[str, str]) -> int:
    concrete = re.sub(r"\{[^}]+\}", "none", path)
    return api.client.request(method, concrete, headers=headers).status_code


def test_the_access_table_covers_every_documented_operation(walk_api: Api) -> None:
    assert set(_operations(walk_api)) == set(REQUIRED)


def test_every_operation_but_health_refuses_missing_wrong_and_underscoped_keys(walk_api: Api) -> None:
    api = walk_api
    keys = {scope: api.key(scope.value, name=f"only-{scope.value}") for scope in Scope}
    revoked = api.key("admin", name="revoked")
    api.state.keys.revoke(revoked["X-API-Key"][4:16])
    refused: dict[tuple[str, str], list[str]] = {}
    for method, path in _operations(api):
        needed = REQUIRED[(method, path)]
        if needed is None:
            assert _call(api, method, path, {}) == 200
            continue
        outcomes = {
            "missing": _call(api, method, path, {}),
            "wrong": _call(api, method, path, {"X-API-Key": generate_key()[1]}),
            "wrong bearer": _call(api, method, path, {"Authorization": f"Bearer {generate_key()[1]}"}),
            "malformed": _call(api, method, path, {"X-API-Key": "not-a-key"}),
            "revoked": _call(api, method, path, revoked),
        }
        assert set(outcomes.values()) == {401}, (method, path, outcomes)
        for scope, headers in keys.items():
            status = _call(api, method, path, headers)
            if needed in effective_scopes({scope}):
                assert status not in (401, 403), (method, path, scope.value, status)
            else:
                assert status == 403, (method, path, scope.value, status)
                refused.setdefault((method, path), []).append(scope.value)
        # Only admin may do everything: each guarded operation refuses at least one valid key.
        assert refused[(method, path)], (method, path)
    # Every refusal was audited with what was missing.
    forbidden = [r for r in api.audit_rows() if r["outcome"] == "forbidden"]
    assert len(forbidden) == sum(len(v) for v in refused.values())
    assert all(r["detail"].startswith("missing scope ") for r in forbidden)
