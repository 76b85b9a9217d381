"""`mailwarden evaluate`, `mailwarden train` and `mailwarden keys`: the detection commands beside `detect`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import Settings, load_settings
from pipeline.schema import MailwardenError
from pipeline.store import Store

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

keys_app = typer.Typer(help="The API-key revocation list the revoked_key detector checks.", no_args_is_help=True)

DatabaseOption = Annotated[
    Optional[str], typer.Option("--database-url", help="Store URL (default: MAILWARDEN_DATABASE_URL or ./mailwarden.db).")
]


def _settings(database_url: str | None) -> Settings:
    return load_settings(**({"database_url": database_url} if database_url else {}))


def _time(value: str | None, name: str):
    from pipeline.jobs import parse_time

    return None if value is None else parse_time(value, f"--{name}")


def evaluate(
    labels: Annotated[Path, typer.Option("--labels", help="labels.csv written by `mailwarden generate`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    slack_minutes: Annotated[float, typer.Option("--slack", min=0, help="Minutes an alert may miss a label by.")] = 30,
    detector: Annotated[
        Optional[list[str]], typer.Option("--detector", help="Only score alerts of these detectors (repeatable).")
    ] = None,
    database_url: DatabaseOption = None,
) -> None:
    """Score the stored alerts against generated labels: precision, recall, F1, time to detect."""
    from datetime import timedelta

    from pipeline.evaluate import alerts_frame, evaluate as score, load_labels

    settings = _settings(database_url)
    label_frame = load_labels(labels)
    store = Store.open(settings.database_url, must_exist=True)
    try:
        rows = store.list_alerts(limit=10_000_000)
        stored = store.event_time_range()
    finally:
        store.close()
    if detector:
        rows = [r for r in rows if r["detector"] in set(detector)]
    # False alerts per day over the stored traffic (the clean corpus has no attack labels to span).
    days = max((stored[1] - stored[0]).total_seconds() / 86_400, 1 / 24) if stored else None
    result = score(alerts_frame(rows), label_frame, settings.resolved_pepper(), days=days,
                   slack=timedelta(minutes=slack_minutes))
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    for table in evaluation_tables(result):
        out.print(table)


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def evaluation_tables(result: dict[str, Any]) -> list[Table]:
    """The metrics as rich tables: overall, per attack kind, per detector."""
    overall = result["overall"]
    head = Table(title="overall", show_header=False, box=None)
    for name in ("precision", "recall", "f1"):
        head.add_row(name, _num(overall[name]))
    head.add_row("alerts", f"{overall['alerts']:,} ({overall['true_alerts']:,} true, {overall['false_alerts']:,} false)")
    head.add_row("attacks found", f"{overall['detected']} of {overall['attacks']}")
    head.add_row("false alerts per day", f"{overall['false_alerts_per_day']:.2f} over {overall['days']:.2f} days")
    kinds = Table(title="by attack kind")
    for col in ("kind", "labels", "found", "precision", "recall", "f1", "detect min (median / max)", "detectors"):
        kinds.add_column(col, overflow="fold")
    for kind, row in result["by_kind"].items():
        kinds.add_row(
            kind, str(row["labels"]), str(row["detected"]), _num(row["precision"]), _num(row["recall"]),
            _num(row["f1"]),
            f"{_minutes(row['median_time_to_detect_seconds'])} / {_minutes(row['max_time_to_detect_seconds'])}",
            ", ".join(row["detectors"]) or "-",
        )
    dets = Table(title="by detector")
    for col in ("detector", "alerts", "false", "false/day", "precision", "recall", "kinds"):
        dets.add_column(col, overflow="fold")
    for name, row in result["by_detector"].items():
        dets.add_row(
            name, str(row["alerts"]), str(row["false_alerts"]), f"{row['false_alerts_per_day']:.2f}",
            _num(row["precision"]), _num(row["recall"]), ", ".join(row["kinds"]) or "-",
        )
    return [head, kinds, dets]


def train(
    since: Annotated[Optional[str], typer.Option(help="Baseline start (ISO-8601); default: --days before --until.")] = None,
    until: Annotated[Optional[str], typer.Option(help="Baseline end (ISO-8601); default: the newest stored event.")] = None,
    days: Annotated[float, typer.Option(min=0.1, help="Baseline length when --since is not given.")] = 14.0,
    database_url: DatabaseOption = None,
) -> None:
    """Fit the isolation-forest models on a baseline (leaving out windows already alerted) and store them."""
    from pipeline.jobs import train_once

    settings = _settings(database_url)
    store = Store.open(settings.database_url, must_exist=True)
    try:
        results = train_once(store, settings, _time(since, "since"), _time(until, "until"), days=days)
    finally:
        store.close()
    if not results:
        out.print("nothing to train: no events stored, or every model detector is disabled")
        return
    for r in results:
        if r.rows == 0:
            out.print(f"{r.name}: too little data to train (needs 50 complete windows); it stays quiet")
            continue
        out.print(
            f"{r.name}: trained on {r.rows:,} windows {r.trained_from} .. {r.trained_to}, "
            f"{r.excluded_alerts:,} alerted windows left out, threshold {r.threshold:.4f} ({r.seconds:.1f} s)"
        )


@keys_app.command("revoke")
def keys_revoke(
    keys: Annotated[
        Optional[list[str]], typer.Argument(help="Raw API keys or their fingerprints (as alerts show them).")
    ] = None,
    file: Annotated[
        Optional[Path], typer.Option("--file", help="A file of `KEY [TIME]` lines (# comments allowed).")
    ] = None,
    at: Annotated[
        Optional[str], typer.Option("--at", help="Revoked (or expired) since this time (ISO-8601); default: always.")
    ] = None,
    note: Annotated[Optional[str], typer.Option(help="Why, for the record.")] = None,
    database_url: DatabaseOption = None,
) -> None:
    """Put API keys on the revocation list. Raw keys are fingerprinted; only fingerprints are stored."""
    from pipeline.jobs import read_revocation_file, revoke_keys

    when = _time(at, "at")
    entries = [(key, when) for key in keys or []]
    if file is not None:
        entries += [(key, stamp or when) for key, stamp in read_revocation_file(file)]
    if not entries:
        if file is not None:
            raise MailwardenError(f"{file} holds no keys (one key per line, optionally followed by a time)")
        raise MailwardenError("name at least one key, or a file with --file")
    settings = _settings(database_url)
    store = Store.open(settings.database_url)
    try:
        count = revoke_keys(store, entries, settings.resolved_pepper(), note)
    finally:
        store.close()
    out.print(f"{count:,} key(s) on the revocation list")


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    database_url: DatabaseOption = None,
) -> None:
    """Show the revocation list (fingerprints and times)."""
    from pipeline.jobs import load_revoked

    settings = _settings(database_url)
    store = Store.open(settings.database_url, must_exist=True)
    try:
        revoked = load_revoked(store)
    finally:
        store.close()
    rows = [{"key_id": k, "revoked_at": v.isoformat() if v else None} for k, v in sorted(revoked.items())]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} revoked keys")
    table.add_column("key fingerprint")
    table.add_column("revoked since")
    for row in rows:
        table.add_row(row["key_id"], row["revoked_at"] or "always")
    out.print(table)


def mount(app: typer.Typer) -> None:
    """Add the detection commands to the `mailwarden` app."""
    app.command("evaluate")(evaluate)
    app.command("train")(train)
    app.add_typer(keys_app, name="keys")
