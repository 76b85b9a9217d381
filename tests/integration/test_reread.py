"""--reread: a file first read with the wrong format is replaced, not added to, on both stores."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from pipeline.config import load_settings
from pipeline.jobs import ingest_paths
from pipeline.samples import write_combined_log
from pipeline.store import Store, checkpoints, events, quarantine


def _counts(store: Store) -> tuple[int, int, int]:
    with store.engine.connect() as conn:
        n_events = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
        n_bad = conn.execute(sa.select(sa.func.count()).select_from(quarantine)).scalar_one()
        offset = conn.execute(sa.select(sa.func.max(checkpoints.c.byte_offset))).scalar_one()
    return int(n_events), int(n_bad), int(offset or 0)


def test_reread_replaces_a_wrong_format_read_and_keeps_other_files(database_url: str, tmp_path: Path) -> None:
    wrong = tmp_path / "api.log"
    other = tmp_path / "other.log"
    write_combined_log(wrong, 3_000, seed=4)
    write_combined_log(other, 1_000, seed=5)
    settings = load_settings(database_url=database_url, pepper="t", data_dir=tmp_path / "state")
    store = Store.open(database_url)
    try:
        ingest_paths(store, settings, [str(other)], "combined")
        first = ingest_paths(store, settings, [str(wrong)], "json")  # the wrong format
        assert first.events_stored == 0 and first.quarantined == 3_000
        assert _counts(store) == (1_000, 3_000, os.path.getsize(wrong))

        again = ingest_paths(store, settings, [str(wrong)], "combined")  # checkpointed: nothing to read
        assert again.lines_read == 0 and again.unchanged == [str(wrong)]

        fixed = ingest_paths(store, settings, [str(wrong)], "combined", reread=True)
        assert (fixed.forgotten_events, fixed.forgotten_quarantined) == (0, 3_000)
        assert fixed.events_stored == 3_000 and fixed.quarantined == 0
        assert _counts(store) == (4_000, 0, os.path.getsize(wrong))

        # Reread once more: the file's own events are replaced, the other file's stay.
        twice = ingest_paths(store, settings, [str(wrong)], "combined", reread=True)
        assert (twice.forgotten_events, twice.events_stored, twice.duplicates) == (3_000, 3_000, 0)
        assert _counts(store)[:2] == (4_000, 0)
    finally:
        store.close()


def test_cli_says_when_a_file_has_nothing_new_and_warns_on_a_mostly_quarantined_read(tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    write_combined_log(log, 200, seed=2)
    env = {**os.environ, "MAILWARDEN_PEPPER": "t", "MAILWARDEN_CONFIG": os.devnull, "COLUMNS": "200",
           "MAILWARDEN_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "ingest", *args, str(log)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    wrong = cli("--format", "json")
    assert wrong.returncode == 0, wrong.stderr
    assert "200 of 200 lines did not parse" in wrong.stderr and "--reread" in wrong.stderr
    same = cli("--format", "combined")
    assert same.returncode == 0 and "already read to its end, nothing new" in same.stderr
    fixed = cli("--format", "combined", "--reread")
    assert fixed.returncode == 0, fixed.stderr
    assert "0 events and 200 quarantined lines" in fixed.stdout
    assert "did not parse" not in fixed.stderr
    refused = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--reread", "-"], cwd=tmp_path, env=env,
                             input="", capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--reread goes with files" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_mail_log_of_mostly_non_auth_lines_is_not_called_the_wrong_format(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    queue = "Nov  2 10:00:{:02d} mx postfix/qmgr[812]: 4F1A2B{:04d}: from=<a@example.org>, size=1200, nrcpt=1 (queue active)\n"
    failed = "Nov  2 10:01:{:02d} mx postfix/smtpd[990]: warning: unknown[203.0.113.9]: SASL LOGIN authentication failed: UGFzc3dvcmQ6\n"
    log.write_text("".join(queue.format(i % 60, i) for i in range(40)) + "".join(failed.format(i) for i in range(5)))
    env = {**os.environ, "MAILWARDEN_PEPPER": "t", "MAILWARDEN_CONFIG": os.devnull, "COLUMNS": "200",
           "MAILWARDEN_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--format", "smtp-auth", str(log)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "40 × not an authentication event" in done.stdout
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("SELECT count(*), min(outcome), max(outcome) FROM events").fetchone() == (5, "auth_failed", "auth_failed")
    assert "did not parse" not in done.stderr


def _line(i: int, status: int = 200) -> str:
    return f'198.51.100.{i} - - [02/Nov/2026:10:00:{i:02d} +0000] "GET /v3/stats?n={i} HTTP/1.1" {status} 5 "-" "t"\n'


def test_a_last_line_read_before_its_writer_finished_is_read_again_whole(database_url: str, tmp_path: Path) -> None:
    """Found by a fresh-user trial: half a line, ingested, then its rest appended, ended as two
    quarantined pieces. Now the second read takes the whole line again and replaces the first piece."""
    log = tmp_path / "live.log"
    whole = _line(9, 401)
    log.write_text(_line(1) + _line(2) + whole[:40])  # the writer is mid-line
    settings = load_settings(database_url=database_url, pepper="t", data_dir=tmp_path / "state")
    store = Store.open(database_url)
    try:
        first = ingest_paths(store, settings, [str(log)], "combined")
        assert (first.lines_read, first.events_stored, first.quarantined) == (3, 2, 1)
        with log.open("a") as f:
            f.write(whole[40:] + _line(10))
        second = ingest_paths(store, settings, [str(log)], "combined")
        assert (second.lines_read, second.events_stored, second.quarantined) == (2, 2, 0)
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(events.c.path, events.c.status).order_by(events.c.ts)).all()
            bad = conn.execute(sa.select(sa.func.count()).select_from(quarantine)).scalar_one()
        assert [tuple(r) for r in rows] == [("/v3/stats?n=1", 200), ("/v3/stats?n=2", 200),
                                            ("/v3/stats?n=9", 401), ("/v3/stats?n=10", 200)]
        assert bad == 0
        assert _counts(store)[2] == os.path.getsize(log)

        # A finished file whose last line has no newline: read once, then nothing new.
        done = tmp_path / "done.log"
        done.write_text(_line(20) + _line(21).rstrip("\n"))
        assert ingest_paths(store, settings, [str(done)], "combined").events_stored == 2
        again = ingest_paths(store, settings, [str(done)], "combined")
        assert (again.lines_read, again.unchanged) == (0, [str(done)])
    finally:
        store.close()


def test_a_growing_file_with_bare_cr_line_ends_is_not_taken_for_an_open_tail(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cr.db'}"
    log = tmp_path / "mac.log"
    log.write_bytes((_line(1) + _line(2)).replace("\n", "\r").encode())
    settings = load_settings(database_url=url, pepper="t", data_dir=tmp_path / "state")
    store = Store.open(url)
    try:
        assert ingest_paths(store, settings, [str(log)], "combined").events_stored == 2
        with log.open("ab") as f:
            f.write(_line(3).replace("\n", "\r").encode())
        grown = ingest_paths(store, settings, [str(log)], "combined")
        assert (grown.lines_read, grown.events_stored) == (1, 1)
        assert _counts(store)[:2] == (3, 0)
    finally:
        store.close()
