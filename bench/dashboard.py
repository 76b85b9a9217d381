"""Benchmark: the dashboard's first load in headless Chromium with about 1,000,000 events stored.

Usage: python bench/dashboard.py [--events 1000000] [--runs 3] [--store DIR] [--chromium /usr/bin/chromium]

Builds (once, kept in --store) a SQLite store of generated traffic with injected attacks
(pipeline.generate, ingest, detect), serves it with `mailwarden serve` in its own process, and opens
`/` in a fresh browser context per run with the API key already in the tab. A first load is timed from
navigation start to the moment the alerts table and every overview figure are drawn by plotly.js
(figures that failed count as not drawn). Each run waits out the server's aggregate cache first, so
every run reads the database cold. Prints one JSON object per range and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo_store import SampleStore, make_demo_key  # noqa: E402
from pipeline.store import Store  # noqa: E402

# Generated traffic is about 141,000 events a day at scale 1 (measured: 764,462 events in 7 days at
# scale 0.772).
EVENTS_PER_DAY_AT_SCALE_1 = 141_000
DAYS = 7
CACHE_TTL_SECONDS = 15.0  # api.frames.AggregateCache's default


def build(folder: Path, events: int) -> SampleStore:
    """Generate and ingest into folder/mailwarden.db unless enough events are there; detect unless
    alerts are there."""
    from pipeline.generate import generate
    from pipeline.jobs import detect_range, ingest_paths

    sample = SampleStore(folder)
    settings = sample.settings()
    store = Store.open(sample.url)
    if store.count_events() < events * 0.9:
        # Start over: new logs ingested on top of a smaller store would count twice.
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(sample.db_path) + suffix).unlink(missing_ok=True)
        store = Store.open(sample.url)
    try:
        if store.count_events() == 0:
            scale = events / (EVENTS_PER_DAY_AT_SCALE_1 * DAYS)
            started = time.perf_counter()
            summary = generate(sample.logs, days=DAYS, seed=11, attacks=True, scale=scale)
            print(f"generated {sum(summary.files.values()):,} lines in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
            started = time.perf_counter()
            ingested = ingest_paths(store, settings, [str(sample.logs / n) for n in ("api.jsonl", "nginx.log", "maillog")],
                                    "auto")
            print(f"ingested {ingested.events_stored:,} events in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
        if not store.list_alerts(limit=1):
            started = time.perf_counter()
            found = detect_range(store, settings)
            print(f"detected {found.alerts_found} alerts in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        store.close()
    return sample


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(sample: SampleStore, port: int) -> subprocess.Popen:
    env = {**os.environ, "MAILWARDEN_PEPPER": "mailwarden-sample-pepper", "MAILWARDEN_DATA_DIR": str(sample.folder / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--database-url", sample.url],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(sample.folder / "serve.log", "w"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("mailwarden serve did not start")


def first_load(browser, base_url: str, key: str, preset: str) -> dict:
    """One cold first load of / in a fresh context; times from navigation start, in ms."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    # The key and the range preset are already in the tab (as after entering them once).
    context.add_init_script(f"sessionStorage.setItem('mailwarden.apiKey', {json.dumps(key)});"
                            f"sessionStorage.setItem('mailwarden.range', {json.dumps(preset)});")
    page = context.new_page()
    try:
        page.goto(base_url + "/", wait_until="commit")
        page.wait_for_function(
            "() => document.body.dataset.loads === '1' && document.querySelector('#alerts-table table, #alerts-table .empty')"
            " && document.querySelectorAll('div.figure').length > 0"
            " && document.querySelectorAll(\"div.figure[data-state='loading']\").length === 0",
            timeout=120_000, polling=10,
        )
        ms = page.evaluate("() => performance.now()")
        marks = page.evaluate("() => Object.fromEntries(performance.getEntriesByType('mark')"
                              ".map(m => [m.name.replace('mailwarden:', ''), Math.round(m.startTime)]))")
        alerts_ms = page.evaluate(
            "() => { const r = performance.getEntriesByType('resource').find(e => e.name.includes('/alerts?'));"
            " return r ? Math.round(r.responseEnd) : null; }")
        figures = page.eval_on_selector_all(
            "div.figure", "ds => ds.map(d => [d.dataset.figure, d.dataset.state, Number(d.dataset.points || 0),"
            " d.dataset.state === 'failed' ? d.innerText : ''])")
        api_calls = page.evaluate(
            "() => performance.getEntriesByType('resource').filter(e => !e.name.includes('/static/'))"
            ".map(e => [new URL(e.name).pathname, Math.round(e.duration)])")
    finally:
        context.close()
    return {"ms": ms, "marks": marks, "alerts_ms": alerts_ms, "figures": figures, "api_calls": api_calls}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to tell work from waiting on a busy machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store", type=Path, default=Path("/tmp/mailwarden-bench-dashboard"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--presets", default="86400,all", help="Range presets to time: seconds, or all.")
    args = parser.parse_args()
    if not Path(args.chromium).is_file():
        raise SystemExit(f"no Chromium at {args.chromium}")
    from playwright.sync_api import sync_playwright

    sample = build(args.store, args.events)
    store = Store.open(sample.url)
    try:
        events, (first, last) = store.count_events(), store.event_time_range()
        alerts = len(store.list_alerts(limit=100_000))
        key = make_demo_key(store)
    finally:
        store.close()
    port = free_port()
    server = serve(sample, port)
    results = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync"])
            try:
                # Chromium's own start (its first renderer, fonts) is not the dashboard's: a blank
                # page first, so the first timed run does not pay for it.
                warm = browser.new_context()
                warm.new_page().goto("about:blank")
                warm.close()
                names = {"86400": "last 24 hours (default)", "all": "everything stored"}
                for preset in args.presets.split(","):
                    name = names.get(preset, f"last {preset} s")
                    runs = []
                    for _ in range(args.runs):
                        # Past the aggregate cache's lifetime: every run reads the database afresh.
                        time.sleep(CACHE_TTL_SECONDS + 1)
                        load = os.getloadavg()[0]
                        cpu = cpu_seconds(server.pid)
                        run = first_load(browser, f"http://127.0.0.1:{port}", key, preset)
                        run.update(server_cpu_s=cpu_seconds(server.pid) - cpu, load=load)
                        runs.append(run)
                    drawn = [sum(1 for f in r["figures"] if f[1] == "ready" and f[2] > 0) for r in runs]
                    results[name] = {
                        "first_load_ms": [round(r["ms"]) for r in runs],
                        "median_ms": round(statistics.median(r["ms"] for r in runs)),
                        "alerts_shown_ms": [r["alerts_ms"] for r in runs],
                        "first_figure_ms": [r["marks"].get("first-figure") for r in runs],
                        "server_cpu_s": [round(r["server_cpu_s"], 2) for r in runs],
                        "load_average_1min": [round(r["load"], 1) for r in runs],
                        "figures_drawn_with_data": drawn,
                        "failures": sorted({f[3] for r in runs for f in r["figures"] if f[1] != "ready"}),
                        "slowest_api_calls": sorted(runs[-1]["api_calls"], key=lambda c: -c[1])[:3],
                    }
                    print(json.dumps({name: results[name]}))
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps({
        "events": events, "alerts": alerts, "range": f"{first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC",
        "store": "SQLite (WAL)", "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "goal_ms": 2000,
        "median_ms": {k: v["median_ms"] for k, v in results.items()},
    }))


if __name__ == "__main__":
    main()
