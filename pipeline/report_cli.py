"""`mailwarden report`: one self-contained HTML file (figures, alerts, posture) and optional PNGs."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from pipeline.config import load_settings
from pipeline.schema import MailwardenError
from pipeline.store import Store, clip_range, redact_url

err = Console(stderr=True)

# Looked for in this order on PATH when neither --chromium nor MAILWARDEN_CHROMIUM names one.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Headless, and quiet: no update checks, sync or first-run pages that would reach the network.
CHROMIUM_FLAGS = (
    "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--hide-scrollbars", "--mute-audio",
)
PNG_WIDTH = 1200
PNG_TIMEOUT_SECONDS = 120


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MailwardenError(f"--{name}: {value!r} is not an ISO-8601 time (e.g. 2026-11-30T14:00:00Z)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium to export images with: the one named, else the first found on PATH."""
    if explicit:
        path = shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
        return path
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_args(chromium: str, user_dir: str) -> list[str]:
    args = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Chromium refuses to start as root with its sandbox; the page is our own local file.
        args.append("--no-sandbox")
    return args


_PNG_PAGE = """<!doctype html><html><head><meta charset="utf-8"><script src="plotly.min.js"></script></head>
<body><script>
var specs = JSON.parse(%(specs)s);
var names = Object.keys(specs);
Promise.all(names.map(function (name) {
  var fig = specs[name];
  var height = (fig.layout && fig.layout.height) || 500;
  return Plotly.toImage({data: fig.data, layout: fig.layout}, {format: "png", width: %(width)d, height: height, scale: 2})
    .then(function (url) {
      var pre = document.createElement("pre");
      pre.id = "png-" + name;
      pre.textContent = url;
      document.body.appendChild(pre);
    });
})).then(function () {
  var done = document.createElement("div"); done.id = "all-done"; document.body.appendChild(done);
});
</script></body></html>"""


def export_pngs(figures: dict[str, Any], out_dir: Path, chromium: str, plotly_js: str) -> list[Path]:
    """Each figure as out_dir/<name>.png, drawn by plotly.js in headless Chromium (one process)."""
    specs = {name: json.loads(fig.to_json()) for name, fig in figures.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mailwarden-png-") as tmp:
        page = Path(tmp) / "figures.html"
        (Path(tmp) / "plotly.min.js").write_text(plotly_js, encoding="utf-8")
        payload = json.dumps(json.dumps(specs)).replace("</", "<\\/")
        page.write_text(_PNG_PAGE % {"specs": payload, "width": PNG_WIDTH}, encoding="utf-8")
        args = [*chromium_args(chromium, str(Path(tmp) / "profile")), "--dump-dom",
                "--virtual-time-budget=60000", page.as_uri()]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=PNG_TIMEOUT_SECONDS, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MailwardenError(f"PNG export: running {chromium} failed: {exc}") from None
    dom = result.stdout
    if 'id="all-done"' not in dom:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise MailwardenError(f"PNG export: Chromium did not finish drawing the figures ({detail})")
    written = []
    for name in specs:
        match = re.search(rf'<pre id="png-{re.escape(name)}">data:image/png;base64,([A-Za-z0-9+/=]+)</pre>', dom)
        if match is None:
            raise MailwardenError(f"PNG export: no image came back for {name}")
        path = out_dir / f"{name}.png"
        path.write_bytes(base64.b64decode(match.group(1)))
        written.append(path)
    return written


def _version() -> str:
    try:
        return metadata.version("mailwarden")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def report(
    since: Annotated[Optional[str], typer.Option(help="Start (ISO-8601, UTC unless an offset is given); default: first stored event.")] = None,
    until: Annotated[Optional[str], typer.Option(help="End (ISO-8601); default: last stored event.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    png: Annotated[
        Optional[Path], typer.Option("--png", help="Also write each figure as a PNG into this folder (needs Chromium).")
    ] = None,
    chromium: Annotated[
        Optional[str],
        typer.Option("--chromium", envvar="MAILWARDEN_CHROMIUM", help="Chromium binary for --png (default: found on PATH)."),
    ] = None,
    database_url: Annotated[
        Optional[str], typer.Option("--database-url", help="Store URL (default: MAILWARDEN_DATABASE_URL or ./mailwarden.db).")
    ] = None,
) -> None:
    """Write a self-contained HTML report (figures, alerts, posture) that opens offline, anywhere."""
    from api.frames import LOADERS, FrameReader, Span
    from dashboards import static
    from dashboards.report import REPORT_FIGURES, ReportInput, build_figures, render_report

    settings = load_settings(**({"database_url": database_url} if database_url else {}))
    start, end = _time(since, "since"), _time(until, "until")
    browser = None
    if png is not None:
        browser = find_chromium(chromium)
        if browser is None:
            # Said before the work starts, so nobody waits for a report to learn this.
            raise MailwardenError(
                "--png needs a Chromium to draw the images and none was found "
                f"({'--chromium ' + chromium if chromium else 'looked for ' + ', '.join(CHROMIUM_NAMES)} on PATH); "
                "install one (Debian: apt-get install chromium) or leave out --png"
            )
    store = Store.open(settings.database_url, must_exist=True)
    try:
        stored = store.event_time_range()
        if stored is None and (start is None or end is None):
            raise MailwardenError("the store holds no events yet: run `mailwarden ingest` (or `mailwarden demo`) first")
        if start is not None and end is not None and start > end:
            raise MailwardenError("--since is after --until")
        if stored is not None:
            start, end = clip_range(start, end, stored)
            if start > end:
                raise MailwardenError(f"no stored events in that range: the store holds {stored[0]:%Y-%m-%d %H:%M} .. "
                                      f"{stored[1]:%Y-%m-%d %H:%M} UTC")
        reader = FrameReader(store)
        span = Span(start, end)
        inputs = {name: LOADERS[name](reader, span) for name in REPORT_FIGURES}
        data = ReportInput(
            since=start,
            until=end,
            generated_at=datetime.now(timezone.utc),
            store=redact_url(settings.database_url),
            figures=inputs,
            alerts=reader.alerts_frame(start, end),
            posture=reader.posture(start, end),
            plotly_js=static.dashboard_plotly_js(),
            stylesheet=static.template("dashboard.css"),
            template=static.template("report.html"),
            version=_version(),
        )
    finally:
        store.close()
    document = render_report(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    err.print(
        f"wrote {out} ({len(document.encode()) / 1e6:.1f} MB, self-contained): {len(inputs)} figures, "
        f"{len(data.alerts)} alerts, {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC"
    )
    if png is not None and browser is not None:
        written = export_pngs(build_figures(data), png, browser, data.plotly_js)
        err.print(f"wrote {len(written)} PNG images to {png}/ (drawn by {browser})")
    sys.stdout.flush()
