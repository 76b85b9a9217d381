"""Schemathesis fuzzes every operation of the OpenAPI document in-process: no input may cause a 5xx.

Driven through its Python API (operation strategies under Hypothesis) rather than its pytest
plugin, whose lazy-fixture loader does not run on the pytest version we use.
"""

from __future__ import annotations

from datetime import timedelta

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from pipeline.schema import EntityKind, Severity

from .conftest import T0, Api, make_alert

# Examples per operation and mode: schemathesis tries boundary values first, then random ones.
# 20 keeps one backend under 20 s (~17 operations x 2 modes); 60 found nothing more in our runs,
# and the one real find (a NUL byte PostgreSQL refuses) comes within the first 20.
EXAMPLES = 20


def _seed(api: Api) -> None:
    """Events and alerts, so the handlers do real queries instead of answering from empty tables."""
    rows = [
        {
            "ts": T0 + timedelta(seconds=7 * i),
            "source": "api",
            "source_ip": f"203.0.113.{i % 7}",
            "method": "POST",
            "path": "/v3/mail/send",
            "status": 401 if i % 3 else 202,
            "outcome": "auth_failed" if i % 3 else "success",
            "account": f"acct{i % 4}",
        }
        for i in range(60)
    ]
    api.add_events(rows)
    api.store.upsert_alerts(
        [
            make_alert(),
            make_alert("auth_bruteforce", entity="198.51.100.4", severity=Severity.CRITICAL),
            make_alert("credential_stuffing", entity="acct1", kind=EntityKind.ACCOUNT, start=T0 + timedelta(hours=1)),
        ]
    )


def test_no_generated_request_causes_a_server_error(api: Api) -> None:
    _seed(api)
    # A valid admin key, so generated requests reach the handlers instead of stopping at auth.
    headers = api.key("admin", name="schemathesis")
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    server_errors: list[str] = []
    calls: dict[str, int] = {}
    no_negative: list[str] = []

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case) -> None:
                try:
                    response = case.call(headers=headers)
                except Exception as exc:  # the in-process client re-raises what a server would turn into a 500
                    server_errors.append(f"{case.method} {case.formatted_path} query={case.query!r} body={case.body!r:.200}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    return
                calls[operation.label] = calls.get(operation.label, 0) + 1
                if response.status_code >= 500:
                    server_errors.append(
                        f"{case.method} {case.formatted_path} query={case.query!r} body={case.body!r:.200}: "
                        f"{response.status_code} {response.text[:200]}"
                    )

            try:
                exercise()
            except Unsatisfiable:
                # An operation without parameters or body has no invalid input to generate.
                assert mode is GenerationMode.NEGATIVE, operation.label
                no_negative.append(operation.label)

    assert server_errors == []
    # Every documented operation was called (a schema that failed to load would pass vacuously).
    labels = {op.label for op in operations}
    assert {"GET /alerts", "GET /events", "POST /ingest", "POST /silences", "GET /health"} <= labels
    assert set(calls) == labels
    # /health takes no input: one request is all there is to try; the others got every example.
    assert calls.pop("GET /health") >= 1
    assert min(calls.values()) >= EXAMPLES
    assert "GET /health" in no_negative and "GET /alerts" not in no_negative


def test_a_nul_character_is_a_client_error_and_still_audited(api: Api) -> None:
    """What schemathesis found: PostgreSQL text cannot hold NUL, which made a 500 and lost the audit row."""
    headers = api.key("admin", name="nul")
    assert api.client.get("/alerts?detector=ip%00burst", headers=headers).status_code in (200, 422)
    assert api.client.get("/alerts/abc%00def", headers=headers).status_code in (404, 422)
    paths = [r["path"] for r in api.audit_rows()]
    assert paths == ["/alerts?detector=ip%00burst", "/alerts/abc\\x00def"]
