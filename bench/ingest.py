"""Benchmark: durable ingest (parse, store, checkpoint) of a 1,000,000-line combined log.

Usage: python bench/ingest.py [--lines 1000000] [--repeat 3] [--pg postgresql+psycopg://postgres@127.0.0.1/test]
Prints lines/s per store (median of the repeats) and the peak RSS of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.samples import write_combined_log  # noqa: E402

RUN_ONE = """
import json, resource, sys, time
from pipeline.config import load_settings
from pipeline.jobs import ingest_paths
from pipeline.store import Store
url, path = sys.argv[1], sys.argv[2]
settings = load_settings(database_url=url, pepper="bench")
store = Store.open(url)
t = time.perf_counter()
s = ingest_paths(store, settings, [path], "combined")
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "lines": s.lines_read, "events": s.events_stored,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_once(url: str, log: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN_ONE, url, str(log)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fresh_pg(admin_url: str):
    name = f"mw_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = write_combined_log(Path(tmp) / "combined.log", args.lines, seed=1)
        size_mb = log.stat().st_size / 1e6
        print(f"input: {args.lines:,} lines, {size_mb:.0f} MB; machine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}")
        results: dict[str, list[dict]] = {"sqlite": [], "postgresql": []}
        for _ in range(args.repeat):
            db = Path(tmp) / f"{uuid.uuid4().hex}.db"
            results["sqlite"].append(run_once(f"sqlite:///{db}", log))
            db.unlink()
            url, drop = fresh_pg(args.pg)
            try:
                results["postgresql"].append(run_once(url, log))
            finally:
                drop()
        for store, runs in results.items():
            rates = [r["lines"] / r["seconds"] for r in runs]
            assert all(r["events"] == args.lines for r in runs), runs
            print(f"{store:>10}: median {statistics.median(rates):,.0f} lines/s "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in rates)}); peak RSS "
                  f"{max(r['peak_rss_mb'] for r in runs):.0f} MB")


if __name__ == "__main__":
    main()
