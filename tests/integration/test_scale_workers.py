"""Several `mailwarden ingest` processes on one PostgreSQL: exact counts, replays, a SIGKILLed worker.

The expected events come from the product itself run the plain way: one in-process ingest of the
same files into a SQLite file. The PostgreSQL store filled by concurrent worker processes must
hold exactly the same event ids and quarantine rows, however the workers overlapped or died.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.jobs import ingest_paths
from pipeline.store import Store, checkpoints, events, quarantine

REPO = Path(__file__).resolve().parents[2]
PEPPER = "scale-test-pepper"
T0 = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)


def write_mailapi_log(path: Path, lines: int, seed: int, bad_every: int = 0) -> None:
    """A mail-API JSON access log; every `bad_every`-th line is broken on purpose (quarantine)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(lines):
            if bad_every and i % bad_every == bad_every - 1:
                handle.write('{"time": "not a time", "client_ip": \n')
                continue
            ts = T0 + timedelta(seconds=seed * 100_000 + i * 0.7)
            record = {
                "time": ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "client_ip": f"203.0.{rng.randrange(0, 8)}.{rng.randrange(1, 250)}",
                "method": "POST",
                "path": "/v3/mail/send",
                "status": rng.choice([202, 202, 202, 401, 429]),
                "api_key": f"SG.key-{rng.randrange(0, 50)}",
                "account": f"acct_{rng.randrange(0, 30)}",
                "recipients": rng.randrange(1, 5),
                "scheme": "https",
                "user_agent": "sendkit-python/4.2.1",
                "duration_ms": round(rng.uniform(5, 90), 1),
                "bytes": rng.randrange(200, 4000),
                "request_id": f"r{seed}-{i}",
            }
            handle.write(json.dumps(record) + "\n")


def worker_env(database_url: str, batch_lines: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWARDEN_")}
    env.update(
        MAILWARDEN_DATABASE_URL=database_url,
        MAILWARDEN_PEPPER=PEPPER,
        MAILWARDEN_BATCH_LINES=str(batch_lines),
        MAILWARDEN_CONFIG=os.devnull,
    )
    return env


def start_worker(paths: list[Path], database_url: str, batch_lines: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ingest", "--format", "json", *map(str, paths)],
        cwd=cwd,
        env=worker_env(database_url, batch_lines),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reference(paths: list[Path], tmp_path: Path) -> tuple[set[str], set[str], dict[str, int]]:
    """Event ids, quarantine ids and each event's byte offset, from one plain in-process ingest."""
    store = Store.open(f"sqlite:///{tmp_path / 'reference.db'}")
    try:
        settings = Settings(database_url="sqlite://", pepper=PEPPER, data_dir=tmp_path / "state")
        ingest_paths(store, settings, [str(p) for p in paths], "json")
        return stored(store)
    finally:
        store.close()


def stored(store: Store) -> tuple[set[str], set[str], dict[str, int]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(events.c.event_id, events.c.origin)).all()
        bad = set(conn.execute(sa.select(quarantine.c.quarantine_id)).scalars())
    offsets = {event_id: int(origin.rsplit(":", 1)[1]) for event_id, origin in rows}
    return set(offsets), bad, offsets


def pg_counts(store: Store) -> tuple[int, int, int]:
    with store.engine.connect() as conn:
        return (
            conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one(),
            conn.execute(sa.select(sa.func.count()).select_from(quarantine)).scalar_one(),
            conn.execute(sa.select(sa.func.count()).select_from(checkpoints)).scalar_one(),
        )


@pytest.fixture
def pg_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("scale-out runs on PostgreSQL")
    Store.open(database_url).close()  # migrate once, before the workers race to
    return database_url


def run_all(workers: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for proc in workers:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_four_workers_over_overlapping_files_store_each_event_once(pg_url: str, tmp_path: Path) -> None:
    files = []
    for i in range(6):
        path = tmp_path / f"api-{i}.log"
        write_mailapi_log(path, 1200 + 150 * i, seed=i + 1, bad_every=97)
        files.append(path)
    # Every file is read by one to three workers at once; the workers start together.
    shares = [[0, 1, 2], [1, 2, 3], [3, 4, 5, 2], [5, 0, 2]]
    want_events, want_bad, _ = reference(files, tmp_path)
    assert len(want_events) > 8000 and len(want_bad) > 50

    workers = [start_worker([files[i] for i in share], pg_url, 250, tmp_path) for share in shares]
    run_all(workers)
    store = Store(sa.create_engine(pg_url))
    try:
        got_events, got_bad, _ = stored(store)
        assert got_events == want_events
        assert got_bad == want_bad
        first = pg_counts(store)
        assert first == (len(want_events), len(want_bad), len(files))

        # A replay of everything, by two workers that overlap again, changes nothing.
        replay = [[0, 1, 2, 3], [2, 3, 4, 5]]
        outputs = run_all([start_worker([files[i] for i in share], pg_url, 250, tmp_path) for share in replay])
        assert pg_counts(store) == first
        assert stored(store)[0] == want_events
        assert all("events stored" in out for out in outputs)
    finally:
        store.close()


def wait_for_rows(store: Store, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
        if n >= at_least:
            return n
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} events after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_worker_killed_mid_ingest_loses_and_duplicates_nothing(pg_url: str, tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    write_mailapi_log(path, 25_000, seed=9, bad_every=211)
    want_events, want_bad, offsets = reference([path], tmp_path)

    store = Store(sa.create_engine(pg_url))
    try:
        worker = start_worker([path], pg_url, 800, tmp_path)
        wait_for_rows(store, 1600)
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        assert worker.returncode == -signal.SIGKILL

        # What was committed is exactly the lines before the committed checkpoint: the batch in
        # flight was rolled back with its checkpoint, nothing half-written remains.
        with store.engine.connect() as conn:
            cp_offset = conn.execute(sa.select(checkpoints.c.byte_offset)).scalar_one()
        got_events, got_bad, _ = stored(store)
        assert 0 < len(got_events) < len(want_events)
        assert got_events == {e for e in want_events if offsets[e] < cp_offset}

        # Two workers resume together: the end state is the plain ingest's, exactly.
        run_all([start_worker([path], pg_url, 800, tmp_path) for _ in range(2)])
        got_events, got_bad, _ = stored(store)
        assert got_events == want_events
        assert got_bad == want_bad
        assert pg_counts(store) == (len(want_events), len(want_bad), 1)
    finally:
        store.close()
