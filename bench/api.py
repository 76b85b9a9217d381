"""Benchmark: the API service over a store of 1,000,000 events, ingest through POST /ingest, and line-to-chat time.

Usage: python bench/api.py [--events 1000000] [--rate 50] [--seconds 20] [--trials 20] [--pg ADMIN_URL]

1. Fills a store (SQLite file, or a fresh PostgreSQL database with --pg) with --events combined-log
   events (pipeline.samples) and 2,000 alerts, then starts `mailwarden serve` as its own process.
2. Sends GET /alerts and GET /events at a steady --rate (open loop: request i leaves at start + i/rate,
   whatever the answers before it did) for --seconds each; prints p50/p90/p99/max latency.
3. POSTs 20 batches of 10,000 raw combined lines to /ingest and prints lines per second.
4. Starts `mailwarden run` on the same store with detect every 2 s and a generic webhook route to a
   receiver on 127.0.0.1; writes --trials bursts of failed logins (a new address each, at a random
   phase of the detect tick) into the followed file and times line written -> chat message received.
Prints one JSON object per measurement and a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from api.auth import KeyRing  # noqa: E402
from pipeline.scheduler import TRAIN_WATERMARK  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.jobs import ingest_paths  # noqa: E402
from pipeline.samples import write_combined_log  # noqa: E402
from pipeline.schema import Alert, EntityKind, Severity  # noqa: E402
from pipeline.store import Store  # noqa: E402

START = datetime(2026, 11, 2, tzinfo=timezone.utc)  # the sample log's first day
DETECTORS = ["ip_burst", "auth_bruteforce", "credential_stuffing", "password_spraying", "plaintext_http"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, seconds: list[float], **extra: Any) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "measure": name, "n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p90_ms": round(pct(ms, 90), 1),
        "p99_ms": round(pct(ms, 99), 1), "max_ms": round(max(ms), 1), **extra,
    }


def fresh_pg(admin_url: str) -> tuple[str, Any]:
    name = f"mw_apibench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def fill(url: str, work: Path, events: int) -> tuple[str, dict[str, Any]]:
    """The store with `events` events and 2,000 alerts; returns an admin key and what it took."""
    log = write_combined_log(work / "big.log", events)
    settings = load_settings(database_url=url, pepper="bench-pepper", data_dir=work / "state")
    store = Store.open(url)
    try:
        t = time.perf_counter()
        done = ingest_paths(store, settings, [str(log)], "combined")
        ingest_s = time.perf_counter() - t
        rng = random.Random(7)
        alerts = [
            Alert(
                detector=DETECTORS[i % len(DETECTORS)],
                severity=rng.choice([Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL]),
                entity_kind=EntityKind.IP,
                entity=f"203.0.{i // 250}.{i % 250 + 1}",
                window_start=START + timedelta(seconds=40 * i),
                window_end=START + timedelta(seconds=40 * i + 600),
                score=rng.uniform(1, 20),
                title=f"bench alert {i}",
                evidence={"n": i},
            )
            for i in range(2000)
        ]
        store.upsert_alerts(alerts)
        raw, _ = KeyRing(store.engine).create("bench", ["admin"])
    finally:
        store.close()
    log.unlink()
    return raw, {"events": done.events_stored, "file_ingest_lines_per_s": round(done.lines_read / ingest_s)}


def env_for(work: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILWARDEN_")}
    return {**base, "MAILWARDEN_PEPPER": "bench-pepper", "MAILWARDEN_DATA_DIR": str(work / "state"), **extra}


def start(cmd: list[str], env: dict[str, str], cwd: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(cwd / "server.err", "ab"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(cwd / 'server.err').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def steady(
    base: str, paths: list[str], headers: dict[str, str], rate: float, seconds: float
) -> tuple[list[float], int, dict[str, list[float]]]:
    """Open-loop load: request i leaves at t0 + i/rate, the paths taken in turn; returns the
    latencies, the number of non-200 answers and the latencies per path."""
    count = int(rate * seconds)
    client = httpx.Client(base_url=base, headers=headers, timeout=30)
    latencies: list[float] = []
    by_path: dict[str, list[float]] = {p: [] for p in paths}
    errors = 0
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.5

    def one(i: int) -> None:
        nonlocal errors
        wait = t0 + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = time.perf_counter()
        response = client.get(paths[i % len(paths)])
        elapsed = time.perf_counter() - t
        with lock:
            latencies.append(elapsed)
            by_path[paths[i % len(paths)]].append(elapsed)
            errors += response.status_code != 200

    for warm in paths:  # first calls pay for imports and connection set-up
        client.get(warm)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(count)))
    client.close()
    return latencies, errors, by_path


def per_path(by_path: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {p: {"p50_ms": round(pct(v, 50) * 1000, 1), "p99_ms": round(pct(v, 99) * 1000, 1)} for p, v in by_path.items()}


def ingest_rate(base: str, headers: dict[str, str], work: Path, batches: int = 20, per_batch: int = 10_000) -> dict:
    log = write_combined_log(work / "push.log", batches * per_batch, seed=99, start=START + timedelta(days=3))
    lines = log.read_text().splitlines()
    log.unlink()
    client = httpx.Client(base_url=base, headers={**headers, "Content-Type": "text/plain"}, timeout=120)
    stored = 0
    t = time.perf_counter()
    for b in range(batches):
        body = "\n".join(lines[b * per_batch : (b + 1) * per_batch]) + "\n"
        response = client.post(f"/ingest?format=combined&batch_id=bench-{b}", content=body)
        response.raise_for_status()
        stored += response.json()["stored"]
    elapsed = time.perf_counter() - t
    client.close()
    return {"measure": "POST /ingest", "lines": batches * per_batch, "batch_lines": per_batch,
            "events_stored": stored, "seconds": round(elapsed, 2),
            "lines_per_s": round(batches * per_batch / elapsed)}


class Hooks(BaseHTTPRequestHandler):
    """The chat receiver: notes when each attacking address is first named in a message."""

    seen: dict[str, float] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        arrived = time.perf_counter()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        for alert in json.loads(body).get("alerts", []):
            entity = alert.get("labels", {}).get("entity", "")
            Hooks.seen.setdefault(entity, arrived)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def attack(ip: str) -> str:
    now = datetime.now(timezone.utc)
    return "".join(
        json.dumps({"time": (now - timedelta(milliseconds=100 * (24 - i))).isoformat().replace("+00:00", "Z"),
                    "client_ip": ip, "method": "POST", "path": "/v3/mail/send", "status": 401,
                    "api_key": "sk_live_guess", "scheme": "https"}) + "\n"
        for i in range(25)
    )


def line_to_chat(url: str, work: Path, trials: int) -> list[float]:
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    followed = work / "live.jsonl"
    followed.touch()
    (work / "mailwarden.toml").write_text(
        f'[[sources]]\npaths = ["{followed}"]\nformat = "json"\n\n'
        "[schedule]\ndetect_seconds = 2\nnotify_seconds = 1\n\n"
        '[[routes]]\nname = "bench"\nplatform = "generic"\nurl_env = "BENCH_HOOK"\n'
        'group_by = ["..."]\ngroup_interval = 0\nmin_severity = "info"\n'
    )
    port = free_port()
    env = env_for(work, MAILWARDEN_CONFIG=str(work / "mailwarden.toml"),
                  BENCH_HOOK=f"http://127.0.0.1:{hook.server_address[1]}/hook")
    proc = start([sys.executable, "-m", "pipeline", "run", "--port", str(port), "--database-url", url], env, work, port)
    rng = random.Random(3)
    latencies = []
    try:
        # Warm-up, not counted: the first ticks after start train the models and run the first
        # detect over the initial lookback; the figure we want is the steady state after that.
        with open(followed, "a") as handle:
            handle.write(attack("198.19.0.1"))
        deadline = time.perf_counter() + 300
        while "198.19.0.1" not in Hooks.seen and time.perf_counter() < deadline:
            time.sleep(0.05)
        if "198.19.0.1" not in Hooks.seen:
            raise SystemExit(f"no warm-up chat message in 300 s: {(work / 'server.err').read_text()[-2000:]}")
        # The start-up training (one fit over the whole stored history, in its own thread) may
        # still be running: it competes with detect for the two cores. Wait for its watermark.
        store = Store.open(url)
        try:
            while store.get_watermark(TRAIN_WATERMARK) is None and time.perf_counter() < deadline:
                time.sleep(0.2)
        finally:
            store.close()
        time.sleep(2)
        for i in range(trials):
            time.sleep(rng.uniform(0, 2))  # a random phase of the 2 s detect tick
            ip = f"198.18.{i // 250}.{i % 250 + 1}"
            with open(followed, "a") as handle:
                handle.write(attack(ip))
            written = time.perf_counter()
            deadline = written + 30
            while ip not in Hooks.seen and time.perf_counter() < deadline:
                time.sleep(0.01)
            if ip not in Hooks.seen:
                raise SystemExit(f"no chat message for {ip} within 30 s: {(work / 'server.err').read_text()[-2000:]}")
            latencies.append(Hooks.seen[ip] - written)
    finally:
        stop(proc)
        hook.shutdown()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second per endpoint")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pg", help="PostgreSQL admin URL; a fresh database is created and dropped")
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mw-apibench-") as tmp:
        work = Path(tmp)
        url, drop = fresh_pg(args.pg) if args.pg else (f"sqlite:///{work / 'bench.db'}", None)
        try:
            key, filled = fill(url, work, args.events)
            results.append({"measure": "store", "backend": url.split(":")[0], **filled})
            print(json.dumps(results[-1]), flush=True)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            server = start([sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--database-url", url],
                           env_for(work), work, port)
            headers = {"X-API-Key": key}
            try:
                alert_paths = ["/alerts", "/alerts?status=open&min_severity=high", "/alerts?detector=ip_burst&limit=100",
                               "/alerts?sort=-score&offset=500"]
                lat, errors, by_path = steady(base, alert_paths, headers, args.rate, args.seconds)
                results.append(summary("GET /alerts", lat, rate=args.rate, errors=errors, paths=per_path(by_path)))
                print(json.dumps(results[-1]), flush=True)
                first = START + timedelta(hours=9)
                event_paths = [
                    "/events?limit=100",
                    f"/events?since={first:%Y-%m-%dT%H:%M:%SZ}&until={first + timedelta(minutes=5):%Y-%m-%dT%H:%M:%SZ}",
                    "/events?ip=20.1.1.1&limit=50",
                    "/events?outcome=auth_failed&limit=100",
                    "/events?ip=21.0.0.0/8&limit=50",
                ]
                lat, errors, by_path = steady(base, event_paths, headers, args.rate, args.seconds)
                results.append(summary("GET /events", lat, rate=args.rate, errors=errors, paths=per_path(by_path)))
                print(json.dumps(results[-1]), flush=True)
                results.append(ingest_rate(base, headers, work))
                print(json.dumps(results[-1]), flush=True)
            finally:
                stop(server)
            results.append(summary("line -> chat", line_to_chat(url, work, args.trials), detect_seconds=2))
        finally:
            if drop:
                drop()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"{platform.system()}; load average at the end {load}")
    print(json.dumps(results[-1]))
    print(f"\nmachine: {machine}\n")
    print("| measure | n | p50 ms | p90 ms | p99 ms | max ms | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "p50_ms" in r:
            notes = f"{r.get('rate', '')} req/s, {r.get('errors', 0)} errors" if "rate" in r else "detect every 2 s"
            print(f"| {r['measure']} | {r['n']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | {notes} |")


if __name__ == "__main__":
    main()
