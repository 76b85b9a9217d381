"""The jobs that wire stages together: ingest (sources -> parsers -> store) and detect (store -> alerts)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import polars as pl

from pipeline.config import Settings
from pipeline.parsers import PARSERS, ParseContext, Parser, _load_builtin
from pipeline.parsers.auto import sniff_format
from pipeline.parsers.base import empty_events
from pipeline.privacy import redact_texts
from pipeline.schema import Alert, ConfigError, event_id_expr, event_ids
from pipeline.sources import (
    LineBatch,
    expand_paths,
    follow_batches,
    identify,
    read_batches,
    read_prefix,
    read_stdin_batches,
)
from pipeline.store import Checkpoint, Store

STDIN = "-"
# How many lines `auto` looks at before choosing a format for a file.
SNIFF_LINES = 200
UNRECOGNISED = "unrecognised format: no parser recognises the first lines of this file"
# Bytes of a file's start remembered with its checkpoint, to recognise a rotated copy of it.
PROBE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SourceKey:
    """The identity events of one file are stored under, and the probe saved with its checkpoint."""

    key: str
    probe_len: int | None
    probe_hash: str | None


def resolve_source(store: Store, path: str, identity: Any) -> tuple[SourceKey, Checkpoint | None]:
    """Content identity, unless another file merely shares the first line (fail2ban's test files do).

    A file is known by the hash of its first line, so its renamed and compressed rotations resume
    where it stopped. When a checkpoint for that hash belongs to another inode, the first bytes
    decide: the same bytes make it a copy (resume), different bytes a stranger with the same first
    line (it gets a key of its own, so none of its events is mistaken for a duplicate).
    """
    cp = store.get_checkpoint(identity.key)
    key = identity.key
    if cp is not None and (cp.dev, cp.inode) != (identity.dev, identity.inode) and cp.probe_hash:
        if _sha(read_prefix(path, cp.probe_len or 0)) != cp.probe_hash:
            key = hashlib.sha256(f"{identity.key}:{identity.dev}:{identity.inode}".encode()).hexdigest()[:32]
            cp = store.get_checkpoint(key)
    if cp is not None and cp.probe_hash:
        return SourceKey(key, cp.probe_len, cp.probe_hash), cp
    head = read_prefix(path, PROBE_BYTES)
    return SourceKey(key, len(head), _sha(head)), cp


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class IngestSummary:
    files: int = 0
    files_skipped: int = 0
    lines_read: int = 0
    events_stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def lines_per_second(self) -> float:
        return self.lines_read / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: IngestSummary) -> None:
        for name in ("files", "files_skipped", "lines_read", "events_stored", "duplicates", "quarantined"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)
        self.formats.update(other.formats)


def parse_context(settings: Settings, reference_time: datetime | None = None) -> ParseContext:
    return ParseContext(
        pepper=settings.resolved_pepper(),
        trusted_proxies=tuple(settings.trusted_proxies),
        timezone=settings.timezone,
        reference_time=reference_time or datetime.now(timezone.utc),
        log_format=settings.log_format,
        json_mapping=settings.json_mapping,
    )


def make_parser(name: str, ctx: ParseContext) -> Parser:
    _load_builtin()
    if name not in PARSERS:
        known = ", ".join(sorted([*PARSERS, "auto"]))
        raise ConfigError(f"unknown format {name!r} (known: {known})")
    return PARSERS[name](ctx)


class BatchIngester:
    """Parses batches and writes them, overlapping the parse of batch n+1 with the write of batch n."""

    def __init__(self, store: Store, summary: IngestSummary):
        self.store = store
        self.summary = summary
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailwarden-writer")
        self._pending: Future | None = None

    def submit(self, batch: LineBatch, parser: Parser | None, parser_name: str, source: SourceKey | None) -> None:
        """Queue a batch; with a `source` its checkpoint commits in the same transaction."""
        frame, quarantined = prepare_batch(batch, parser, parser_name, source.key if source else batch.identity.key)
        cp = None
        if source is not None:
            ident = batch.identity
            cp = Checkpoint(
                source.key, batch.path, ident.dev, ident.inode, ident.first_line_hash, batch.end_offset,
                batch.next_line_no, source.probe_len, source.probe_hash,
            )
        self.wait()
        self.summary.lines_read += len(batch.lines)
        self.summary.reasons.update(q["reason"] for q in quarantined)
        self._pending = self._writer.submit(self.store.write_batch, frame, quarantined, cp)

    def wait(self) -> None:
        if self._pending is not None:
            result = self._pending.result()
            self._pending = None
            self.summary.events_stored += result.inserted
            self.summary.duplicates += result.duplicates
            self.summary.quarantined += result.quarantined

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)


def prepare_batch(
    batch: LineBatch, parser: Parser | None, parser_name: str, source_key: str | None = None
) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """Parse one batch into store-ready events and quarantine rows (every line ends in one)."""
    source_key = source_key or batch.identity.key
    if parser is None:
        rejected = [(i, UNRECOGNISED) for i in range(len(batch.lines))]
        frame = None
    else:
        try:
            parsed = parser.parse(batch.lines)
            frame, rejected = parsed.events, parsed.rejected
        except Exception as exc:  # a parser bug must not lose lines: they go to quarantine
            frame, rejected = None, [(i, f"parser error: {type(exc).__name__}: {exc}") for i in range(len(batch.lines))]
    if frame is not None and frame.height:
        offsets = pl.Series("offset", batch.offsets, dtype=pl.Int64)
        frame = frame.with_columns(offsets.gather(frame["row"]).alias("_offset")).with_columns(
            event_id_expr(source_key, pl.col("_offset")).alias("event_id"),
            (pl.lit(f"{batch.path}:") + pl.col("_offset").cast(pl.String)).alias("origin"),
        ).drop("_offset")
        # An event needs a time; a parser that gave none has in effect rejected the line.
        missing_ts = frame.filter(pl.col("ts").is_null())["row"].to_list()
        if missing_ts:
            rejected = [*rejected, *((r, "no timestamp") for r in missing_ts)]
            frame = frame.filter(pl.col("ts").is_not_null())
    else:
        frame = empty_events().with_columns(
            pl.lit(None, pl.String).alias("event_id"), pl.lit(None, pl.String).alias("origin")
        )
    raw_lines = redact_texts([batch.lines[r] for r, _ in rejected])
    ids = event_ids(source_key, [batch.offsets[r] for r, _ in rejected])
    quarantined = [
        {
            "quarantine_id": qid,
            "source": batch.path,
            "source_key": source_key,
            "line_no": batch.line_numbers[r],
            "byte_offset": batch.offsets[r],
            "parser": parser_name,
            "reason": reason,
            "raw": raw,
        }
        for (r, reason), raw, qid in zip(rejected, raw_lines, ids)
    ]
    return frame.drop("row"), quarantined


def _sample_lines(path: str) -> list[str]:
    sample: list[str] = []
    for batch in read_batches(path, batch_lines=SNIFF_LINES):
        sample.extend(batch.lines)
        break
    return sample[:SNIFF_LINES]


def _file_reference_time(path: str) -> datetime:
    # Syslog lines have no year: they are assumed to precede the file's last modification.
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime, tz=timezone.utc)
    except OSError:
        return datetime.now(timezone.utc)


def choose_parser(fmt: str, sample: list[str], settings: Settings, ref: datetime) -> tuple[Parser | None, str]:
    ctx = parse_context(settings, ref)
    if fmt != "auto":
        return make_parser(fmt, ctx), fmt
    name, _share = sniff_format(sample)
    if name is None:
        return None, "auto"
    return make_parser(name, ctx), name


ProgressHook = Callable[[str, int, int], None]  # (path, bytes done, bytes total)


def ingest_paths(
    store: Store,
    settings: Settings,
    patterns: list[str],
    fmt: str = "auto",
    progress: ProgressHook | None = None,
) -> IngestSummary:
    """Read each file from its checkpoint to its end, exactly once across restarts."""
    started = time.perf_counter()
    summary = IngestSummary()
    if fmt != "auto":
        make_parser(fmt, parse_context(settings))  # fail fast on an unknown format
    ingester = BatchIngester(store, summary)
    try:
        for pattern in patterns:
            if pattern == STDIN:
                _ingest_stdin(ingester, settings, fmt, summary)
                continue
            for path in expand_paths([pattern]):
                _ingest_file(ingester, store, settings, path, fmt, summary, progress)
    finally:
        ingester.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _ingest_file(
    ingester: BatchIngester,
    store: Store,
    settings: Settings,
    path: str,
    fmt: str,
    summary: IngestSummary,
    progress: ProgressHook | None,
) -> None:
    identity = identify(path)
    summary.files += 1
    if identity is None:
        summary.files_skipped += 1
        return
    ingester.wait()  # the previous file's checkpoint must be visible to tell the two apart
    source, cp = resolve_source(store, path, identity)
    start, line_no = (cp.byte_offset, cp.line_no) if cp else (0, 1)
    parser, name = choose_parser(fmt, _sample_lines(path), settings, _file_reference_time(path))
    summary.formats[name if parser else "unrecognised"] += 1
    total = _size_hint(path)
    for batch in read_batches(path, start_offset=start, start_line=line_no, batch_lines=settings.batch_lines):
        ingester.submit(batch, parser, name, source)
        if progress:
            progress(path, batch.end_offset, total)
    if progress:
        progress(path, total, total)


def _size_hint(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _ingest_stdin(ingester: BatchIngester, settings: Settings, fmt: str, summary: IngestSummary) -> None:
    summary.files += 1
    parser: Parser | None = None
    name = fmt
    for batch in read_stdin_batches(batch_lines=settings.batch_lines):
        if parser is None and name == fmt:
            parser, name = choose_parser(fmt, batch.lines[:SNIFF_LINES], settings, datetime.now(timezone.utc))
            summary.formats[name if parser else "unrecognised"] += 1
        # stdin cannot be re-read from an offset, so it keeps no checkpoint; ids still dedupe a replay.
        ingester.submit(batch, parser, name, None)


def follow_paths(
    store: Store,
    settings: Settings,
    paths: list[str],
    fmt: str,
    stop: threading.Event,
    on_batch: Callable[[IngestSummary], None] | None = None,
) -> IngestSummary:
    """Keep ingesting appended lines (through rotation) until `stop` is set."""
    summary = IngestSummary()
    started = time.perf_counter()
    parsers: dict[str, tuple[Parser | None, str]] = {}

    def run(path: str) -> None:
        sources: dict[str, SourceKey] = {}

        def checkpoint_of(identity: Any) -> tuple[int, int] | None:
            source, cp = resolve_source(store, path, identity)
            sources[identity.key] = source
            return (cp.byte_offset, cp.line_no) if cp else None

        ingester = BatchIngester(store, summary)
        try:
            for batch in follow_batches(path, checkpoint_of, stop, batch_lines=settings.batch_lines):
                key = batch.identity.key
                if key not in parsers:
                    parsers[key] = choose_parser(fmt, batch.lines[:SNIFF_LINES], settings, datetime.now(timezone.utc))
                parser, name = parsers[key]
                source = sources.get(key) or resolve_source(store, path, batch.identity)[0]
                ingester.submit(batch, parser, name, source)
                ingester.wait()
                if on_batch:
                    on_batch(summary)
        finally:
            ingester.close()

    threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary.seconds = time.perf_counter() - started
    return summary


# ---- detection -------------------------------------------------------------------------------


@dataclass
class DetectSummary:
    since: datetime | None
    until: datetime | None
    events: int = 0
    alerts_found: int = 0
    alerts_new: int = 0
    alerts_updated: int = 0
    by_detector: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def _steps(since: datetime, until: datetime, step: timedelta) -> Iterator[tuple[datetime, datetime]]:
    start = since
    while start < until:
        end = min(start + step, until)
        yield start, end
        start = end
    if since == until:
        yield since, until


def detect_range(
    store: Store,
    settings: Settings,
    since: datetime | None = None,
    until: datetime | None = None,
    step: timedelta = timedelta(days=1),
) -> DetectSummary:
    """Run every enabled detector over [since, until] (default: the stored range), in steps.

    Time comes from the data, never the clock, so replays give the alerts a live run would have.
    """
    from detectors.registry import build_detectors

    started = time.perf_counter()
    detectors = build_detectors(settings.detectors)
    stored = store.event_time_range()
    if stored is None:
        return DetectSummary(since, until)
    since = since or stored[0]
    until = until or stored[1]
    summary = DetectSummary(since, until)
    if not detectors or since > until:
        return summary
    max_lookback = max(d.lookback for d in detectors)
    found: dict[str, Alert] = {}
    for step_start, step_end in _steps(since, until, step):
        frame = store.load_events(step_start - max_lookback, step_end)
        in_step = frame["ts"].ge(step_start).sum()
        summary.events += int(in_step)
        if frame.empty:
            continue
        for detector in detectors:
            # Each detector sees the step plus its own lookback before it.
            window = frame[frame["ts"].ge(step_start - detector.lookback)].reset_index(drop=True)
            for alert in detector.detect(window, step_end):
                found[alert.alert_id] = alert
    summary.alerts_found = len(found)
    summary.by_detector.update(a.detector for a in found.values())
    summary.alerts_new, summary.alerts_updated = store.upsert_alerts(list(found.values()))
    summary.seconds = time.perf_counter() - started
    return summary


def detect_once(store: Store, settings: Settings, now: datetime | None = None) -> DetectSummary:
    """One scheduled detect tick: from the watermark to the newest stored event (or `now`).

    Data time, not the clock, bounds the run, so a lagging source or a restart after downtime
    catches up over everything it missed, and each detector still sees its lookback before it.
    """
    stored = store.event_time_range()
    if stored is None:
        return DetectSummary(None, None)
    until = stored[1] if now is None else min(now, stored[1])
    watermark = store.get_watermark("detect")
    since = watermark or max(stored[0], until - timedelta(hours=settings.schedule.initial_lookback_hours))
    if watermark is not None and since >= until:
        return DetectSummary(since, until)
    summary = detect_range(store, settings, since, until)
    store.set_watermark("detect", until)
    return summary


__all__ = [
    "detect_once",
    "IngestSummary",
    "DetectSummary",
    "ingest_paths",
    "follow_paths",
    "detect_range",
    "prepare_batch",
    "event_ids",
]
