"""Redaction and fingerprints: what must never reach the store, and what must stay comparable."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.privacy import (
    fingerprint,
    has_secret_expr,
    hash_address,
    normalise_path_expr,
    redact_texts,
)


@pytest.mark.parametrize(
    "url, path, secret",
    [
        ("/v3/mail/send?api_key=abc123&x=1", "/v3/mail/send?api_key=REDACTED&x=1", True),
        ("/v3/mail/send?x=1&ACCESS_TOKEN=zz", "/v3/mail/send?x=1&ACCESS_TOKEN=REDACTED", True),
        ("/login?user=a&password=p4ss", "/login?user=a&password=REDACTED", True),
        ("https://bob:pw@api.example.com/v3", "https://[REDACTED]@api.example.com/v3", True),
        ("/v3/messages/8f1c2e3d4a5b6c7d8e9f/events", "/v3/messages/{id}/events", False),
        ("/v3/suppressions/bob%40example.com", "/v3/suppressions/{email}", False),
        ("/users/12345/keys/550e8400-e29b-41d4-a716-446655440000", "/users/{id}/keys/{id}", False),
        ("/a?token=", "/a?token=", False),
        ("/v3/stats?monkey=1", "/v3/stats?monkey=1", False),
        # Percent-encoded separators in the parameter name are still that parameter.
        ("/v3/mail/send?api%5Fkey=SEKRET222", "/v3/mail/send?api%5Fkey=REDACTED", True),
        ("/v3/mail/send?x%2Dapi%2Dkey=SEKRET333&a=1", "/v3/mail/send?x%2Dapi%2Dkey=REDACTED&a=1", True),
    ],
)
def test_paths_are_redacted_and_normalised(url: str, path: str, secret: bool) -> None:
    frame = pl.DataFrame({"u": [url]}).select(
        normalise_path_expr(pl.col("u")).alias("path"), has_secret_expr(pl.col("u")).alias("secret")
    )
    assert frame.row(0) == (path, secret)


def test_free_text_redaction_of_quarantined_lines() -> None:
    lines = [
        '{"api_key": "mw_live_abcdefabcdef12345678", "password": "x"',
        "Password mismatch (given password: hunter2)",
        "Authorization: Bearer abcdefgh12345",
        "key SG.aaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbb used",
    ]
    out = redact_texts(lines)
    for secret in ("mw_live_abcdefabcdef12345678", "hunter2", "abcdefgh12345", "SG.aaaa"):
        assert not any(secret in line for line in out), (secret, out)
    assert all("REDACTED" in line for line in out)


def test_free_text_redaction_of_keys_in_log_fields_and_auth_exchanges() -> None:
    """Found by a fresh-user trial: a custom log_format line that failed to parse kept its quoted
    API key, and Dovecot's auth debug kept `resp=` (base64 of user and password)."""
    lines = [
        '1.2.3.4 - - [99/Xyz/2026:10:00:00 +0000] "POST /v3/mail/send HTTP/1.1" 2O2 5 "-" "curl/8" https '
        '"mk_live_rxxWFviJAPeBlEKm2MkuqOfhSetDsHWy" "-"',
        '5.6.7.8 - - [02/Nov/2026] "GET / HTTP/1.1" 200 "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg"',
        "Nov  2 10:00:00 mx dovecot: auth: Debug: client in: AUTH\t1\tPLAIN\tservice=smtp\trip=1.2.3.4\t"
        "resp=AGJvYgBTRUtSRVRET1ZFMw==",
        "C: AUTH PLAIN AGFsaWNlAHMzY3JldA==",
        "X-Api-Key: q1w2e3r4t5y6u7i8 received",
        "token=abcd1234efgh and ?api%5Fkey=SEKRETMMM222",
    ]
    out = redact_texts(lines)
    for secret in ("mk_live_rxxW", "Zm9vYmFy", "AGJvYgBT", "AGFsaWNl", "q1w2e3r4", "abcd1234", "SEKRETMMM"):
        assert not any(secret in line for line in out), (secret, out)
    # What is not a secret stays readable: syslog's "auth: Debug:", the request, the user agent.
    assert "dovecot: auth: Debug: client in: AUTH" in out[2]
    assert '"POST /v3/mail/send HTTP/1.1" 2O2 5 "-" "curl/8" https' in out[0]


def test_fingerprints_are_keyed_and_stable() -> None:
    assert fingerprint("k1", b"a") == fingerprint("k1", b"a")
    assert fingerprint("k1", b"a") != fingerprint("k1", b"b")
    assert fingerprint("k1", b"a") != fingerprint("k2", b"a")
    assert len(fingerprint("k1", b"a")) == 20 and "k1" not in fingerprint("k1", b"a")
    assert hash_address("Bob@Example.com ", b"a") == hash_address("bob@example.com", b"a")
