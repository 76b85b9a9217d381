"""Two `mailwarden run` processes on one PostgreSQL: each job runs once per tick, and fail-over works.

Both processes follow the same log file and schedule detect every second. The advisory lock lets
only the leader run a tick; `job_runs` records who ran what and when. The leader is then SIGKILLed
and the other process must take the job over at its next tick.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from pipeline.leader import Leadership, job_run_rows
from pipeline.store import Store, events

INTERVAL_S = 1.0
START_TIMEOUT_S = 40.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunProcess:
    proc: subprocess.Popen
    port: int
    out: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.out.read_text(errors="replace")


def start_run(workdir: Path, database_url: str, name: str) -> RunProcess:
    port = free_port()
    out = workdir / f"{name}.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWARDEN_")} | {
        "MAILWARDEN_CONFIG": str(workdir / "mailwarden.toml"),
        "MAILWARDEN_PEPPER": "leader-test-pepper",
        "MAILWARDEN_DATABASE_URL": database_url,
    }
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--port", str(port)],
            cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
    run = RunProcess(proc, port, out)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{run.output()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return run
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{name} did not answer /health:\n{run.output()}")


def stop(run: RunProcess) -> None:
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGTERM)
        try:
            run.proc.wait(15)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait(5)


def append_lines(path: Path, start: int, count: int) -> None:
    now = datetime.now(timezone.utc)
    with path.open("a") as handle:
        for i in range(start, start + count):
            record = {
                "time": (now + timedelta(milliseconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "client_ip": f"192.0.2.{i % 200 + 1}",
                "method": "POST",
                "path": "/v3/mail/send",
                "status": 202,
                "account": f"acct_{i % 7}",
                "request_id": f"leader-{i}",
            }
            handle.write(json.dumps(record) + "\n")


def pid_of(owner: str) -> int:
    return int(owner.rsplit(":", 1)[1])


def runs(store: Store, job: str) -> list[dict]:
    return job_run_rows(store.engine, job)


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_run_processes_run_each_tick_once_and_fail_over(database_url: str, tmp_path: Path) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("leader election is a PostgreSQL feature")
    store = Store.open(database_url)
    log = tmp_path / "api.log"
    log.touch()
    (tmp_path / "mailwarden.toml").write_text(
        f"""
[[sources]]
paths = [{json.dumps(str(log))}]
format = "json"

[schedule]
detect_seconds = {INTERVAL_S}
notify_seconds = 3600
"""
    )
    first = start_run(tmp_path, database_url, "first")
    second = start_run(tmp_path, database_url, "second")
    procs = {first.pid: first, second.pid: second}
    written = 0
    try:
        both_up = datetime.now(timezone.utc)
        for _ in range(5):
            append_lines(log, written, 40)
            written += 40
            time.sleep(INTERVAL_S)
        watched_until = datetime.now(timezone.utc)

        detect = [r for r in runs(store, "detect") if both_up <= r["started_at"] <= watched_until]
        owners = {pid_of(r["owner"]) for r in detect}
        assert len(owners) == 1, detect  # one leader ran every tick; the other skipped
        leader = procs[owners.pop()]
        follower = second if leader is first else first
        # Once per tick: never two runs at the same time, never more runs than ticks.
        assert len(detect) >= 2, detect
        assert len(detect) <= (watched_until - both_up).total_seconds() / INTERVAL_S + 1
        for before, after in zip(detect, detect[1:]):
            assert after["started_at"] >= before["finished_at"]
        # The hourly maintenance job was due at both start-ups and ran once.
        assert len(runs(store, "maintenance")) == 1

        killed_at = datetime.now(timezone.utc)
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(10)
        append_lines(log, written, 40)
        written += 40
        deadline = time.monotonic() + 20
        taken: list[dict] = []
        while time.monotonic() < deadline and not taken:
            taken = [r for r in runs(store, "detect") if pid_of(r["owner"]) == follower.pid]
            time.sleep(0.05)
        assert taken, follower.output()
        takeover = (taken[0]["started_at"] - killed_at).total_seconds()
        print(f"takeover {takeover:.2f} s after the leader was killed (interval {INTERVAL_S} s)")
        # Its next tick after the lock was freed: within one interval, plus start-of-run slack.
        assert takeover <= 2 * INTERVAL_S, takeover

        # Both followed the same file; every line is stored once (the survivor reads the last lines).
        deadline = time.monotonic() + 30
        stored = -1
        while time.monotonic() < deadline and stored != written:
            with store.engine.connect() as conn:
                stored = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
            time.sleep(0.1)
        assert stored == written, follower.output()
        later = [r for r in runs(store, "detect") if r["started_at"] > killed_at]
        assert {pid_of(r["owner"]) for r in later} == {follower.pid}
    finally:
        for proc in procs.values():
            stop(proc)
        store.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_lock_is_exclusive_and_freed_with_its_session(database_url: str) -> None:
    store = Store.open(database_url)
    one, two = Leadership(store.engine, "one:1"), Leadership(store.engine, "two:2")
    try:
        assert one.holds("detect") and one.holds("detect")  # re-checking keeps it
        assert not two.holds("detect")
        assert two.holds("notify")  # locks are per job
        one.release_all()  # what a dying process's closed session does
        assert two.holds("detect")
        assert not one.holds("detect")
        with two.run("detect") as mine:
            assert mine
        with one.run("detect") as mine:
            assert not mine
        rows = job_run_rows(store.engine, "detect")
        assert [(r["owner"], r["ok"]) for r in rows] == [("two:2", True)]
    finally:
        one.release_all()
        two.release_all()
        store.close()


def test_sqlite_is_its_own_leader(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'one.db'}")
    try:
        a, b = Leadership(store.engine, "a:1"), Leadership(store.engine, "b:2")
        assert a.holds("detect") and b.holds("detect")
        with a.run("detect") as mine:
            assert mine
        assert [r["owner"] for r in job_run_rows(store.engine)] == ["a:1"]
    finally:
        store.close()
