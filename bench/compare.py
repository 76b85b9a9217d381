"""Benchmark mailwarden against goaccess, fail2ban and CrowdSec on the same logs: speed, memory, who gets flagged.

Usage (from the repository root, as root so missing peers can be installed from Debian):

    .venv/bin/python bench/compare.py [--lines 1000000] [--repeat 3] [--skip-crowdsec] [--keep] [--out bench/out]

Inputs: a combined log of --lines lines (background traffic from pipeline.samples plus two injected attackers,
see bench/workload.py) and a mailapi JSON log of --lines lines; or your own files with --combined/--json.
CrowdSec replays --slice-lines lines of the combined log around the attacks (it runs at hundreds of lines/s).

Each round runs every peer once, each followed by mailwarden on the same input; rounds repeat --repeat times
and medians are reported. Every tool is timed from outside as one process (start-up included) with its peak
RSS from wait4. mailwarden ingests durably: a fresh SQLite file or PostgreSQL database per run.
Writes OUT/compare.json and OUT/compare.png (bar chart of lines/s, needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from workload import (  # noqa: E402
    ATTACK_LINES,
    write_combined_with_attacks,
    write_mailapi_json,
    write_slice,
)

PEPPER = "mailwarden-compare-bench-pepper"
# What the issue asks mailwarden to show (mailwarden lines/s divided by the peer's).
TARGETS = [
    ("mailwarden → SQLite", "goaccess", "combined", 3.0),
    ("mailwarden → SQLite", "fail2ban-regex", "combined", 5.0),
    ("mailwarden → PostgreSQL", "goaccess", "combined", 4.0),
]
# "Flat in file size": peak RSS on the whole file at most this many times the peak on a tenth of it.
FLAT_RSS_RATIO = 1.3


def say(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Result:
    tool: str
    input: str
    lines: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    ok: bool = False
    error: str = ""
    extra: dict = field(default_factory=dict)
    # 1-minute load average when the run started: other work on the machine skews every figure.
    load: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds if self.ok and self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"tool": self.tool, "input": self.input, "lines": self.lines, "seconds": round(self.seconds, 3),
                "lines_per_s": round(self.lines_per_s, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "cpu_seconds": round(self.cpu_seconds, 2),
                "ok": self.ok, "error": self.error, "load_at_start": round(self.load, 2),
                **({"extra": self.extra} if self.extra else {})}


@dataclass
class Task:
    """One thing to time in every round; once it fails it is not retried (the reason is kept)."""

    tool: str
    input: str
    lines: int
    run: Callable[[int], Result]
    broken: str = ""
    results: list[Result] = field(default_factory=list)


class Postgres:
    """Creates a fresh database per run on the server of --pg and drops it afterwards."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def _connect(self):
        import psycopg

        return psycopg.connect(self.admin_url.replace("+psycopg", ""), autocommit=True, connect_timeout=5)

    def check(self) -> str:
        try:
            with self._connect() as conn:
                return str(conn.execute("SHOW server_version").fetchone()[0])
        except Exception as exc:  # noqa: BLE001 - any failure means: no PostgreSQL runs, say why
            raise RuntimeError(f"PostgreSQL at {self.admin_url.split('@')[-1]} unusable: {exc}") from None

    def create(self) -> str:
        name = f"mw_cmp_{uuid.uuid4().hex[:10]}"
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self._connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            try:
                self.drop(self.admin_url.rsplit("/", 1)[0] + "/" + name)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def mailwarden_env(work: Path, url: str) -> dict:
    env = dict(os.environ)
    env.update(
        MAILWARDEN_DATABASE_URL=url,
        MAILWARDEN_PEPPER=PEPPER,
        MAILWARDEN_DATA_DIR=str(work / "mailwarden-data"),
        # An empty configuration: no stray mailwarden.toml changes what is measured.
        MAILWARDEN_CONFIG=os.devnull,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def slug(*parts: str) -> str:
    """A file-name-safe run name: "mailwarden → SQLite", "combined slice 20,000", 2 -> mailwarden-sqlite-combined-slice-20000-2."""
    return re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower().replace(",", "")).strip("-")


def mailwarden(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def _count(label: str, text: str) -> int | None:
    found = re.search(rf"{label}\s+([0-9][0-9,]*)", text)
    return int(found.group(1).replace(",", "")) if found else None


def run_mailwarden_ingest(tool: str, label: str, log: Path, lines: int, fmt: str, work: Path, logs: Path,
                          url_for: Callable[[], tuple[str, Callable[[], None]]], keep_last: dict | None,
                          round_no: int) -> Result:
    result = Result(tool, label, lines)
    try:
        url, cleanup = url_for()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the peers still run
        result.error = f"cannot create the store: {exc}"
        return result
    keep = False
    try:
        name = slug(tool, label, str(round_no))
        m = peers.measure(mailwarden("ingest", "--format", fmt, str(log)), logs, name,
                          env=mailwarden_env(work, url), cwd=work, timeout=max(1800, lines / 200))
        result.seconds, result.peak_rss_mb, result.cpu_seconds = m.seconds, m.peak_rss_mb, m.cpu_seconds
        out = m.stdout.read_text(errors="replace")
        stored, quarantined = _count("events stored", out), _count("quarantined", out)
        result.extra = {"events_stored": stored, "quarantined": quarantined}
        if not m.ok:
            result.error = ("timed out" if m.timed_out else f"exit {m.returncode}") + f": {m.tail()}"
        elif stored is None:
            result.error = f"no 'events stored' in the ingest summary: {m.tail()}"
        else:
            result.ok = True
            if keep_last is not None:
                # The last good store of this input is kept for `detect`; older ones are dropped.
                if keep_last.get("cleanup"):
                    keep_last["cleanup"]()
                keep_last.update(url=url, cleanup=cleanup)
                keep = True
        return result
    finally:
        if not keep:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - a failed drop must not hide the measurement
                pass


def sqlite_store(work: Path) -> Callable[[], tuple[str, Callable[[], None]]]:
    def make() -> tuple[str, Callable[[], None]]:
        path = work / f"mw-{uuid.uuid4().hex[:10]}.db"

        def cleanup() -> None:
            for p in work.glob(path.name + "*"):
                p.unlink(missing_ok=True)

        return f"sqlite:///{path}", cleanup

    return make


def postgres_store(pg: Postgres) -> Callable[[], tuple[str, Callable[[], None]]]:
    def make() -> tuple[str, Callable[[], None]]:
        url = pg.create()
        return url, lambda: pg.drop(url)

    return make


def run_goaccess(label: str, log: Path, lines: int, logs: Path, extra_args: list[str], round_no: int) -> Result:
    result = Result(f"goaccess {peers.version_of('goaccess')}", label, lines)
    name = slug("goaccess", label, str(round_no))
    report = logs / f"{name}.json"
    cmd = peers.goaccess_cmd(log, report) if not extra_args else (
        ["goaccess", str(log), "--no-global-config", *extra_args, "-o", str(report)])
    cmd.append("--no-progress")
    m = peers.measure(cmd, logs, name, timeout=max(1800, lines / 500))
    result.seconds, result.peak_rss_mb, result.cpu_seconds = m.seconds, m.peak_rss_mb, m.cpu_seconds
    if not m.ok:
        result.error = f"exit {m.returncode}: {m.tail()}"
        return result
    valid, failed = peers.goaccess_requests(report)
    result.extra = {"valid_requests": valid, "failed_requests": failed, "command": " ".join(cmd)}
    result.ok = True
    report.unlink(missing_ok=True)
    return result


def run_fail2ban(label: str, log: Path, lines: int, logs: Path, filter_path: Path, round_no: int,
                 found: dict) -> Result:
    result = Result(f"fail2ban-regex {peers.version_of('fail2ban')}", label, lines)
    cmd = peers.fail2ban_cmd(log, filter_path)
    m = peers.measure(cmd, logs, f"fail2ban-{round_no}", timeout=max(3600, lines / 1000))
    result.seconds, result.peak_rss_mb, result.cpu_seconds = m.seconds, m.peak_rss_mb, m.cpu_seconds
    if not m.ok:
        result.error = f"exit {m.returncode}: {m.tail()}"
        return result
    matched, banned = peers.fail2ban_flagged(m.stdout)
    result.extra = {"matched_lines": matched, "banned_ips": len(banned), "command": " ".join(cmd)}
    found["flagged"] = banned
    m.stdout.unlink(missing_ok=True)
    result.ok = True
    return result


def run_crowdsec(label: str, log: Path, lines: int, logs: Path, work: Path, round_no: int, found: dict) -> Result:
    result = Result(f"CrowdSec {peers.version_of('crowdsec')}", label, lines)
    root = work / f"crowdsec-{round_no}"
    shutil.rmtree(root, ignore_errors=True)
    try:
        setup = peers.crowdsec_setup(root)
    except Exception as exc:  # noqa: BLE001 - CrowdSec's problem is reported, the rest goes on
        result.error = f"setup failed: {exc}"
        return result
    cmd = peers.crowdsec_cmd(setup, log)
    m = peers.measure(cmd, logs, f"crowdsec-{round_no}", timeout=max(900, lines / 50))
    result.seconds, result.peak_rss_mb, result.cpu_seconds = m.seconds, m.peak_rss_mb, m.cpu_seconds
    if not m.ok:
        result.error = ("timed out" if m.timed_out else f"exit {m.returncode}") + f": {m.tail()}"
        return result
    try:
        flagged, scenarios = peers.crowdsec_flagged(setup)
    except Exception as exc:  # noqa: BLE001
        result.error = f"cannot read CrowdSec's alerts: {exc}"
        return result
    found.update(flagged=flagged, scenarios=scenarios, notes=setup.notes, items=len(setup.items))
    result.extra = {"alerted_ips": len(flagged), "hub_items": len(setup.items), "notes": setup.notes,
                    "command": " ".join(cmd)}
    result.ok = True
    return result


# ------------------------------------------------------------------------------------------- detection


def mailwarden_flags(url: str, work: Path, logs: Path, name: str) -> dict:
    """Run detect then `alerts --json` on a kept store: the IPs (and other entities) mailwarden flags."""
    env = mailwarden_env(work, url)
    m = peers.measure(mailwarden("detect"), logs, f"detect-{name}", env=env, cwd=work, timeout=3600)
    info: dict = {"detect_seconds": round(m.seconds, 2), "detect_peak_rss_mb": round(m.peak_rss_mb, 1)}
    if not m.ok:
        info["error"] = f"detect: exit {m.returncode}: {m.tail()}"
        return info
    info["detect_summary"] = " ".join(m.stdout.read_text(errors="replace").split())[:400]
    done = subprocess.run(mailwarden("alerts", "--json", "--limit", "100000"), capture_output=True, text=True,
                          env=env, cwd=work, timeout=600)
    if done.returncode != 0:
        info["error"] = f"alerts --json: exit {done.returncode}: {done.stderr.strip()[-300:]}"
        return info
    try:
        rows = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        info["error"] = f"alerts --json is not JSON: {exc}"
        return info
    ips: dict[str, list[str]] = {}
    titles: dict[str, list[str]] = {}
    others: dict[str, int] = {}
    for row in rows:
        kind = str(row.get("entity_kind", ""))
        if kind == "ip":
            ips.setdefault(str(row["entity"]), []).append(str(row.get("detector")))
            titles.setdefault(str(row["entity"]), []).append(str(row.get("title", "")))
        else:
            others[kind] = others.get(kind, 0) + 1
    info.update(alerts=len(rows), flagged=set(ips), detectors={ip: sorted(set(d)) for ip, d in ips.items()},
                titles={ip: sorted(set(t))[:3] for ip, t in titles.items()}, other_entities=others)
    return info


# Longest explanation list printed per comparison (all of them go to compare.json).
EXPLAIN_MAX = 25


def ip_facts(log: Path, ips: set[str]) -> dict[str, dict]:
    """What the raw combined log says about each IP: lines, 401 answers and their densest 10 minutes,
    and the densest 5 minutes of requests. Read with polars, independently of mailwarden's parser."""
    import numpy as np
    import polars as pl

    if not ips:
        return {}
    frame = (
        pl.scan_csv(log, has_header=False, separator="\x01", quote_char=None, new_columns=["line"],
                    schema_overrides={"line": pl.String}, truncate_ragged_lines=True)
        .with_columns(pl.col("line").str.extract(r"^(\S+)").alias("ip"))
        .filter(pl.col("ip").is_in(sorted(ips)))
        .select(
            "ip",
            pl.col("line").str.extract(r"\[([^\]]+)\]").str.strptime(pl.Datetime("us", "UTC"), "%d/%b/%Y:%H:%M:%S %z",
                                                                      strict=False).dt.epoch("s").alias("t"),
            pl.col("line").str.extract(r'" (\d{3}) ').cast(pl.Int32, strict=False).alias("status"),
        )
        .collect()
    )

    def densest(times: np.ndarray, span: int) -> int:
        if times.size == 0:
            return 0
        times = np.sort(times)
        return int((np.searchsorted(times, times + span, side="left") - np.arange(times.size)).max())

    facts = {}
    for ip in ips:
        rows = frame.filter(pl.col("ip") == ip)
        t = rows["t"].drop_nulls().to_numpy()
        t401 = rows.filter(pl.col("status") == 401)["t"].drop_nulls().to_numpy()
        facts[ip] = {"lines": rows.height, "answered_401": int(t401.size), "peak_401_in_10min": densest(t401, 600),
                     "peak_requests_in_5min": densest(t, 300)}
    return facts


def mailwarden_thresholds() -> dict:
    """The default thresholds of the two detectors that overlap with the peers' rules."""
    from detectors.registry import build_detectors

    out = {}
    for d in build_detectors({}):
        if d.name in ("auth_bruteforce", "ip_burst"):
            out[d.name] = {"threshold": d.threshold, "window_s": int(d.window.total_seconds())}
    return out


def explain(cmp: dict, facts: dict[str, dict], peer_why: dict, mine: dict, limits: dict, peer_rule: str) -> list[dict]:
    """One sentence per IP flagged by only one side: the facts from the log and the rule that decided."""
    ab, burst = limits.get("auth_bruteforce", {}), limits.get("ip_burst", {})
    ours = (f"mailwarden's auth_bruteforce wants {ab.get('threshold')} failures in {ab.get('window_s', 0) // 60} min "
            f"and ip_burst {burst.get('threshold')} requests in {burst.get('window_s', 0) // 60} min")
    out = []
    for ip in cmp["only_peer_all"]:
        f = facts.get(ip, {})
        out.append({"ip": ip, "flagged_by": cmp["peer"], "why": (
            f"{cmp['peer']} ({', '.join(peer_why.get(ip, [])) or peer_rule}): {f.get('lines', '?')} lines, "
            f"{f.get('answered_401', '?')} answered 401 (at most {f.get('peak_401_in_10min', '?')} in 10 min), at most "
            f"{f.get('peak_requests_in_5min', '?')} requests in 5 min; below what {ours}")})
    for ip in cmp["only_mailwarden_all"]:
        f = facts.get(ip, {})
        out.append({"ip": ip, "flagged_by": "mailwarden", "why": (
            f"mailwarden ({', '.join(mine['detectors'].get(ip, []))}: {'; '.join(mine['titles'].get(ip, []))}): "
            f"{f.get('lines', '?')} lines, at most {f.get('peak_401_in_10min', '?')} 401s in 10 min and "
            f"{f.get('peak_requests_in_5min', '?')} requests in 5 min; {cmp['peer']}'s rules ({peer_rule}) do not "
            "look at this behaviour or stay under their own thresholds")})
    return out


def compare_sets(peer_name: str, peer: set[str], mine: set[str], attackers: list[dict],
                 peer_why: dict | None = None, mine_why: dict | None = None) -> dict:
    both = peer & mine
    out = {
        "peer": peer_name,
        "peer_flagged": len(peer),
        "mailwarden_flagged": len(mine),
        "both": len(both),
        "only_peer": sorted(peer - mine)[:20],
        "only_mailwarden": sorted(mine - peer)[:20],
        "only_peer_all": sorted(peer - mine),
        "only_mailwarden_all": sorted(mine - peer),
        "attackers": [
            {"ip": a["ip"], "kind": a["kind"], "peer": a["ip"] in peer, "mailwarden": a["ip"] in mine,
             "peer_why": (peer_why or {}).get(a["ip"], []), "mailwarden_why": (mine_why or {}).get(a["ip"], [])}
            for a in attackers
        ],
    }
    return out


def print_comparison(title: str, cmp: dict) -> None:
    say(f"  {title}")
    say(f"    {cmp['peer']}: {cmp['peer_flagged']} IPs; mailwarden: {cmp['mailwarden_flagged']} IPs; "
        f"both: {cmp['both']}")
    if cmp["only_peer"]:
        say(f"    only {cmp['peer']}: {', '.join(cmp['only_peer'][:10])}")
    if cmp["only_mailwarden"]:
        say(f"    only mailwarden: {', '.join(cmp['only_mailwarden'][:10])}")
    for a in cmp["attackers"]:
        mark = lambda hit, why: ("yes" + (f" ({', '.join(why)})" if why else "")) if hit else "no"  # noqa: E731
        say(f"    injected {a['kind']} {a['ip']}: {cmp['peer']} {mark(a['peer'], a['peer_why'])}; "
            f"mailwarden {mark(a['mailwarden'], a['mailwarden_why'])}")
    explained = cmp.get("explanations", [])
    if explained:
        say(f"    each difference ({len(explained)}):")
    for e in explained[:EXPLAIN_MAX]:
        say(f"      {e['ip']}: {e['why']}")
    if len(explained) > EXPLAIN_MAX:
        say(f"      ... {len(explained) - EXPLAIN_MAX} more in compare.json")


# ----------------------------------------------------------------------------------------------- output


def summarise(tasks: list[Task]) -> dict[tuple[str, str], dict]:
    summary = {}
    for t in tasks:
        good = [r for r in t.results if r.ok]
        summary[(t.tool, t.input)] = {
            # The results carry the version ("goaccess 1.7"); the task only the name.
            "tool": t.results[0].tool if t.results else t.tool, "input": t.input, "lines": t.lines, "runs": len(good),
            "lines_per_s": [round(r.lines_per_s, 1) for r in good],
            "median_lines_per_s": round(statistics.median([r.lines_per_s for r in good]), 1) if good else None,
            "median_peak_rss_mb": round(statistics.median([r.peak_rss_mb for r in good]), 1) if good else None,
            "median_cpu_seconds": round(statistics.median([r.cpu_seconds for r in good]), 2) if good else None,
            # Lines per CPU-second of the measured process: steadier than wall time on a shared machine,
            # but it leaves out work done elsewhere (the PostgreSQL server's share of an ingest).
            "median_lines_per_cpu_s": (
                round(statistics.median([r.lines / r.cpu_seconds for r in good if r.cpu_seconds > 0]), 1)
                if any(r.cpu_seconds > 0 for r in good) else None
            ),
            "error": t.broken or next((r.error for r in t.results if not r.ok), ""),
        }
    return summary


def peer_of(tool: str) -> str:
    """'goaccess 1.7' -> 'goaccess': TARGETS and ratios name peers without versions."""
    return tool.split()[0]


def write_chart(summary: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install matplotlib)"
    # The tenth-of-the-file run is there for the memory check, not as a speed figure.
    rows = [s for s in summary.values() if s["median_lines_per_s"] and not s["input"].startswith("combined tenth")]
    if not rows:
        return "no chart: no successful run"
    labels = [f"{s['tool']}\n{s['input']}" for s in rows]
    values = [s["median_lines_per_s"] for s in rows]
    colours = ["#1f77b4" if s["tool"].startswith("mailwarden") else "#999999" for s in rows]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.5))
    bars = ax.barh(range(len(rows)), values, color=colours)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    # Log scale: CrowdSec's hundreds and mailwarden's hundreds of thousands on one axis.
    ax.set_xscale("log")
    ax.set_xlabel("lines per second (median; log scale; higher is better)")
    ax.set_title("Ingest / analysis speed on the same logs (blue: mailwarden)")
    for bar, value in zip(bars, values):
        ax.text(bar.get_width() * 1.05, bar.get_y() + bar.get_height() / 2, f"{value:,.0f}", va="center",
                fontsize=8)
    ax.set_xlim(right=max(values) * 4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart: {path}"


def machine_info() -> dict:
    model = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": mem_gb, "os": platform.platform(), "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000, help="lines of each generated log (default 1,000,000)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported (default 3)")
    ap.add_argument("--slice-lines", type=int, default=20_000, help="lines CrowdSec replays (default 20,000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--combined", type=Path, help="use this combined log instead of generating one")
    ap.add_argument("--json", type=Path, help="use this mailapi JSON log instead of generating one")
    ap.add_argument("--skip-crowdsec", action="store_true", help="do not run CrowdSec (the slowest peer)")
    ap.add_argument("--skip-json", action="store_true", help="do not benchmark the JSON log")
    ap.add_argument("--no-postgres", action="store_true", help="do not ingest into PostgreSQL")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL admin URL; a fresh database is created next to it per run")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get; missing peers are skipped")
    ap.add_argument("--keep", action="store_true", help="keep the generated logs, stores and tool output in OUT/work")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="where compare.json/.png go")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.lines < 1 or args.slice_lines < 1:
        ap.error("--lines, --repeat and --slice-lines must be positive")
    return args


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.keep:
        work = out_dir / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="mailwarden-compare-"))
    logs = work / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    pg = None if args.no_postgres else Postgres(args.pg)
    # A plain `kill` must still drop the PostgreSQL databases and the temporary folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(args, out_dir, work, logs, pg)
    finally:
        if pg is not None:
            pg.drop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, out_dir: Path, work: Path, logs: Path, pg: Postgres | None) -> int:
    started = time.time()
    machine = machine_info()
    say(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, Python {machine['python']}")
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        say(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work will skew these figures")

    # ---- inputs
    t = time.perf_counter()
    attackers: list[dict] = []
    if args.combined:
        combined = args.combined.resolve()
        combined_lines = count_lines(combined)
        first_attack = 0
    else:
        combined = work / "combined.log"
        made = write_combined_with_attacks(combined, args.lines, seed=args.seed)
        combined_lines, attackers, first_attack = made.lines, made.attackers, made.first_attack_line
    slice_count = min(args.slice_lines, combined_lines)
    # The slice starts a little before the first attack so the attacks are inside it, with context.
    slice_start = max(0, min(first_attack - 1_000, combined_lines - slice_count)) if attackers else 0
    crowdsec_log = work / "combined-slice.log"
    slice_count = write_slice(combined, crowdsec_log, slice_start, slice_count)
    tenth = work / "combined-tenth.log"
    tenth_count = write_slice(combined, tenth, 0, max(1, combined_lines // 10))
    json_log = None
    json_lines = 0
    if not args.skip_json:
        if args.json:
            json_log = args.json.resolve()
            json_lines = count_lines(json_log)
        else:
            json_log = write_mailapi_json(work / "mailapi.jsonl", args.lines, seed=args.seed)
            json_lines = args.lines
    say(f"inputs ({time.perf_counter() - t:.0f} s to write): combined {combined_lines:,} lines "
        f"({combined.stat().st_size / 1e6:.0f} MB)" + (f" with {ATTACK_LINES:,} attack lines" if attackers else "")
        + f"; CrowdSec slice {slice_count:,} lines from line {slice_start:,}"
        + (f"; mailapi JSON {json_lines:,} lines ({json_log.stat().st_size / 1e6:.0f} MB)" if json_log else ""))

    # ---- peers
    wanted = ["goaccess", "fail2ban"] + ([] if args.skip_crowdsec else ["crowdsec"])
    if args.no_install:
        status = {p: "ok" if shutil.which(peers.APT_PACKAGES[p]) else "not installed (--no-install)" for p in wanted}
    else:
        status = peers.ensure_peers(wanted, log=say)
    if not Path(peers.TIME_BINARY).exists():
        say(f"{peers.TIME_BINARY} (Debian package `time`) is needed to measure peak memory: apt-get install -y time")
        return 2
    versions = {p: peers.version_of(p) for p in wanted if status[p] == "ok"}
    for p in wanted:
        say(f"peer {p}: {versions.get(p, '')} {'' if status[p] == 'ok' else status[p]}".rstrip())
    pg_version = None
    if pg is not None:
        try:
            pg_version = pg.check()
        except RuntimeError as exc:
            say(str(exc))
            pg = None

    # ---- tasks, in round order: each peer followed by mailwarden on the same input
    f2b_filter = peers.fail2ban_filter(work / "fail2ban")
    f2b_found: dict = {}
    cs_found: dict = {}
    keep_combined: dict = {}
    keep_slice: dict = {}
    label_c = f"combined {combined_lines:,}"
    label_j = f"mailapi-json {json_lines:,}"
    label_s = f"combined slice {slice_count:,}"
    label_t = f"combined tenth {tenth_count:,}"
    sqlite = sqlite_store(work)
    tasks: list[Task] = []

    def add(tool: str, label: str, lines: int, fn: Callable[[int], Result]) -> None:
        tasks.append(Task(tool, label, lines, fn))

    def mw(tool: str, label: str, log: Path, lines: int, fmt: str, store, keep: dict | None = None) -> None:
        add(tool, label, lines, lambda r: run_mailwarden_ingest(tool, label, log, lines, fmt, work, logs, store, keep, r))

    if status.get("goaccess") == "ok":
        add("goaccess", label_c, combined_lines, lambda r: run_goaccess(label_c, combined, combined_lines, logs, [], r))
    mw("mailwarden → SQLite", label_c, combined, combined_lines, "combined", sqlite, keep_combined)
    if status.get("fail2ban") == "ok":
        add("fail2ban-regex", label_c, combined_lines,
            lambda r: run_fail2ban(label_c, combined, combined_lines, logs, f2b_filter, r, f2b_found))
    if pg is not None:
        mw("mailwarden → PostgreSQL", label_c, combined, combined_lines, "combined", postgres_store(pg))
    if json_log is not None:
        if status.get("goaccess") == "ok":
            add("goaccess", label_j, json_lines,
                lambda r: run_goaccess(label_j, json_log, json_lines, logs, peers.goaccess_json_args(), r))
        mw("mailwarden → SQLite", label_j, json_log, json_lines, "json", sqlite)
        if pg is not None:
            mw("mailwarden → PostgreSQL", label_j, json_log, json_lines, "json", postgres_store(pg))
    if status.get("crowdsec") == "ok":
        add("CrowdSec", label_s, slice_count,
            lambda r: run_crowdsec(label_s, crowdsec_log, slice_count, logs, work, r, cs_found))
        mw("mailwarden → SQLite", label_s, crowdsec_log, slice_count, "combined", sqlite, keep_slice)
    # A tenth of the file, to see whether peak memory grows with file size.
    mw("mailwarden → SQLite", label_t, tenth, tenth_count, "combined", sqlite)

    for round_no in range(1, args.repeat + 1):
        say(f"\nround {round_no}/{args.repeat}")
        for task in tasks:
            if task.broken:
                continue
            r = task.run(round_no)
            task.results.append(r)
            if r.ok:
                stored = r.extra.get("events_stored")
                say(f"  {r.tool:<26} {task.input:<26} {r.lines_per_s:>11,.0f} lines/s  {r.seconds:7.2f} s  "
                    f"cpu {r.cpu_seconds:7.2f} s  peak {r.peak_rss_mb:6.0f} MB  load {r.load:4.1f}"
                    + (f"  stored {stored:,}" if stored is not None else ""))
            else:
                task.broken = r.error
                say(f"  {r.tool:<26} {task.input:<26} FAILED: {r.error}")

    # ---- medians and ratios
    summary = summarise(tasks)
    say("\nmedians")
    say(f"  {'tool':<26} {'input':<26} {'runs':>4} {'lines/s':>12} {'peak RSS MB':>12} {'lines/cpu-s':>12}")
    for s in summary.values():
        if s["median_lines_per_s"] is None:
            say(f"  {s['tool']:<26} {s['input']:<26} {0:>4}  failed: {s['error'][:150]}")
        else:
            say(f"  {s['tool']:<26} {s['input']:<26} {s['runs']:>4} {s['median_lines_per_s']:>12,.0f} "
                f"{s['median_peak_rss_mb']:>12,.0f} {s['median_lines_per_cpu_s'] or 0:>12,.0f}")
    named = {(peer_of(s["tool"]) if not s["tool"].startswith("mailwarden") else s["tool"], s["input"]): s
             for s in summary.values()}
    ratios = []
    for (peer_name, inp), ps in named.items():
        if peer_name.startswith("mailwarden") or not ps["median_lines_per_s"]:
            continue
        for (mine_name, minp), ms in named.items():
            if not mine_name.startswith("mailwarden") or minp != inp or not ms["median_lines_per_s"]:
                continue
            ratios.append({
                "mailwarden": mine_name, "peer": ps["tool"], "input": inp,
                "speed_ratio": round(ms["median_lines_per_s"] / ps["median_lines_per_s"], 2),
                "memory_ratio": round(ms["median_peak_rss_mb"] / ps["median_peak_rss_mb"], 2),
                "cpu_speed_ratio": (round(ms["median_lines_per_cpu_s"] / ps["median_lines_per_cpu_s"], 2)
                                    if ms["median_lines_per_cpu_s"] and ps["median_lines_per_cpu_s"] else None),
            })
    if ratios:
        say("\nmailwarden / peer (medians; speed > 1: mailwarden faster; memory > 1: mailwarden uses more;"
            " per CPU-s: lines per CPU-second of the process, a cross-check when the machine is busy)")
        for r in ratios:
            cpu = f"{r['cpu_speed_ratio']:.2f}x" if r["cpu_speed_ratio"] else "n/a"
            say(f"  {r['mailwarden']:<24} / {r['peer']:<20} on {r['input']:<24} speed {r['speed_ratio']:>7.2f}x  "
                f"memory {r['memory_ratio']:>6.2f}x  per CPU-s {cpu:>7}")

    # ---- the targets
    targets = []
    say("\ntargets")
    for mine_name, peer_name, input_kind, want in TARGETS:
        got = next((r["speed_ratio"] for r in ratios if r["mailwarden"] == mine_name
                    and peer_of(r["peer"]) == peer_name and r["input"] == label_c), None)
        verdict = "n/a" if got is None else ("PASS" if got >= want else "FAIL")
        targets.append({"what": f"{mine_name} >= {want}x {peer_name} on {input_kind}", "ratio": got,
                        "verdict": verdict})
        say(f"  {verdict:<4} {mine_name} >= {want:g}x {peer_name} lines/s on the combined log: "
            + ("no measurement" if got is None else f"{got:.2f}x"))
    full, part = named.get(("mailwarden → SQLite", label_c)), named.get(("mailwarden → SQLite", label_t))
    if full and part and full["median_peak_rss_mb"] and part["median_peak_rss_mb"]:
        growth = full["median_peak_rss_mb"] / part["median_peak_rss_mb"]
        verdict = "PASS" if growth <= FLAT_RSS_RATIO else "FAIL"
        say(f"  {verdict:<4} ingest peak RSS flat in file size: {part['median_peak_rss_mb']:.0f} MB on "
            f"{tenth_count:,} lines, {full['median_peak_rss_mb']:.0f} MB on {combined_lines:,} "
            f"({growth:.2f}x for 10x the lines; limit {FLAT_RSS_RATIO}x)")
        targets.append({"what": "ingest peak RSS flat in file size", "ratio": round(growth, 2), "verdict": verdict,
                        "small_mb": part["median_peak_rss_mb"], "full_mb": full["median_peak_rss_mb"]})
    else:
        say("  n/a  ingest peak RSS flat in file size: no measurement")
        targets.append({"what": "ingest peak RSS flat in file size", "ratio": None, "verdict": "n/a"})

    # ---- who flags what
    detection: dict = {}
    say("\nwho flags which IPs")
    if keep_combined.get("url"):
        mine = mailwarden_flags(keep_combined["url"], work, logs, "combined")
        detection["mailwarden_combined"] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in mine.items()}
        if "error" in mine:
            say(f"  mailwarden detect on the combined log failed: {mine['error']}")
        else:
            say(f"  mailwarden detect on {label_c}: {mine['detect_seconds']:.1f} s, peak {mine['detect_peak_rss_mb']:.0f} MB, "
                f"{mine['alerts']} alerts ({len(mine['flagged'])} IPs"
                + "".join(f", {n} {k}" for k, n in sorted(mine["other_entities"].items())) + ")")
            if "flagged" in f2b_found:
                cmp = compare_sets("fail2ban", f2b_found["flagged"], mine["flagged"], attackers,
                                   None, mine["detectors"])
                rule = f"a 401 answer, {peers.F2B_MAXRETRY} in {peers.F2B_FINDTIME // 60} min"
                facts = ip_facts(combined, set(cmp["only_peer_all"]) | set(cmp["only_mailwarden_all"]))
                cmp["explanations"] = explain(cmp, facts, {}, mine, mailwarden_thresholds(), rule)
                detection["fail2ban_vs_mailwarden"] = cmp
                print_comparison(f"fail2ban (401 filter; ban = {peers.F2B_MAXRETRY} matches in "
                                 f"{peers.F2B_FINDTIME // 60} min) vs mailwarden, {label_c}", cmp)
    else:
        say("  mailwarden: no successful SQLite ingest of the combined log to run detect on")
    if status.get("crowdsec") == "ok":
        unparsed = peers.crowdsec_unparseable_users(crowdsec_log)
        detection["crowdsec_unparseable_lines"] = unparsed
        slice_stored = [r.extra.get("events_stored") for t in tasks if t.input == label_s
                        and t.tool.startswith("mailwarden") for r in t.results if r.ok]
        say(f"  {label_s}: {unparsed:,} lines have a $remote_user with digits that CrowdSec's nginx parser "
            f"rejects; mailwarden stored " + (f"{slice_stored[-1]:,} events" if slice_stored else "nothing (failed)"))
        if cs_found.get("notes"):
            say(f"  CrowdSec setup notes: {'; '.join(cs_found['notes'])}")
        if keep_slice.get("url") and "flagged" in cs_found:
            mine = mailwarden_flags(keep_slice["url"], work, logs, "slice")
            detection["mailwarden_slice"] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in mine.items()}
            if "error" in mine:
                say(f"  mailwarden detect on the slice failed: {mine['error']}")
            else:
                cmp = compare_sets("CrowdSec", cs_found["flagged"], mine["flagged"], attackers,
                                   cs_found.get("scenarios"), mine["detectors"])
                facts = ip_facts(crowdsec_log, set(cmp["only_peer_all"]) | set(cmp["only_mailwarden_all"]))
                cmp["explanations"] = explain(cmp, facts, cs_found.get("scenarios", {}), mine, mailwarden_thresholds(),
                                              "the nginx collection's http scenarios")
                detection["crowdsec_vs_mailwarden"] = cmp
                print_comparison(f"CrowdSec (nginx collection, offline hub) vs mailwarden, {label_s}", cmp)
        elif "flagged" in cs_found:
            say(f"  CrowdSec flagged {len(cs_found['flagged'])} IPs: "
                + ", ".join(f"{ip} ({', '.join(s)})" for ip, s in sorted(cs_found["scenarios"].items())[:10]))

    # ---- files
    result = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "postgresql": pg_version,
        "peers": {p: {"status": status[p], "version": versions.get(p)} for p in wanted},
        "inputs": {"combined_lines": combined_lines, "combined_bytes": combined.stat().st_size,
                   "json_lines": json_lines, "slice_lines": slice_count, "slice_start": slice_start,
                   "tenth_lines": tenth_count, "attackers": attackers, "generated": not args.combined},
        "repeat": args.repeat,
        "runs": [r.as_dict() for t in tasks for r in t.results],
        "medians": list(summary.values()),
        "ratios": ratios,
        "targets": targets,
        "detection": detection,
        "fail2ban_filter": peers.F2B_FILTER,
        "seconds_total": round(time.time() - started, 1),
    }
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"\nresults: {out_dir / 'compare.json'}")
    say(write_chart(summary, out_dir / "compare.png"))
    if args.keep:
        say(f"kept inputs, stores and tool output in {work}")
    mailwarden_ok = any(t.tool.startswith("mailwarden") and any(r.ok for r in t.results) for t in tasks)
    return 0 if mailwarden_ok else 1


if __name__ == "__main__":
    sys.exit(main())
