"""Benchmark: durable ingest (parse, store, checkpoint) of a generated combined log into SQLite and PostgreSQL.

Usage:
    .venv/bin/python bench/ingest.py [--lines 1000000] [--repeat 3] [--stores sqlite,postgresql]
                                     [--log FILE] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

Each run is a fresh process (`ingest_paths` into a fresh SQLite file or PostgreSQL database), timed inside
the process from the call to its return, so interpreter start-up is left out (bench/compare.py times the
whole CLI instead). Prints per store the median lines/s, the CPU seconds of the process (a steadier figure
than wall time on a shared machine; it leaves out the PostgreSQL server's share), and the peak RSS.
The machine's load average is printed next to every run: other work on the machine slows every figure.
For the memory check on a big file: --lines 10000000 --repeat 1 --stores sqlite.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.samples import write_combined_log  # noqa: E402

RUN_ONE = """
import json, sys, time
from pipeline.config import load_settings
from pipeline.jobs import ingest_paths
from pipeline.store import Store
url, path = sys.argv[1], sys.argv[2]
settings = load_settings(database_url=url, pepper="bench")
store = Store.open(url)
wall, cpu = time.perf_counter(), time.process_time()
s = ingest_paths(store, settings, [path], "combined")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, so a big
# benchmark parent would show as this child's peak.
hwm_kb = next(int(t.split()[1]) for t in open("/proc/self/status") if t.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                  "lines": s.lines_read, "events": s.events_stored, "quarantined": s.quarantined,
                  "peak_rss_mb": hwm_kb / 1024}))
"""


def run_once(url: str, log: Path) -> dict:
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", RUN_ONE, url, str(log)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MAILWARDEN_CONFIG": "/dev/null"})
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"ingest into {url.split('@')[-1]} failed: {tail[0]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_at_start"] = round(load, 2)
    return result


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


def cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000, help="lines of the generated log (default 1,000,000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    ap.add_argument("--log", type=Path, help="ingest this combined log instead of generating one")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                    help="PostgreSQL admin URL; a fresh database is created next to it per run")
    ap.add_argument("--json", type=Path, help="also write the runs here")
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = set(stores) - {"sqlite", "postgresql"}
    if unknown or args.repeat < 1 or args.lines < 1:
        ap.error(f"unknown store(s) {', '.join(sorted(unknown))}" if unknown else "--lines and --repeat must be positive")
    with tempfile.TemporaryDirectory(prefix="mailwarden-bench-") as tmp:
        if args.log:
            log = args.log.resolve()
            if not log.is_file():
                ap.error(f"--log {args.log}: no such file")
        else:
            log = write_combined_log(Path(tmp) / "combined.log", args.lines, seed=1)
        size_mb = log.stat().st_size / 1e6
        print(f"input: {log.name}, {size_mb:,.0f} MB; machine: {cpu_model()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}", flush=True)
        results: dict[str, list[dict]] = {s: [] for s in stores}
        for round_no in range(1, args.repeat + 1):
            # Stores alternate within a round, so a burst of other work hits both alike.
            for store in stores:
                if store == "sqlite":
                    db = Path(tmp) / f"{uuid.uuid4().hex}.db"
                    r = run_once(f"sqlite:///{db}", log)
                    for p in Path(tmp).glob(db.name + "*"):
                        p.unlink()
                else:
                    url, drop = fresh_pg(args.pg)
                    try:
                        r = run_once(url, log)
                    finally:
                        drop()
                results[store].append(r)
                print(f"  round {round_no} {store:>10}: {r['lines'] / r['seconds']:>9,.0f} lines/s  "
                      f"{r['seconds']:6.2f} s  cpu {r['cpu_seconds']:6.2f} s  peak RSS {r['peak_rss_mb']:5.0f} MB  "
                      f"load {r['load_at_start']:.1f}  events {r['events']:,}", flush=True)
        failed = False
        for store, runs in results.items():
            rates = [r["lines"] / r["seconds"] for r in runs]
            complete = all(r["events"] + r["quarantined"] == r["lines"] for r in runs)
            failed |= not complete
            print(f"{store:>10}: median {statistics.median(rates):,.0f} lines/s "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in rates)}); "
                  f"median CPU {statistics.median(r['cpu_seconds'] for r in runs):.1f} s; "
                  f"peak RSS {max(r['peak_rss_mb'] for r in runs):.0f} MB"
                  + ("" if complete else "; LINES MISSING (events + quarantined != lines)"))
        if args.json:
            args.json.write_text(json.dumps({"input_mb": size_mb, "runs": results}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
