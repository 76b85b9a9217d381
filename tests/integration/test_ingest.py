"""Ingestion end to end on real files and real stores: exactly once, resumable, nothing lost."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from pipeline.config import load_settings
from pipeline.jobs import ingest_paths
from pipeline.samples import write_combined_log
from pipeline.store import Store

REPO = Path(__file__).resolve().parents[2]


def _settings(url: str, tmp_path: Path):
    return load_settings(database_url=url, data_dir=tmp_path / "state", pepper="test-pepper")


def test_honeynet_log_twice_stores_every_line_once(shared_data: Path, database_url: str, tmp_path: Path) -> None:
    log = shared_data / "honeynet-redhat-2004" / "access_log.24"
    settings = _settings(database_url, tmp_path)
    store = Store.open(database_url)
    first = ingest_paths(store, settings, [str(log)], "auto")
    assert first.formats == {"combined": 1}
    assert first.lines_read == 9344
    assert first.events_stored + first.quarantined == 9344
    assert first.events_stored >= 9300  # the log is combined format throughout
    second = ingest_paths(store, settings, [str(log)], "auto")
    assert second.lines_read == 0 and second.events_stored == 0  # checkpoint: nothing new
    # Even without the checkpoint, event ids (file identity + offset) make a replay add nothing.
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM checkpoints"))
    third = ingest_paths(store, settings, [str(log)], "auto")
    assert third.lines_read == 9344 and third.events_stored == 0 and third.duplicates == first.events_stored
    assert store.count_events() == first.events_stored
    store.close()


def test_gz_copy_of_an_ingested_file_adds_nothing(shared_data: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    src = shared_data / "honeynet-redhat-2004" / "access_log.1"
    plain = tmp_path / "access_log.1"
    shutil.copy(src, plain)
    with open(plain, "rb") as f_in, gzip.open(tmp_path / "access_log.1.gz", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    store = Store.open(url)
    settings = _settings(url, tmp_path)
    first = ingest_paths(store, settings, [str(plain)], "combined")
    again = ingest_paths(store, settings, [str(tmp_path / "access_log.1.gz")], "combined")
    assert first.events_stored == 1199
    assert again.events_stored == 0
    store.close()


def test_files_sharing_a_first_line_are_not_mistaken_for_copies(tmp_path: Path) -> None:
    header = "# exported by the same tool, same header line in every file\n"
    line = '203.0.113.{n} - - [02/Nov/2026:10:00:00 +0000] "GET /v3/stats HTTP/1.1" 200 1 "-" "x"\n'
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text(header + "".join(line.format(n=i) for i in range(5)))
    b.write_text(header + "".join(line.format(n=100 + i) for i in range(7)))
    url = f"sqlite:///{tmp_path / 'm.db'}"
    store = Store.open(url)
    settings = _settings(url, tmp_path)
    first = ingest_paths(store, settings, [str(a), str(b)], "combined")
    assert (first.events_stored, first.duplicates) == (12, 0)
    # Re-running finds each file's own checkpoint: nothing is read twice.
    again = ingest_paths(store, settings, [str(a), str(b)], "combined")
    assert (again.lines_read, again.events_stored) == (0, 0)
    # A compressed rotation of a.log is recognised as a copy and adds nothing.
    with open(a, "rb") as f_in, gzip.open(tmp_path / "a.log.1.gz", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    rotated = ingest_paths(store, settings, [str(tmp_path / "a.log.1.gz")], "combined")
    assert rotated.events_stored == 0
    assert store.count_events() == 12
    store.close()


def test_every_real_file_ingests_with_auto(shared_data: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'all.db'}"
    store = Store.open(url)
    settings = _settings(url, tmp_path)
    files = sorted(p for p in shared_data.rglob("*") if p.is_file() and p.suffix not in (".md", ".csv"))
    assert len(files) > 50
    total = ingest_paths(store, settings, [str(p) for p in files], "auto")
    # Several fail2ban files start with the same line; they are still different files.
    assert total.duplicates == 0
    assert total.lines_read == total.events_stored + total.quarantined
    assert store.count_events() + store.count_quarantine() == total.lines_read
    # Combined, JSON and SMTP-auth files were recognised as such.
    assert {"combined", "json", "smtp-auth"} <= set(total.formats)
    store.close()


def _count(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
    engine.dispose()
    return n


@pytest.mark.slow
def test_sigkill_mid_ingest_then_restart_gives_exact_count(database_url: str, tmp_path: Path) -> None:
    log = write_combined_log(tmp_path / "big.log", 1_000_000, seed=3)
    env = {**os.environ, "MAILWARDEN_DATABASE_URL": database_url, "MAILWARDEN_PEPPER": "p",
           "MAILWARDEN_BATCH_LINES": "20000"}
    cmd = [sys.executable, "-m", "pipeline", "ingest", "--format", "combined", str(log)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Kill once some batches are committed but long before the end.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            n = _count(database_url)
        except sa.exc.SQLAlchemyError:
            continue
        if n >= 100_000:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_at = _count(database_url)
    assert 0 < killed_at < 1_000_000, killed_at
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _count(database_url) == 1_000_000
    assert "Traceback" not in done.stderr
    # The killed run was a bulk load (entity indexes dropped); the restart built them back.
    assert ENTITY_INDEXES <= _index_names(database_url)


def _cli(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAILWARDEN_PEPPER": "p"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["ingest", "--format", "nope", "x.log"], "unknown format 'nope'"),
        (["ingest", "does-not-exist-*.log"], "does-not-exist"),
        (["detect", "--since", "yesterday"], "not an ISO-8601 time"),
        (["alerts", "--database-url", "nosuchdriver://x"], "unsupported database 'nosuchdriver'"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    done = _cli(*args, cwd=tmp_path)
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) <= 2


def test_stdin_ingest_is_idempotent(tmp_path: Path) -> None:
    data = b"".join(
        f'203.0.113.{i % 9} - - [02/Nov/2026:10:00:{i % 60:02d} +0000] "GET /v3/stats HTTP/1.1" 200 12 "-" "x"\n'.encode()
        for i in range(50)
    ) + b"\xff\xfe not a log line\n"
    first = _cli("ingest", "-", cwd=tmp_path, stdin=data)
    again = _cli("ingest", "-", cwd=tmp_path, stdin=data)
    assert first.returncode == 0, first.stderr.decode()
    out1, out2 = first.stdout.decode(), again.stdout.decode()
    assert "events stored" in out1 and "50" in out1
    assert _count(f"sqlite:///{tmp_path / 'mailwarden.db'}") == 50
    assert "duplicates skipped" in out2


def _index_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {ix["name"] for ix in sa.inspect(engine).get_indexes("events")}
    finally:
        engine.dispose()


ENTITY_INDEXES = {"ix_events_source_ip_ts", "ix_events_account_ts", "ix_events_api_key_id_ts"}


def test_bulk_load_builds_entity_indexes_at_the_end_and_a_killed_one_gets_them_back(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.jobs as jobs

    # Any file counts as big here, so a 3,000-line file takes the bulk path.
    monkeypatch.setattr(jobs, "BULK_MIN_BYTES", 0)
    log = write_combined_log(tmp_path / "bulk.log", 3_000, seed=5)
    store = Store.open(database_url)
    assert ENTITY_INDEXES <= _index_names(database_url)
    during: list[set[str]] = []
    summary = ingest_paths(store, _settings(database_url, tmp_path), [str(log)], "combined",
                           progress=lambda *_: during.append(_index_names(database_url)))
    assert summary.events_stored == 3_000
    # While loading, the entity indexes were absent (the time index stayed); afterwards all are back.
    assert during and all(not (names & ENTITY_INDEXES) and "ix_events_ts" in names for names in during)
    assert ENTITY_INDEXES <= _index_names(database_url)
    # A load killed before its end leaves them dropped: the next open builds them again.
    store.drop_secondary_indexes()
    assert not _index_names(database_url) & ENTITY_INDEXES
    store.close()
    Store.open(database_url).close()
    assert ENTITY_INDEXES <= _index_names(database_url)


def test_a_small_file_into_a_bigger_store_keeps_the_indexes(database_url: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.jobs as jobs

    monkeypatch.setattr(jobs, "BULK_MIN_BYTES", 0)
    store = Store.open(database_url)
    settings = _settings(database_url, tmp_path)
    ingest_paths(store, settings, [str(write_combined_log(tmp_path / "a.log", 2_000, seed=6))], "combined")
    during: list[set[str]] = []
    # 200 lines of ~120 bytes are far fewer than the 2,000 events stored: no bulk mode.
    small = write_combined_log(tmp_path / "b.log", 200, seed=7)
    ingest_paths(store, settings, [str(small)], "combined", progress=lambda *_: during.append(_index_names(database_url)))
    assert during and all(ENTITY_INDEXES <= names for names in during)
    assert store.count_events() == 2_200
    store.close()


def test_awkward_text_values_survive_the_bulk_path_unchanged(database_url: str) -> None:
    import polars as pl

    from pipeline.parsers.base import conform
    from pipeline.schema import event_ids

    # Separators and quotes of the CSV that COPY reads, a NUL PostgreSQL text cannot hold, a line
    # break, non-ASCII, and the empty string next to null: each must come back as it went in
    # (NUL as the escape the parsers use for bytes that are not text).
    agents = ['a,b "quoted" \\ back', "", None, "tab\there\r\nnewline", "caf\u00e9 \u2603 \U0001f600", "nul\x00byte"]
    n = len(agents)
    frame = conform(pl.DataFrame({
        "ts": [datetime(2026, 3, 29, 1, 59, 59, 123456, tzinfo=timezone.utc)] * n,
        "source_ip": ["2001:db8::1"] * n,
        "user_agent": agents,
        "bytes": [None, 0, 1, 2**40, None, 5],
        "duration_ms": [0.5, None, 1e-3, 12345.678, None, 2.0],
        "row": list(range(n)),
    })).drop("row").with_columns(
        pl.Series("event_id", event_ids("q" * 32, list(range(n)))), pl.Series("origin", [f"f:{i}" for i in range(n)])
    )
    store = Store.open(database_url)
    result = store.write_batch(frame, [], None)
    assert result.inserted == n
    back = store.load_events(datetime(2026, 3, 29, tzinfo=timezone.utc), datetime(2026, 3, 30, tzinfo=timezone.utc))
    back = back.sort_values("event_id").reset_index(drop=True)
    expected = [a.replace("\x00", "\\x00") if a is not None else None for a in agents]
    assert [None if v is pd.NA else v for v in back["user_agent"].tolist()] == expected
    assert [None if v is pd.NA else v for v in back["bytes"].tolist()] == [None, 0, 1, 2**40, None, 5]
    assert [None if v is pd.NA else v for v in back["duration_ms"].tolist()] == [0.5, None, 1e-3, 12345.678, None, 2.0]
    assert set(back["ts"].astype(str)) == {"2026-03-29 01:59:59.123456+00:00"}
    assert set(back["source_ip"]) == {"2001:db8::1"}
    store.close()


def test_lines_dated_outside_1970_to_2199_are_quarantined_in_every_format(database_url: str, tmp_path: Path) -> None:
    """One line dated 9999 used to be stored from combined logs and then broke detect, the report
    and the plots; every format now quarantines it, and the good lines around it are stored."""
    combined = tmp_path / "access.log"
    combined.write_text("".join(
        f'203.0.113.5 - - [03/Nov/{year}:10:00:00 +0000] "GET /v1/send HTTP/1.1" 200 12 "-" "curl"\n'
        for year in ("2026", "9999", "0001", "1969", "2199", "1970")
    ))
    api = tmp_path / "api.jsonl"
    api.write_text("".join(
        f'{{"time": "{year}-11-03T10:00:00Z", "client_ip": "198.51.100.7", "method": "POST", '
        f'"path": "/v1/send", "status": 200}}\n'
        for year in ("2026", "9999", "2200")
    ))
    syslog = tmp_path / "mail.log"
    syslog.write_text(
        "2026-11-03T10:00:00+00:00 mx1 postfix/smtpd[42]: warning: unknown[192.0.2.9]: SASL LOGIN "
        "authentication failed: UGFzc3dvcmQ6\n"
        "9999-11-03T10:00:00+00:00 mx1 postfix/smtpd[42]: warning: unknown[192.0.2.9]: SASL LOGIN "
        "authentication failed: UGFzc3dvcmQ6\n"
    )
    store = Store.open(database_url)
    try:
        settings = _settings(database_url, tmp_path)
        results = {p.name: ingest_paths(store, settings, [str(p)], "auto") for p in (combined, api, syslog)}
        assert {n: (r.events_stored, r.quarantined) for n, r in results.items()} == {
            "access.log": (3, 3), "api.jsonl": (1, 2), "mail.log": (1, 1)}
        first, last = store.event_time_range()
        assert first.year == 1970 and last.year == 2199
        reasons = store.quarantine_summary()
        assert reasons["timestamp outside the years 1970-2199"] == 4  # combined 3, syslog 1
        assert sum(n for reason, n in reasons.items() if "1970-2199" in reason) == 6  # and the JSON parser's 2
    finally:
        store.close()
