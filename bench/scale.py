"""Benchmark: scale-out on PostgreSQL — ingest with 1, 2, 4 worker processes; detection over a week.

Usage:
  python bench/scale.py [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
                        [--ingest-lines 800000] [--workers 1,2,4]
                        [--week-events 1000000,10000000] [--days 7] [--skip-ingest] [--skip-detect]
                        [--no-aggregates]

Ingest: the same 8 combined-format files (disjoint sources) are split over k `mailwarden ingest`
processes into a fresh database; events/s = events stored / wall time from the first spawn to the
last exit (process start-up included). Detection: a week of synthetic events is written straight
into a fresh partitioned store by SQL, then `mailwarden detect` runs over the week in its own
process (wall time, peak RSS from wait4), and the SQL window aggregates (pipeline.aggregates) run
over the same week in another process. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.samples import write_combined_log  # noqa: E402
from pipeline.store import Store  # noqa: E402

FILES = 8
WEEK_START = datetime(2026, 11, 23, tzinfo=timezone.utc)

AGGREGATE_RUN = """
import json, resource, sys, time
from datetime import datetime
from pipeline.aggregates import bucket_counts, window_aggregates
from pipeline.schema import Outcome
from pipeline.store import make_engine
engine = make_engine(sys.argv[1])
since, until = datetime.fromisoformat(sys.argv[2]), datetime.fromisoformat(sys.argv[3])
t = time.perf_counter()
rows = 0
for by in ("source_ip", "api_key_id"):
    rows += len(window_aggregates(engine, since, until, by=by, bucket_seconds=600))
rows += len(bucket_counts(engine, since, until, by="source_ip", bucket_seconds=60, outcome=Outcome.AUTH_FAILED))
print(json.dumps({"seconds": time.perf_counter() - t, "groups": rows,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# A week of API traffic: 1,000 client addresses (customers' senders), 500 keys, 1,000 accounts,
# 3 % failed logins,
# plus one address guessing keys for an hour a day (so the detectors have something to find).
FILL_DAY = """
INSERT INTO events (event_id, ts, source_ip, service, scheme, method, path, status, outcome,
                    api_key_id, account, user_agent, bytes, duration_ms, recipients, flags, origin)
SELECT substr(md5('bench:' || :day || ':' || g), 1, 40),
       :start + (g * (86400.0 / :n)) * interval '1 second',
       CASE WHEN g % 200 = 0 AND g * 24 / :n = 14 THEN '203.0.113.66'
            ELSE '10.0.' || (h % 1000 / 250) || '.' || (h % 250 + 1) END,
       'api', 'https', 'POST', '/v3/mail/send',
       CASE WHEN h % 100 < 3 OR (g % 200 = 0 AND g * 24 / :n = 14) THEN 401 ELSE 202 END,
       CASE WHEN h % 100 < 3 OR (g % 200 = 0 AND g * 24 / :n = 14) THEN 'auth_failed' ELSE 'ok' END,
       'key' || (h % 500), 'acct_' || (h % 1000), 'sendkit-python/4.2.1', 512 + h % 2000, 20 + h % 70,
       1 + h % 4, NULL, 'bench:' || :day || ':' || g
FROM (SELECT g, (g * 2654435761 + :day * 97) % 1000003 AS h FROM generate_series(0, :n - 1) AS g) AS s
"""


def fresh_db(admin_url: str) -> tuple[str, sa.Engine]:
    name = f"mw_scale_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return admin_url.rsplit("/", 1)[0] + "/" + name, admin


def drop_db(admin: sa.Engine, url: str) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def env_for(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWARDEN_")}
    env.update(MAILWARDEN_DATABASE_URL=url, MAILWARDEN_PEPPER="bench", MAILWARDEN_CONFIG=os.devnull)
    return env


def wait_all(procs: list[subprocess.Popen]) -> float:
    """Wait for every child; return the largest peak RSS (MiB) among them."""
    peak = 0.0
    for proc in procs:
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"child {proc.args} failed with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        peak = max(peak, usage.ru_maxrss / 1024)
    return peak


def bench_ingest(admin_url: str, lines: int, workers: list[int], tmp: Path) -> None:
    files = []
    for i in range(FILES):
        path = tmp / f"access-{i}.log"
        write_combined_log(path, lines // FILES, seed=100 + i, start=WEEK_START + timedelta(days=i % 7))
        files.append(path)
    for k in workers:
        url, admin = fresh_db(admin_url)
        try:
            Store.open(url).close()  # migrate before the clock starts
            shares = [files[i::k] for i in range(k)]
            started = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "pipeline", "ingest", "--format", "combined", *map(str, share)],
                    cwd=ROOT, env=env_for(url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )
                for share in shares
            ]
            peak = wait_all(procs)
            wall = time.perf_counter() - started
            store = Store(sa.create_engine(url))
            stored = store.count_events()
            store.close()
            print(json.dumps({"bench": "ingest", "workers": k, "events": stored, "seconds": round(wall, 2),
                              "events_per_s": round(stored / wall), "peak_rss_mb_per_worker": round(peak)}), flush=True)
        finally:
            drop_db(admin, url)


def bench_detect(admin_url: str, week_events: int, days: int = 7, aggregates: bool = True) -> None:
    """`week_events` spread over `days` days (7: a week; 1: issue 7's day of 10,000,000 events)."""
    url, admin = fresh_db(admin_url)
    try:
        store = Store.open(url)
        per_day = week_events // days
        started = time.perf_counter()
        with store.engine.begin() as conn:
            for day in range(days):
                conn.execute(sa.text(FILL_DAY), {"day": day, "start": WEEK_START + timedelta(days=day), "n": per_day})
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE events"))
        fill = time.perf_counter() - started
        total = store.count_events()
        with store.engine.connect() as conn:
            size = conn.execute(sa.text(
                "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits WHERE inhparent = 'events'::regclass"
            )).scalar_one()
        store.close()
        until = WEEK_START + timedelta(days=days) - timedelta(microseconds=1)
        print(json.dumps({"bench": "fill", "events": total, "seconds": round(fill, 1),
                          "bytes_per_event_with_indexes": round(size / max(total, 1))}), flush=True)

        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "detect", "--since", WEEK_START.isoformat(), "--until", until.isoformat()],
            cwd=ROOT, env=env_for(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        peak = wait_all([proc])
        wall = time.perf_counter() - started
        summary = proc.stdout.read().strip().splitlines()[-1] if proc.stdout else ""
        print(json.dumps({"bench": "detect", "events": total, "days": days, "seconds": round(wall, 1),
                          "peak_rss_mb": round(peak), "summary": summary}), flush=True)
        if not aggregates:
            return

        proc = subprocess.Popen(
            [sys.executable, "-c", AGGREGATE_RUN, url, WEEK_START.isoformat(), until.isoformat()],
            cwd=ROOT, env=env_for(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        peak = wait_all([proc])
        result = json.loads(proc.stdout.read().strip().splitlines()[-1])
        print(json.dumps({"bench": "sql_aggregates", "events": total, "seconds": round(result["seconds"], 1),
                          "groups": result["groups"], "peak_rss_mb": round(peak)}), flush=True)
    finally:
        drop_db(admin, url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--ingest-lines", type=int, default=800_000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--week-events", default="1000000,10000000")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-detect", action="store_true")
    parser.add_argument("--days", type=int, default=7, help="Days the detect benchmark's events are spread over.")
    parser.add_argument("--no-aggregates", action="store_true", help="Skip timing the SQL window aggregates alone.")
    args = parser.parse_args()
    print(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}))
    with tempfile.TemporaryDirectory(prefix="mw-scale-") as tmp:
        if not args.skip_ingest:
            bench_ingest(args.pg, args.ingest_lines, [int(k) for k in args.workers.split(",")], Path(tmp))
    if not args.skip_detect:
        for n in (int(x) for x in args.week_events.split(",")):
            bench_detect(args.pg, n, args.days, not args.no_aggregates)


if __name__ == "__main__":
    main()
