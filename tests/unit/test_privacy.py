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


def test_fingerprints_are_keyed_and_stable() -> None:
    assert fingerprint("k1", b"a") == fingerprint("k1", b"a")
    assert fingerprint("k1", b"a") != fingerprint("k1", b"b")
    assert fingerprint("k1", b"a") != fingerprint("k2", b"a")
    assert len(fingerprint("k1", b"a")) == 20 and "k1" not in fingerprint("k1", b"a")
    assert hash_address("Bob@Example.com ", b"a") == hash_address("bob@example.com", b"a")
