"""Secrets never rest in clear: raw keys, URL secrets and logged passwords are absent from the store."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from pipeline.config import load_settings
from pipeline.jobs import ingest_paths
from pipeline.privacy import fingerprint
from pipeline.store import Store

RAW_KEY = "mw_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
URL_TOKEN = "tok_5ecr3t_in_the_query_string"
PASSWORD = "hunter2-Very-Secret"


def _dump(url: str) -> str:
    engine = sa.create_engine(url)
    parts = []
    with engine.connect() as conn:
        for table in ("events", "quarantine", "checkpoints"):
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                parts.append(" ".join(str(v) for v in row))
    engine.dispose()
    return "\n".join(parts)


def test_secrets_are_not_stored(tmp_path: Path) -> None:
    log = tmp_path / "api.jsonl"
    log.write_text(
        f'{{"time": "2026-11-30T10:00:00Z", "client_ip": "203.0.113.7", "method": "POST", '
        f'"path": "/v3/mail/send?api_key={URL_TOKEN}", "status": 202, "api_key": "{RAW_KEY}", '
        f'"account": "acct_1", "recipients": ["bob@example.com", "eve@example.org"], "scheme": "https"}}\n'
        f'{{"broken json with password={PASSWORD} and token={URL_TOKEN}\n'
    )
    maillog = tmp_path / "maillog"
    maillog.write_text(
        "Nov 30 10:00:01 mx dovecot: auth: passwd-file(alice,203.0.113.8): Password mismatch "
        f"(given password: {PASSWORD})\n"
    )
    url = f"sqlite:///{tmp_path / 'm.db'}"
    settings = load_settings(database_url=url, data_dir=tmp_path / "state", pepper="pepper-for-test")
    store = Store.open(url)
    summary = ingest_paths(store, settings, [str(log)], "json")
    ingest_paths(store, settings, [str(maillog)], "smtp-auth")
    assert summary.events_stored == 1 and summary.quarantined == 1
    text = _dump(url)
    for secret in (RAW_KEY, URL_TOKEN, PASSWORD, "bob@example.com"):
        assert secret not in text, f"{secret} found in the store"
    assert fingerprint(RAW_KEY, b"pepper-for-test") in text
    flags = store.load_events(*store.event_time_range())["flags"].dropna().tolist()
    assert any("secret_in_url" in f for f in flags)
    # And not in the SQLite file's bytes either (WAL included), e.g. through a temp table.
    store.close()
    for f in tmp_path.glob("m.db*"):
        blob = f.read_bytes()
        assert RAW_KEY.encode() not in blob and URL_TOKEN.encode() not in blob and PASSWORD.encode() not in blob
