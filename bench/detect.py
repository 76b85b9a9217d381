"""Time the detection pack over a generated week (about 1,000,000 stored events) on SQLite and PostgreSQL.

    .venv/bin/python bench/detect.py [--days 7] [--seed 1] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/bench]
                                     [--whole-frame]

Generates the corpus (or reuses --data), ingests it into a fresh store per backend, puts the
generated revocation list in the store, then times: the rules (models untrained, so they stay
quiet) in one pass over the week and in the default daily steps, `train`, and the whole pack with
the trained models, both ways. Both stores run the bounded path (candidate pushdown, the default
on PostgreSQL); `--whole-frame` times the whole-frame path (the default on SQLite) on both instead.
Figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_settings  # noqa: E402
from pipeline.generate import API_FILE, EDGE_FILE, SMTP_FILE, generate  # noqa: E402
from pipeline.jobs import detect_range, ingest_paths, read_revocation_file, revoke_keys, train_once  # noqa: E402
from pipeline.store import Store  # noqa: E402

PEPPER = "bench-pepper"


def fresh_pg(url: str) -> str:
    import sqlalchemy as sa

    base, name = url.rsplit("/", 1)
    admin = sa.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url


def bench(url: str, data: Path, bounded: bool) -> None:
    settings = load_settings(database_url=url, log_format="mailapi", pepper=PEPPER)
    store = Store.open(url)
    try:
        started = time.perf_counter()
        ingested = ingest_paths(store, settings, [str(data / n) for n in (API_FILE, EDGE_FILE, SMTP_FILE)])
        print(f"  ingest: {ingested.events_stored:,} events in {time.perf_counter() - started:.1f} s")
        revoke_keys(store, read_revocation_file(data / "revoked_keys.txt"), PEPPER.encode())
        # One pass over the whole range: each detector sees the week once (plus its lookback).
        show("rules, one pass (step 7 days)", detect_range(store, settings, step=timedelta(days=7), bounded=bounded))
        # The default replay: day by day, each step with every detector's lookback before it.
        show("rules, daily steps (the default)", detect_range(store, settings, bounded=bounded))
        started = time.perf_counter()
        trained = train_once(store, settings)
        print(f"  train: {time.perf_counter() - started:.1f} s ({', '.join(f'{t.name} {t.rows:,} windows' for t in trained)})")
        show("whole pack with trained models, one pass", detect_range(store, settings, step=timedelta(days=7), bounded=bounded))
        show("whole pack with trained models, daily steps", detect_range(store, settings, bounded=bounded))
    finally:
        store.close()


def show(what: str, summary) -> None:
    rules = sum(v for k, v in summary.seconds_by_detector.items() if not k.startswith("iforest"))
    models = sum(v for k, v in summary.seconds_by_detector.items() if k.startswith("iforest"))
    print(f"  detect, {what}: {summary.seconds:.1f} s total over {summary.events:,} events — load "
          f"{summary.load_seconds:.1f} s, rules {rules:.1f} s, models {models:.1f} s, {summary.alerts_found} alerts")
    slowest = sorted(summary.seconds_by_detector.items(), key=lambda kv: -kv[1])[:5]
    print("    slowest: " + ", ".join(f"{name} {sec:.2f} s" for name, sec in slowest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path, help="A folder `mailwarden generate` wrote (default: generate one).")
    parser.add_argument("--pg", help="PostgreSQL URL of a database to (re)create for the run.")
    parser.add_argument("--whole-frame", action="store_true", help="Time the whole-frame path instead of the bounded one.")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="mailwarden-bench-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            started = time.perf_counter()
            generate(data, days=args.days, seed=args.seed)
            print(f"generate {args.days} days (seed {args.seed}): {time.perf_counter() - started:.1f} s")
        print("SQLite")
        bench(f"sqlite:///{Path(tmp) / 'bench.db'}", data, bounded=not args.whole_frame)
        if args.pg:
            print("PostgreSQL")
            bench(fresh_pg(args.pg), data, bounded=not args.whole_frame)


if __name__ == "__main__":
    main()
