"""`mailwarden report`: the posture numbers (SQLite and PostgreSQL), the HTML on the demo store,
PNG export with Chromium, and one-line errors for bad input."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from api.frames import FrameReader
from dashboards.report import REPORT_FIGURES
from pipeline.cli import _mount_subcommands, app
from pipeline.parsers.base import conform
from pipeline.schema import Flag, event_ids
from pipeline.store import Store

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)
ENV = {"MAILWARDEN_PEPPER": "report-test-pepper"}


def _cli(args: list[str]):
    _mount_subcommands()
    return CliRunner().invoke(app, args, env=ENV)


def _posture_rows() -> list[dict]:
    """Three keys of two accounts, one of which rotated; secrets in URLs; plain HTTP; SMTP guessing."""
    rows = []
    for i in range(40):
        rows.append({"ts": T0 + timedelta(minutes=i), "source_ip": "81.2.69.160", "service": "api",
                     "scheme": "http" if i % 8 == 0 else "https", "outcome": "ok", "status": 202,
                     "api_key_id": "a" * 64, "account": "acct_solo", "path": "/v3/mail/send"})
    for i in range(10):
        key = "b" * 64 if i < 5 else "c" * 64  # acct_rotating moved to a new key half-way
        rows.append({"ts": T0 + timedelta(minutes=i, seconds=30), "source_ip": "8.8.8.8", "service": "api",
                     "scheme": "https", "outcome": "ok", "status": 202, "api_key_id": key,
                     "account": "acct_rotating", "path": "/v3/mail/send"})
    for i in range(3):
        rows.append({"ts": T0 + timedelta(minutes=50 + i), "source_ip": f"198.51.100.{i}", "service": "api",
                     "scheme": "https", "outcome": "ok", "status": 200, "account": "acct_leaky",
                     "path": "/v3/stats?api_key=REDACTED", "flags": Flag.SECRET_IN_URL.value})
    for i in range(12):
        rows.append({"ts": T0 + timedelta(minutes=i, seconds=45), "source_ip": "203.0.113.9", "service": "smtp",
                     "scheme": "smtp", "outcome": "auth_failed", "status": 535,
                     "account": "alice@example.com" if i < 9 else "bob@example.com"})
    return rows


def _store_with(url: str, rows: list[dict]) -> Store:
    store = Store.open(url)
    offsets = [100 * i for i in range(len(rows))]
    frame = conform(pl.DataFrame([{**r, "row": i} for i, r in enumerate(rows)], infer_schema_length=None))
    frame = frame.drop("row").with_columns(pl.Series("event_id", event_ids("f" * 32, offsets)),
                                           pl.Series("origin", [f"t.log:{o}" for o in offsets]))
    store.write_batch(frame, [], None)
    return store


def test_posture_numbers(database_url: str) -> None:
    rows = _posture_rows()
    store = _store_with(database_url, rows)
    try:
        posture = FrameReader(store).posture(T0, T0 + timedelta(hours=2))
    finally:
        store.close()
    web = [r for r in rows if r["service"] == "api"]
    http = sum(r["scheme"] == "http" for r in web)
    assert (posture["http_requests"], posture["https_requests"]) == (http, len(web) - http)
    assert posture["plain_http_share"] == pytest.approx(http / len(web))
    secret = posture["secret_in_url_keys"]
    assert secret[["account", "requests", "ips"]].values.tolist() == [["acct_leaky", 3, 3]]
    assert secret["api_key_id"].isna().all()  # the key was only in the URL, redacted
    assert posture["keys_seen"] == 3
    assert posture["unrotated_keys"]["api_key_id"].tolist() == ["a" * 64]
    failing = posture["failing_accounts"]
    assert failing[["account", "auth_failures"]].values.tolist() == [["alice@example.com", 9], ["bob@example.com", 3]]


@pytest.mark.slow
def test_report_on_the_demo_store(demo_store, tmp_path: Path) -> None:
    out = tmp_path / "out" / "report.html"
    result = _cli(["report", "--database-url", demo_store.url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text(encoding="utf-8")
    # Self-contained: plotly.js inlined, nothing loaded from elsewhere.
    assert "plotly.js v" in html[:5_000_000]
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?(https?:)?//""", html)
    figures = re.findall(r'data-figure="([a-z_]+)"', html)
    assert figures == REPORT_FIGURES

    store = Store.open(demo_store.url)
    try:
        first, last = store.event_time_range()
        events = store.load_events(first, last)
        alerts = FrameReader(store).alerts_frame(first, last)
    finally:
        store.close()
    web = events[events["service"].isin(["api", "web"])]
    http, https = int((web["scheme"] == "http").sum()), int((web["scheme"] == "https").sum())
    assert http > 0  # the generator injects plain-HTTP calls
    assert f"{http / (http + https):.2%} of API and web requests used plain HTTP ({http:,} of {http + https:,})" in html
    assert f'id="kpi-requests"><div class="value">{len(events):,}<' in html
    assert html.count("<tr><td><span class=\"sev sev-") == len(alerts) > 0
    failed = events[events["outcome"] == "auth_failed"]["account"].value_counts()
    top_account = failed.sort_index().sort_values(ascending=False, kind="stable").index[0]
    assert f"<td>{top_account}</td><td class=num>{int(failed.iloc[0]):,}</td>" in html


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "is not an ISO-8601 time"),
    (["--since", "2026-12-01T00:00:00Z", "--until", "2026-11-01T00:00:00Z"], "--since is after --until"),
    # Only --since, after the last stored event: said as such, not as "--since is after --until".
    (["--since", "2027-01-01T00:00:00Z"], "no stored events in that range: the store holds 2026-11-30 08:00"),
    (["--png", "PNG", "--chromium", "/nonexistent/chromium"], "--png needs a Chromium"),
])
def test_bad_input_is_one_line_error(args: list[str], message: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'small.db'}"
    _store_with(url, _posture_rows()).close()
    args = [str(tmp_path / "png") if a == "PNG" else a for a in args]
    done = subprocess.run([sys.executable, "-m", "pipeline", "report", "--database-url", url,
                           "--out", str(tmp_path / "r.html"), *args],
                          capture_output=True, text=True, env={**os.environ, **ENV}, timeout=120)
    assert done.returncode == 2
    # One message (the terminal may wrap it), never a traceback.
    assert message in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert done.stderr.count("error:") == 1 and done.stderr.startswith("error:")
    assert not (tmp_path / "r.html").exists()  # refused before any work


@pytest.mark.slow
def test_png_export_with_chromium(demo_store, chromium_binary: str, tmp_path: Path) -> None:
    png = tmp_path / "png"
    result = _cli(["report", "--database-url", demo_store.url, "--out", str(tmp_path / "r.html"),
                   "--png", str(png), "--chromium", chromium_binary])
    assert result.exit_code == 0, result.output
    written = sorted(p.stem for p in png.glob("*.png"))
    assert written == sorted(REPORT_FIGURES)
    for path in png.glob("*.png"):
        head = path.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width == 2400 and height >= 500  # 1200 px at scale 2
