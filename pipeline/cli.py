"""The `mailwarden` command: ingest, detect, alerts, demo, generate and db, with one-line errors."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from pipeline.config import Settings, load_settings
from pipeline.parsers.base import MAX_YEAR, MIN_YEAR
from pipeline.schema import MailwardenError, Severity
from pipeline.store import Store, redact_url

app = typer.Typer(
    name="mailwarden",
    help="Detect abuse of a mail-sending service (API keys, SMTP AUTH) from its access logs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Store maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _mount_subcommands() -> None:
    # The API and notification packages own their commands; the CLI only mounts them.
    from api.cli import apikey_app, serve
    from pipeline.notify.cli import notify_app

    app.add_typer(apikey_app, name="apikey")
    app.add_typer(notify_app, name="notify")
    app.command("serve")(serve)
    from pipeline.report_cli import report

    app.command("report")(report)
    __import__("pipeline.detect_cli", fromlist=["mount"]).mount(app)  # evaluate, train, keys

# Piped output is not cut to 80 columns: alert titles are the point of the table.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

# Files bigger than this get a progress bar (small ones finish before a bar is worth drawing).
PROGRESS_MIN_BYTES = 8 << 20

DatabaseOption = Annotated[
    Optional[str], typer.Option("--database-url", help="Store URL (default: MAILWARDEN_DATABASE_URL or ./mailwarden.db).")
]


def _settings(database_url: str | None = None) -> Settings:
    overrides = {"database_url": database_url} if database_url else {}
    return load_settings(**overrides)


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MailwardenError(f"--{name}: {value!r} is not an ISO-8601 time (e.g. 2026-11-30T14:00:00Z)") from None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    # The years events can have (the parsers' bounds; MAX_YEAR itself too, as an end of a range);
    # near year 1 or 9999 the detectors' lookback arithmetic would overflow datetime.
    if not MIN_YEAR <= parsed.year <= MAX_YEAR:
        raise MailwardenError(f"--{name}: {value!r} is outside the years {MIN_YEAR} to {MAX_YEAR}")
    return parsed


@contextmanager
def _progress(enabled: bool) -> Iterator:
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def hook(path: str, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        if path not in tasks:
            tasks[path] = progress.add_task(Path(path).name, total=total)
        progress.update(tasks[path], completed=min(done, total))

    with progress:
        yield hook


def _print_ingest_summary(summary, store_url: str) -> None:
    table = Table(title=f"ingest into {redact_url(store_url)}", show_header=False, box=None)
    table.add_row("files", f"{summary.files:,}" + (f" ({summary.files_skipped} empty)" if summary.files_skipped else ""))
    table.add_row("formats", ", ".join(f"{k} x{v}" for k, v in sorted(summary.formats.items())) or "-")
    table.add_row("lines read", f"{summary.lines_read:,}")
    table.add_row("events stored", f"{summary.events_stored:,}")
    table.add_row("duplicates skipped", f"{summary.duplicates:,}")
    table.add_row("quarantined", f"{summary.quarantined:,}")
    for reason, count in summary.reasons.most_common(8):
        table.add_row("", f"{count:,} × {reason}")
    if summary.forgotten_events or summary.forgotten_quarantined:
        table.add_row("replaced (--reread)", f"{summary.forgotten_events:,} events and "
                      f"{summary.forgotten_quarantined:,} quarantined lines from the earlier read")
    table.add_row("speed", f"{summary.lines_per_second:,.0f} lines/s ({summary.seconds:.2f} s)")
    out.print(table)
    for path in summary.unchanged[:5]:
        err.print(f"{escape(path)}: already read to its end, nothing new (--reread reads it again from the start)", highlight=False)
    if len(summary.unchanged) > 5:
        err.print(f"… and {len(summary.unchanged) - 5} more files with nothing new")
    # A mail log's other lines (queue, delivery, connects) are quarantined as "not an authentication
    # event" by design: they parsed, and say nothing about the format chosen.
    from pipeline.parsers.smtp_auth import NOT_AUTH

    unparsed = summary.quarantined - summary.reasons.get(NOT_AUTH, 0)
    if summary.lines_read >= 10 and unparsed * 2 > summary.lines_read:
        err.print(
            f"[yellow]warning:[/] {unparsed:,} of {summary.lines_read:,} lines did not parse and were "
            "quarantined (reasons above): check --format (auto sniffs it), then run again with --reread."
        )


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files, globs, .gz files, or - for stdin.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="auto, combined, json or smtp-auth.")] = "auto",
    follow: Annotated[bool, typer.Option("--follow", help="Keep reading appended lines (through rotation).")] = False,
    reread: Annotated[bool, typer.Option(
        "--reread", help="Replace what earlier reads of these files stored (events, quarantined lines) and "
        "read them again from the start, e.g. after reading them with the wrong --format.")] = False,
    database_url: DatabaseOption = None,
) -> None:
    """Parse log files into the store, exactly once: re-running adds nothing, a killed run resumes."""
    from pipeline.jobs import follow_paths, ingest_paths

    if reread and (follow or "-" in paths):
        raise MailwardenError("--reread goes with files: standard input and --follow have no earlier read to replace")
    settings = _settings(database_url)
    store = Store.open(settings.database_url)
    try:
        if follow:
            if "-" in paths:
                raise MailwardenError("--follow reads files; stdin is already followed when piped")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            err.print(f"following {', '.join(paths)} (Ctrl-C to stop)")
            followed: list = []
            done = threading.Event()

            def watch() -> None:
                try:
                    followed.append(follow_paths(store, settings, paths, fmt, stop))
                finally:
                    done.set()

            threading.Thread(target=watch, daemon=True).start()
            interrupted = False
            # Waited for on an Event, not Thread.join: Ctrl-C inside join() marks the thread as
            # stopped while it still runs (CPython 3.11), so the summary was never waited for.
            try:
                while not done.wait(0.5):
                    pass
            except KeyboardInterrupt:
                interrupted = True
                stop.set()
                done.wait(30)
            if followed:  # what this run stored, as a one-shot ingest reports it
                _print_ingest_summary(followed[0], settings.database_url)
            if interrupted:
                raise typer.Exit(130)  # as a one-shot ingest: main() says what is kept
            return
        with _progress(sys.stderr.isatty()) as hook:
            summary = ingest_paths(store, settings, paths, fmt, progress=hook, reread=reread)
        _print_ingest_summary(summary, settings.database_url)
    finally:
        store.close()


@app.command()
def detect(
    since: Annotated[Optional[str], typer.Option(help="Start (ISO-8601); default: first stored event.")] = None,
    until: Annotated[Optional[str], typer.Option(help="End (ISO-8601); default: last stored event.")] = None,
    database_url: DatabaseOption = None,
) -> None:
    """Run the detectors over stored events; time is taken from the data, not the clock."""
    from pipeline.jobs import detect_range

    start, end = _parse_time(since, "since"), _parse_time(until, "until")
    if start is not None and end is not None and start >= end:
        raise MailwardenError(f"--since {since} is not before --until {until}")
    settings = _settings(database_url)
    from detectors.registry import build_detectors

    build_detectors(settings.detectors)  # a typo in [detectors] fails now, even with nothing stored yet
    store = Store.open(settings.database_url, read_url=settings.read_database_url, must_exist=True)
    try:
        stored = store.event_time_range()
        summary = detect_range(store, settings, start, end)
        _apply_silences(store)
    finally:
        store.close()
    if stored is None or summary.since is None or summary.until is None:
        out.print("no events stored yet: run `mailwarden ingest` first")
        return
    if summary.since > summary.until:
        # Clamped to the stored span, the range was empty: it lies wholly before or after it.
        first, last = stored
        out.print(f"no stored events in that range: the store holds {first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC")
        return
    per = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_detector.items())) or "none"
    out.print(
        f"detected over {summary.since:%Y-%m-%d %H:%M} .. {summary.until:%Y-%m-%d %H:%M} UTC "
        f"({summary.events:,} events, {summary.seconds:.2f} s): {summary.alerts_found} alerts "
        f"({summary.alerts_new} new, {summary.alerts_updated} updated) — {per}"
    )


def _alerts_table(rows: list[dict]) -> Table:
    table = Table(title=f"{len(rows)} alerts", expand=False)
    for col in ("severity", "detector", "window (UTC)", "title", "status", "id"):
        table.add_column(col, overflow="fold", no_wrap=col in ("severity", "detector", "id"))
    colour = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}
    for r in rows:
        sev = str(Severity(r["severity"]))
        table.add_row(
            f"[{colour.get(sev, '')}]{sev}[/]",
            r["detector"],
            f"{r['window_start']:%Y-%m-%d %H:%M} → {r['window_end']:%H:%M}",
            r["title"],
            r["status"],
            r["alert_id"],  # whole: the API and `alerts --json` take no shorter form
        )
    return table


# As the API's GET /alerts page (api.routers.alerts); beyond SQLite's integers it was an internal error.
ALERTS_MAX_LIMIT = 500


@app.command()
def alerts(
    status: Annotated[Optional[str], typer.Option(help="Only alerts with this status (open, acknowledged…).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=ALERTS_MAX_LIMIT, help="At most this many alerts.")] = 200,
    database_url: DatabaseOption = None,
) -> None:
    """List alerts, most severe first."""
    from pipeline.schema import AlertStatus

    if status is not None and status not in {s.value for s in AlertStatus}:
        # A typo would otherwise list nothing, as if there were no such alerts (the API says 422 too).
        raise MailwardenError(f"--status: unknown status {status!r} (one of: {', '.join(s.value for s in AlertStatus)})")
    settings = _settings(database_url)
    store = Store.open(settings.database_url, must_exist=True)
    try:
        rows = store.list_alerts(status=status, limit=limit)
    finally:
        store.close()
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
    else:
        out.print(_alerts_table(rows))


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the log files and labels.csv into.")],
    days: Annotated[int, typer.Option(help="Days of traffic.")] = 7,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same files.")] = 1,
    scale: Annotated[float, typer.Option(help="Multiplies the normal traffic volume.")] = 1.0,
    no_attacks: Annotated[bool, typer.Option("--no-attacks", help="Only normal traffic.")] = False,
) -> None:
    """Write realistic labelled traffic of a mail-sending service (API JSON, nginx, Postfix)."""
    from pipeline.generate import generate as run_generator

    try:
        summary = run_generator(out_dir, days=days, seed=seed, attacks=not no_attacks, scale=scale)
    except ValueError as exc:
        raise MailwardenError(str(exc)) from None
    for name, count in summary.files.items():
        out.print(f"{count:>10,} lines  {out_dir / name}")
    out.print(f"{summary.start:%Y-%m-%d %H:%M} .. {summary.end:%Y-%m-%d %H:%M} UTC, seed {summary.seed}")
    labels = ", ".join(f"{kind} {n}" for kind, n in summary.labels.items()) or "none"
    out.print(f"labels ({out_dir / 'labels.csv'}): {labels}")


@app.command()
def demo(
    database_url: DatabaseOption = None,
    data_dir: Annotated[Path, typer.Option(help="Where the demo logs are written.")] = Path(".mailwarden/demo"),
) -> None:
    """Generate two days of sample traffic with attacks, ingest it, detect, and print the alerts."""
    from pipeline.generate import generate as run_generator
    from pipeline.jobs import detect_range, ingest_paths

    settings = _settings(database_url)
    settings = settings.model_copy(update={"log_format": settings.log_format or "mailapi"})  # the generator's nginx format
    err.print(f"[bold]1/4[/] writing sample logs to {data_dir}/")
    run_generator(data_dir, days=2, seed=7, attacks=True, scale=0.1)
    store = Store.open(settings.database_url)
    try:
        err.print(f"[bold]2/4[/] ingesting into {redact_url(settings.database_url)}")
        files = sorted(str(p) for p in data_dir.iterdir() if p.suffix in (".log", ".jsonl") or p.name == "maillog")
        summary = ingest_paths(store, settings, files, "auto")
        _print_ingest_summary(summary, settings.database_url)
        from pipeline.jobs import read_revocation_file, revoke_keys

        revoked = data_dir / "revoked_keys.txt"  # the customer's revocations, as `keys revoke --file` loads them
        if revoked.exists():
            count = revoke_keys(store, read_revocation_file(revoked), settings.resolved_pepper(), "demo")
            err.print(f"      {count} revoked key(s) loaded from {revoked.name}")
        err.print("[bold]3/4[/] detecting")
        found = detect_range(store, settings)
        err.print(f"      {found.alerts_found} alerts over {found.events:,} events in {found.seconds:.2f} s")
        err.print("[bold]4/4[/] alerts")
        out.print(_alerts_table(store.list_alerts(limit=50)))
        from pipeline.demo_store import print_dashboard_hint

        print_dashboard_hint(store, database_url, err)
    finally:
        store.close()
    err.print(f"labels of the injected attacks: {data_dir / 'labels.csv'}")


def _apply_silences(store: Store) -> None:
    from api.queries import ApiQueries

    ApiQueries(store).apply_silences()


@app.command()
def run(
    host: Annotated[str, typer.Option(help="API address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="API port.")] = 8000,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="PEM certificate for HTTPS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="PEM private key for HTTPS.")] = None,
    database_url: DatabaseOption = None,
) -> None:
    """The service: follow the configured sources, detect and notify on schedule, serve the API."""
    from api.cli import check_listen, serve
    from pipeline.scheduler import Service

    check_listen(host, port)  # before the followers and jobs start, not only when serve() binds
    settings = _settings(database_url)
    store = Store.open(settings.database_url, read_url=settings.read_database_url)
    service = Service(settings, store, after_detect=_apply_silences)
    service.start()
    err.print(
        f"following {sum(len(s.paths) for s in settings.sources)} path(s); detect every "
        f"{settings.schedule.detect_seconds:g} s, {len(service.routes())} chat route(s)"
    )
    try:
        serve(host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, database_url=database_url)
    finally:
        service.stop()
        store.close()


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseOption = None) -> None:
    """Create or migrate the store's tables to the current schema."""
    from pipeline.migrations import current_revision

    settings = _settings(database_url)
    store = Store.open(settings.database_url)
    try:
        out.print(f"store {redact_url(settings.database_url)} at revision {current_revision(store.engine)}")
    finally:
        store.close()


@db_app.command("maintain")
def db_maintain(database_url: DatabaseOption = None) -> None:
    """Create the coming days' event partitions (PostgreSQL) and remove events past retention_days."""
    from pipeline.partitions import maintain

    settings = _settings(database_url)
    store = Store.open(settings.database_url)
    try:
        done = maintain(store.engine, datetime.now(timezone.utc), settings.partition_days_ahead, settings.retention_days)
    finally:
        store.close()
    out.print(
        f"{len(done.created)} partitions created ({done.moved_from_default:,} rows moved out of the default "
        f"partition), {len(done.dropped)} dropped, {done.deleted:,} old rows deleted"
    )


def main() -> None:
    """Entry point: every MailwardenError is one line on stderr and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="mailwarden: %(levelname)s: %(message)s")
    try:
        _mount_subcommands()
        # Without standalone mode typer hands back the code of an Exit (130 for Ctrl-C) instead of exiting.
        code = app(standalone_mode=False)
        if code == 130:
            _interrupted()
        if isinstance(code, int) and code:
            sys.exit(code)
    except MailwardenError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # one line, however long
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except OSError as exc:
        # A path that is missing, a directory, unwritable, or not what it should be: say which.
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        err.print(f"[red]error:[/] {escape(str(exc.strerror or type(exc).__name__) + where)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        _last_line_of_defence(exc)


def _interrupted() -> None:
    """Ctrl-C: what was committed stays (checkpoints move with their events), so a rerun resumes."""
    err.print("interrupted: everything committed so far is kept; run the same command again to resume", soft_wrap=True)
    sys.exit(130)


def _last_line_of_defence(exc: Exception) -> None:
    """Usage errors as click shows them, store errors and anything unexpected as one line.

    typer vendors its own copy of click, so its exceptions are recognised by what they can do
    (`show`, `exit_code`) and by name rather than by class.
    """
    kind = type(exc).__name__
    if kind == "Abort":  # click turns Ctrl-C into Abort
        _interrupted()
    if kind == "Exit":
        sys.exit(getattr(exc, "exit_code", 0))
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        # A usage error: one line, like every other error, and where to read the usage.
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err.print(f"[red]error:[/] {escape(exc.format_message())}{escape(where)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, SQLAlchemyError):
        first = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        err.print(f"[red]error:[/] the store cannot be used: {escape(first)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    err.print(f"[red]internal error:[/] {kind}: {escape(str(exc))}", highlight=False, soft_wrap=True)
    sys.exit(1)
