"""The frames the figures draw, read from the store: one loader per figure, shared by /plots,
the dashboard and `mailwarden report` (figures stay pure; the queries live here)."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import iptocc
import pandas as pd
import polars as pl
import sqlalchemy as sa

from api.queries import AlertQuery, ApiQueries, as_utc, network_text_prefix, parse_ip_filter
from dashboards.figures import subnets_frame
from pipeline.schema import Flag, Outcome
from pipeline.store import Store, events

log = logging.getLogger(__name__)

# Bucket widths to choose from; the narrowest giving at most MAX_BUCKETS bars is used.
BUCKETS = [60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400]
MAX_BUCKETS = 300
TOP = 20
# Alerts drawn as markers and on the timeline: enough for any screen, bounded for a noisy week.
MAX_ALERTS = 2000
# The score figure fits a forest on at most this much of the range (its end): a day of windows is
# what the model itself trains on, and a forest over a month of events would keep the page waiting.
MODEL_SPAN = timedelta(hours=24)


def _span_text(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:.0f} h" if hours >= 1 else f"{span.total_seconds() / 60:.0f} min"


def bucket_seconds(since: datetime, until: datetime) -> int:
    span = max((until - since).total_seconds(), 1.0)
    return next((b for b in BUCKETS if span / b <= MAX_BUCKETS), BUCKETS[-1])


@dataclass(frozen=True)
class Span:
    """What one figure is asked for: a UTC range, and the viewer's zone for hover texts."""

    since: datetime
    until: datetime
    tz: str | None = None

    @property
    def bucket(self) -> int:
        return bucket_seconds(self.since, self.until)


@dataclass(frozen=True)
class RangeAggregates:
    """One range read two ways; every overview figure's frame is derived from these."""

    traffic: pd.DataFrame  # bucket (of `grain` seconds), outcome, service, count
    ips: pd.DataFrame  # source_ip, requests, failures, auth_failures
    keys_accounts: pd.DataFrame  # api_key_id, account, requests, failures, auth_failures (either may be null)
    grain: int


def _grain(bucket: int) -> int:
    # Every bucket width up to an hour divides an hour, and every wider one is whole hours: one
    # scan at this grain serves both the chosen buckets and the hour-of-day heatmap.
    return bucket if bucket <= 3600 else 3600


def _rebucket(frame: pd.DataFrame, width: int, by: list[str]) -> pd.DataFrame:
    """Counts summed into buckets of `width` seconds (aligned to the epoch, like the SQL), by `by`."""
    if frame.empty:
        return pd.DataFrame({"bucket": pd.Series(dtype="datetime64[ns, UTC]"),
                             **{b: pd.Series(dtype="string") for b in by}, "count": pd.Series(dtype="int64")})
    # Whole seconds since the epoch whatever the column's resolution (pandas may pick s, ms or ns).
    seconds = (pd.to_datetime(frame["bucket"], utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    epoch = pd.to_datetime(seconds - seconds % width, unit="s", utc=True)
    out = (
        frame.assign(bucket=epoch.to_numpy())
        .groupby(["bucket", *by], as_index=False, sort=True)["count"]
        .sum()
    )
    return out.assign(bucket=pd.to_datetime(out["bucket"], utc=True), count=out["count"].astype("int64"))


def _sum_by(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    present = frame[frame[column].notna()]
    return present.groupby(column, as_index=False)[["requests", "failures", "auth_failures"]].sum()


def _top(frame: pd.DataFrame, column: str, top: int = TOP) -> pd.DataFrame:
    """The `top` values by requests (ties by value, as the SQL of /stats orders them)."""
    ordered = frame.sort_values(["requests", column], ascending=[False, True], kind="stable").head(top)
    return ordered.reset_index(drop=True).astype(
        {column: "string", "requests": "int64", "failures": "int64", "auth_failures": "int64"}
    )


class AggregateCache:
    """Results by key for `ttl` seconds after they are computed, each computed once even when many
    threads ask at once."""

    def __init__(self, ttl: float = 15.0, max_entries: int = 32, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self._clock = ttl, max_entries, clock
        self._lock = threading.Lock()
        # key -> [time the result was ready (None while computing), future]
        self._entries: dict[Any, list[Any]] = {}

    def _expired(self, entry: list[Any], now: float) -> bool:
        # An entry still computing never expires: on a slow, busy machine a computation longer than
        # the ttl would otherwise be started again by every later caller.
        return entry[0] is not None and now - entry[0] > self.ttl

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            now = self._clock()
            for stale in [k for k, e in self._entries.items() if self._expired(e, now)]:
                del self._entries[stale]
            entry = self._entries.get(key)
            owner = entry is None
            if owner:
                while len(self._entries) >= self.max_entries:
                    self._entries.pop(next(iter(self._entries)))
                entry = [None, Future()]
                self._entries[key] = entry
        future = entry[1]
        if owner:
            try:
                result = compute()
            except BaseException as exc:
                with self._lock:
                    # A failure is not cached: the next caller tries again.
                    if self._entries.get(key) is entry:
                        del self._entries[key]
                future.set_exception(exc)
            else:
                with self._lock:
                    entry[0] = self._clock()
                future.set_result(result)
        return future.result()


_CACHES: weakref.WeakKeyDictionary[Store, AggregateCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def _per_store(caches: weakref.WeakKeyDictionary, store: Store, make: Callable[[], Any]) -> Any:
    """One cache per store (so per app), without touching the app's state."""
    with _CACHES_LOCK:
        cache = caches.get(store)
        if cache is None:
            cache = caches[store] = make()
        return cache


def cache_for(store: Store) -> AggregateCache:
    return _per_store(_CACHES, store, AggregateCache)


class FrameReader:
    """Aggregates over the events and alerts tables, each shaped as one figure's input frame."""

    def __init__(self, store: Store, queries: ApiQueries | None = None):
        self.store = store
        self.queries = queries or ApiQueries(store)
        # Read-only aggregates: a replica serves them when read_database_url is set.
        self.engine = getattr(store, "read_engine", store.engine)

    # ---- building blocks -----------------------------------------------------------------------
    def stored_range(self) -> tuple[datetime, datetime] | None:
        """The first and last event times (Store.event_time_range: two reads of the `ts` index)."""
        return self.store.event_time_range()

    def _epoch(self) -> sa.ColumnElement:
        if self.store.dialect == "sqlite":
            # The store writes SQLite timestamps as UTC text; strftime('%s') reads that text.
            return sa.cast(sa.func.strftime("%s", events.c.ts), sa.BigInteger)
        return sa.cast(sa.func.floor(sa.extract("epoch", events.c.ts)), sa.BigInteger)

    def _range(self, since: datetime, until: datetime) -> list[sa.ColumnElement]:
        return [events.c.ts >= as_utc(since), events.c.ts <= as_utc(until)]

    def _bucketed(
        self, width: int, group: list[sa.ColumnElement], where: list[sa.ColumnElement], names: list[str]
    ) -> pd.DataFrame:
        epoch = self._epoch()
        bucket = (epoch - epoch % width).label("bucket")
        query = (
            sa.select(bucket, *group, sa.func.count().label("count"))
            .where(*where)
            .group_by(bucket, *group)
            .order_by(bucket, *group)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        frame = pd.DataFrame(rows, columns=["bucket", *names, "count"])
        return frame.assign(
            bucket=pd.to_datetime(frame["bucket"].astype("int64"), unit="s", utc=True),
            count=frame["count"].astype("int64"),
            **{n: frame[n].astype("string") for n in names},
        )

    def alerts_frame(self, since: datetime, until: datetime) -> pd.DataFrame:
        """Alerts whose window overlaps the range, oldest first."""
        rows, _ = self.queries.list_alerts(
            AlertQuery(since=since, until=until), sort="window_start", limit=MAX_ALERTS
        )
        columns = ["alert_id", "detector", "severity", "entity_kind", "entity", "window_start", "window_end",
                   "score", "title", "status", "mitre"]
        frame = pd.DataFrame([{c: r[c] for c in columns} for r in rows], columns=columns)
        for col in ("window_start", "window_end"):
            frame[col] = pd.to_datetime(frame[col], utc=True)
        return frame

    # ---- the shared aggregates -------------------------------------------------------------------
    def aggregates(self, span: Span) -> RangeAggregates:
        """The two scans every overview figure is derived from, computed once per range.

        Concurrent requests of one page load (nine figures) share one computation: the first
        computes, the others wait for it, and the result is kept for a few seconds.
        """
        grain = _grain(span.bucket)
        key = (as_utc(span.since), as_utc(span.until), grain)
        return cache_for(self.store).get(key, lambda: self._compute_aggregates(span.since, span.until, grain))

    def _compute_aggregates(self, since: datetime, until: datetime, grain: int) -> RangeAggregates:
        if self.store.dialect == "sqlite":
            counted = self._sqlite_counts(since, until, grain)
            if counted is not None:
                return _finish_counts(*counted, grain)
        # Two scans, one after the other. Measured on SQLite with a day of 180,000 events on two
        # cores: side by side on their own connections they took 1.4 s, in a row 0.6 s (each new
        # connection starts with an empty page cache, and the cores are busy with the page anyway).
        return _fold_entities(self.traffic(since, until, grain), self.per_entity(since, until), grain)

    def _sqlite_counts(self, since: datetime, until: datetime, grain: int) -> tuple[pl.DataFrame, pl.DataFrame] | None:
        """The overview's counts over [since, until], each whole clock hour inside the range taken
        from the hour cache while that hour's event count is unchanged.

        Counts are sums, so the range's counts are the sums of its pieces' counts: a ragged piece at
        each end read fresh, whole hours read once and kept. Reopening the dashboard, moving the
        range by a few minutes or the next refresh then reads only the hours that changed (the
        current one, a backfilled one) instead of the whole day (0.4 s of a first load's 0.8 s of
        server time with a day of 180,000 events).

        Rows are read as columns and counted in polars: SQLite's GROUP BY sorts every row of the
        range (with a million events the two SQL scans cost about 6 s of CPU, against about 2 s this
        way). The read goes through the engine's pooled stdlib connection on purpose: a second SQLite
        library in the same process (an ADBC driver carries its own) breaks SQLite's POSIX locks,
        and closing it deleted a live writer's WAL file, losing that process's later commits.
        """
        # Hour pieces pay off for the ranges people look at again and again (a day, a week, a month);
        # a range of years would be thousands of pieces: it is read in one go instead.
        hours = _whole_hours(since, until) if until - since <= MAX_CACHED_SPAN else []
        pieces: list[tuple[datetime, datetime, bool]] = []
        if not hours:
            pieces.append((since, until, True))
        else:
            if since < hours[0]:
                pieces.append((since, hours[0], False))
            tail_start = hours[-1] + HOUR
            pieces.append((tail_start, until, True))
        cache = hour_cache_for(self.store)
        traffic: list[pl.DataFrame] = []
        entities: list[pl.DataFrame] = []
        try:
            raw = self.engine.raw_connection()
            try:
                cursor = raw.cursor()
                for lo, hi, closed in pieces:
                    if lo > hi or (lo == hi and not closed):
                        continue
                    part = _partial_counts(_read_columns(cursor, lo, hi, closed), grain)
                    traffic.append(part[0])
                    entities.append(part[1])
                for hour in hours:
                    end = hour + HOUR
                    cursor.execute("SELECT count(*) FROM events WHERE ts >= ? AND ts < ?",
                                   (_ts_text(hour), _ts_text(end)))
                    n = int(cursor.fetchone()[0])
                    part = cache.get((hour, grain), n)
                    if part is None:
                        part = _partial_counts(_read_columns(cursor, hour, end, False), grain)
                        cache.put((hour, grain), n, part)
                    traffic.append(part[0])
                    entities.append(part[1])
                cursor.close()
            finally:
                raw.close()
        except Exception as exc:  # noqa: BLE001 - the SQL path answers the same, only slower
            log.warning("dashboard: columnar read failed, using SQL instead: %s", str(exc).splitlines()[:1])
            return None
        return _merge_counts(traffic, entities)

    def traffic(self, since: datetime, until: datetime, grain: int) -> pd.DataFrame:
        """Events per (bucket of `grain` seconds, outcome, service): bucket, outcome, service, count."""
        outcome = sa.func.coalesce(events.c.outcome, "unknown")
        service = sa.func.coalesce(events.c.service, "unknown")
        return self._bucketed(grain, [outcome, service], self._range(since, until), ["outcome", "service"])

    def _grouped(self, columns: list[sa.ColumnElement], where: list[sa.ColumnElement], names: list[str]) -> pd.DataFrame:
        failures = sa.func.sum(sa.case((events.c.outcome != Outcome.OK.value, 1), else_=0))
        auth_failures = sa.func.sum(sa.case((events.c.outcome == Outcome.AUTH_FAILED.value, 1), else_=0))
        query = (
            sa.select(*columns, sa.func.count(), failures, auth_failures)
            .where(*where)
            .group_by(*columns)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        frame = pd.DataFrame(rows, columns=[*names, "requests", "failures", "auth_failures"])
        return frame.astype({**{n: "string" for n in names}, "requests": "int64"}).assign(
            failures=frame["failures"].fillna(0).astype("int64"),
            auth_failures=frame["auth_failures"].fillna(0).astype("int64"),
        )

    def per_entity(self, since: datetime, until: datetime) -> pd.DataFrame:
        """Every (source_ip, api_key_id, account) in the range with requests, failures (outcome not
        ok) and auth_failures: one scan that both the address and the key/account figures fold."""
        return self._grouped([events.c.source_ip, events.c.api_key_id, events.c.account], self._range(since, until),
                             ["source_ip", "api_key_id", "account"])

    # ---- one method per figure -----------------------------------------------------------------
    def requests_over_time(self, span: Span) -> dict[str, Any]:
        traffic = self.aggregates(span).traffic
        frame = _rebucket(traffic, span.bucket, ["outcome"])
        return {"frame": frame, "alerts": self.alerts_frame(span.since, span.until), "tz": span.tz,
                "since": span.since, "until": span.until}

    def auth_failures_over_time(self, span: Span) -> dict[str, Any]:
        traffic = self.aggregates(span).traffic
        failed = traffic[traffic["outcome"] == Outcome.AUTH_FAILED.value]
        return {"frame": _rebucket(failed, span.bucket, ["service"]), "tz": span.tz, "since": span.since,
                "until": span.until}

    def failure_heatmap(self, span: Span) -> dict[str, Any]:
        traffic = self.aggregates(span).traffic
        failed = traffic[traffic["outcome"] == Outcome.AUTH_FAILED.value]
        return {"frame": _rebucket(failed, 3600, []), "since": span.since, "until": span.until}

    def top_ips(self, span: Span) -> dict[str, Any]:
        return {"frame": _top(self.aggregates(span).ips, "source_ip")}

    def top_keys(self, span: Span) -> dict[str, Any]:
        pairs = self.aggregates(span).keys_accounts
        return {"frame": _top(_sum_by(pairs, "api_key_id"), "api_key_id")}

    def top_accounts(self, span: Span) -> dict[str, Any]:
        pairs = self.aggregates(span).keys_accounts
        return {"frame": _top(_sum_by(pairs, "account"), "account")}

    def top_subnets(self, span: Span) -> dict[str, Any]:
        return {"frame": subnets_frame(self.aggregates(span).ips, top=TOP)}

    def countries_map(self, span: Span) -> dict[str, Any]:
        return {"frame": countries_frame(self.aggregates(span).ips)}

    def alert_timeline(self, span: Span) -> dict[str, Any]:
        return {"frame": self.alerts_frame(span.since, span.until), "tz": span.tz, "since": span.since,
                "until": span.until}

    def alert_activity(self, alert: dict[str, Any], tz: str | None = None) -> dict[str, Any]:
        """The alert's entity from well before its window to after it, with the range plotted."""
        start, end = as_utc(alert["window_start"]), as_utc(alert["window_end"])
        assert start is not None and end is not None
        length = max(end - start, timedelta(minutes=10))
        since = start - max(4 * length, timedelta(hours=2))
        until = end + max(length, timedelta(hours=1))
        width = bucket_seconds(since, until)
        frame = self.entity_activity(alert["entity_kind"], alert["entity"], since, until, width)
        return {"frame": frame, "alert": alert, "since": since, "bucket_seconds": width, "tz": tz}

    def entity_activity(
        self, kind: str, entity: str, since: datetime, until: datetime, width: int
    ) -> pd.DataFrame:
        """Requests per bucket and outcome of one entity (ip, subnet, api_key or account)."""
        outcome = sa.func.coalesce(events.c.outcome, "unknown")
        where = self._range(since, until)
        network = None
        if kind in ("ip", "subnet"):
            try:
                address, network = parse_ip_filter(entity)
            except ValueError:
                return _empty_activity()
            if network is None:
                where.append(events.c.source_ip == address)
            else:
                prefix = network_text_prefix(network)
                where.append(events.c.source_ip.startswith(prefix, autoescape=True) if prefix
                             else events.c.source_ip.isnot(None))
        elif kind == "api_key":
            where.append(events.c.api_key_id == entity)
        elif kind == "account":
            where.append(events.c.account == entity)
        else:
            return _empty_activity()
        if network is None:
            return self._bucketed(width, [outcome], where, ["outcome"])
        # The text prefix only narrows the scan; membership is checked exactly per address.
        frame = self._bucketed(width, [outcome, events.c.source_ip], where, ["outcome", "source_ip"])
        inside = [_in(ip, network) for ip in frame["source_ip"]]
        return (
            frame[inside].groupby(["bucket", "outcome"], as_index=False)["count"].sum()
            if any(inside) else _empty_activity()
        )

    # ---- the isolation forest's view of the range ---------------------------------------------
    def score_distribution(self, span: Span) -> dict[str, Any]:
        """iforest_ip's scores of every IP window in the last MODEL_SPAN of the range, with its
        threshold; windows of IPs an alert named at that time are drawn apart."""
        from dashboards.scores import flag_alerted, window_scores
        from detectors.models.iforest_ip import IforestIp

        detector = IforestIp()
        try:
            since = max(as_utc(span.since), as_utc(span.until) - MODEL_SPAN)
            # The windows' `history` features need the hours before the first scored window.
            start = since - detector.history
        except OverflowError:  # a range at the start of the calendar: nothing can be stored there
            since = start = as_utc(span.since)
        columns = ["event_id", "ts", "source_ip", "service", "method", "path", "outcome", "api_key_id", "account",
                   "user_agent", "bytes", "recipients"]
        frame = self.store.load_events(start, span.until, columns=columns)
        scored = window_scores(frame, as_utc(span.until), detector)
        scores = scored.frame[pd.to_datetime(scored.frame["window_start"], utc=True) >= since]
        alerts = self.alerts_frame(since, span.until)
        alerts = alerts[alerts["entity_kind"] == "ip"] if not alerts.empty else alerts
        labelled = scores.assign(label=flag_alerted(scores, alerts, int(detector.bucket.total_seconds())))
        return {"frame": labelled.reset_index(drop=True), "threshold": scored.threshold,
                "label_name": "IP named by an alert",
                "title": f"Isolation-forest scores of IP windows ({_span_text(as_utc(span.until) - since)} up to the range's end)"}

    # ---- the report's posture summary ----------------------------------------------------------
    def posture(self, since: datetime, until: datetime, top: int = 10) -> dict[str, Any]:
        """Plain-HTTP share, keys with secrets in URLs, keys not rotated, top failing accounts."""
        in_range = self._range(since, until)
        with self.engine.connect() as conn:
            # Grouped by the raw column (PostgreSQL will not match two coalesce() with separate
            # bound parameters as one expression); a missing scheme is named in Python.
            schemes: dict[str, int] = {}
            for scheme, count in conn.execute(
                sa.select(events.c.scheme, sa.func.count())
                .where(*in_range, events.c.service.in_(["api", "web"]))
                .group_by(events.c.scheme)
            ).all():
                schemes[scheme or "unknown"] = schemes.get(scheme or "unknown", 0) + int(count)
            # A key sent only in the URL is redacted there and never fingerprinted: such requests
            # are listed by account and addresses, with no key, rather than dropped.
            secret_rows = conn.execute(
                sa.select(events.c.api_key_id, events.c.account, sa.func.count(),
                          sa.func.count(sa.distinct(events.c.source_ip)), sa.func.min(events.c.ts),
                          sa.func.max(events.c.ts))
                .where(*in_range, events.c.flags.contains(Flag.SECRET_IN_URL.value))
                .group_by(events.c.api_key_id, events.c.account)
                .order_by(sa.func.count().desc(), events.c.api_key_id, events.c.account)
            ).all()
            key_rows = conn.execute(
                sa.select(events.c.api_key_id, events.c.account, sa.func.count(), sa.func.min(events.c.ts),
                          sa.func.max(events.c.ts))
                .where(*in_range, events.c.api_key_id.isnot(None))
                .group_by(events.c.api_key_id, events.c.account)
            ).all()
        http, https = int(schemes.get("http", 0)), int(schemes.get("https", 0))
        keys = pd.DataFrame(key_rows, columns=["api_key_id", "account", "requests", "first_seen", "last_seen"])
        return {
            "http_requests": http,
            "https_requests": https,
            "unknown_scheme_requests": int(sum(n for s, n in schemes.items() if s not in ("http", "https"))),
            "plain_http_share": http / (http + https) if http + https else None,
            "secret_in_url_keys": pd.DataFrame(
                secret_rows, columns=["api_key_id", "account", "requests", "ips", "first_seen", "last_seen"]
            ).assign(first_seen=lambda f: pd.to_datetime(f["first_seen"], utc=True, format="mixed"),
                     last_seen=lambda f: pd.to_datetime(f["last_seen"], utc=True, format="mixed")),
            "unrotated_keys": unrotated_keys(keys),
            "keys_seen": int(keys["api_key_id"].nunique()),
            "failing_accounts": self.failing_accounts(since, until, top),
        }

    def failing_accounts(self, since: datetime, until: datetime, top: int = 10) -> pd.DataFrame:
        """Accounts with the most failed authentications: account, auth_failures, requests, ips."""
        auth_failures = sa.func.sum(sa.case((events.c.outcome == Outcome.AUTH_FAILED.value, 1), else_=0))
        query = (
            sa.select(events.c.account, auth_failures.label("auth_failures"), sa.func.count().label("requests"),
                      sa.func.count(sa.distinct(events.c.source_ip)).label("ips"))
            .where(events.c.account.isnot(None), *self._range(since, until))
            .group_by(events.c.account)
            .having(auth_failures > 0)
            .order_by(auth_failures.desc(), events.c.account)
            .limit(top)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        frame = pd.DataFrame(rows, columns=["account", "auth_failures", "requests", "ips"])
        return frame.astype({"account": "string", "auth_failures": "int64", "requests": "int64", "ips": "int64"})


_SCANNED = ("ts", "outcome", "service", "source_ip", "api_key_id", "account")


HOUR = timedelta(hours=1)
MAX_CACHED_SPAN = timedelta(days=31)
_TS_TEXT = "%Y-%m-%d %H:%M:%S.%f"


def _ts_text(value: datetime) -> str:
    # How the store writes SQLite timestamps (UTC text), so text comparison is time comparison.
    return as_utc(value).strftime(_TS_TEXT)


def _whole_hours(since: datetime, until: datetime) -> list[datetime]:
    """The starts of the clock hours lying wholly inside [since, until], oldest first."""
    first = as_utc(since).replace(minute=0, second=0, microsecond=0)
    if first < as_utc(since):
        first += HOUR
    out = []
    while first + HOUR <= as_utc(until):
        out.append(first)
        first += HOUR
    return out


def _read_columns(cursor: Any, since: datetime, until: datetime, closed: bool) -> pl.DataFrame:
    """The scanned columns of the events in [since, until] (or [since, until) when not `closed`),
    missing values as '' (the SQL path counts a missing value as '' too, through its coalesce)."""
    columns = ", ".join(_SCANNED[1:])
    upper = "<=" if closed else "<"
    cursor.execute(
        f"SELECT substr(ts, 1, 19) AS ts, {columns} FROM events WHERE ts >= ? AND ts {upper} ?",
        (_ts_text(since), _ts_text(until)),
    )
    rows = cursor.fetchall()
    schema = {c: pl.String for c in _SCANNED}
    if not rows:
        return pl.DataFrame(schema=schema)
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.with_columns(pl.col(c).fill_null("") for c in _SCANNED[1:])


class HourCache:
    """Counted pieces of whole clock hours, each kept with the hour's event count when counted.

    A piece is served only while the hour still holds that many events: events are only ever
    added (a late or backfilled line) or dropped with whole days (retention), and either changes
    the count. Bounded by memory: the least recently stored pieces go first.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: dict[Any, tuple[int, Any, int]] = {}
        self._bytes = 0

    def get(self, key: Any, count: int) -> Any:
        with self._lock:
            entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0] == count else None

    def put(self, key: Any, count: int, value: tuple[pl.DataFrame, ...]) -> None:
        size = sum(int(frame.estimated_size()) for frame in value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            while self._entries and self._bytes + size > self.max_bytes:
                self._bytes -= self._entries.pop(next(iter(self._entries)))[2]
            self._entries[key] = (count, value, size)
            self._bytes += size


_HOUR_CACHES: weakref.WeakKeyDictionary[Store, HourCache] = weakref.WeakKeyDictionary()


def hour_cache_for(store: Store) -> HourCache:
    return _per_store(_HOUR_CACHES, store, HourCache)


def warm_overview(store: Store, span: timedelta = timedelta(hours=24)) -> None:
    """Count the dashboard's default range (the last 24 hours of stored data) into the hour
    cache and draw its figures once, so the first page load after a start reads only the hours
    that change and finds plotly's figure code already loaded."""
    from dashboards.figures import FIGURES, OVERVIEW

    started = time.perf_counter()
    try:
        reader = FrameReader(store)
        stored = reader.stored_range()
        if stored is None:
            return
        range_ = Span(max(stored[0], stored[1] - span), stored[1])
        reader.aggregates(range_)
        for name in OVERVIEW:
            FIGURES[name](**LOADERS[name](reader, range_)).to_json()
    except Exception as exc:  # noqa: BLE001 - warming is an optimisation; a page load reads what it needs
        log.info("dashboard warm-up skipped: %s", str(exc).splitlines()[:1])
        return
    log.info("dashboard warm-up: %.1f s", time.perf_counter() - started)


def _partial_counts(frame: pl.DataFrame, grain: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Counts of one piece of a range: (bucket, outcome, service, count) and (source_ip, api_key_id,
    account, requests, failures, auth_failures), missing values still ''."""
    seconds = pl.col("ts").str.to_datetime("%Y-%m-%d %H:%M:%S", time_unit="us", time_zone="UTC").dt.epoch("s")
    traffic = (
        frame.with_columns(bucket=seconds - seconds % grain)
        .group_by(["bucket", "outcome", "service"])
        .agg(count=pl.len())
    )
    outcome = pl.col("outcome")
    entities = frame.group_by(["source_ip", "api_key_id", "account"]).agg(
        requests=pl.len(),
        # A missing outcome is not a failure, as `outcome != 'ok'` is not true for NULL in SQL.
        failures=((outcome != "ok") & (outcome != "")).sum(),
        auth_failures=(outcome == Outcome.AUTH_FAILED.value).sum(),
    )
    return traffic, entities


def _merge_counts(traffic: list[pl.DataFrame], entities: list[pl.DataFrame]) -> tuple[pl.DataFrame, pl.DataFrame]:
    counts = ["requests", "failures", "auth_failures"]
    t = pl.concat(traffic, how="vertical_relaxed").group_by(["bucket", "outcome", "service"]).agg(pl.col("count").sum())
    e = pl.concat(entities, how="vertical_relaxed").group_by(["source_ip", "api_key_id", "account"]).agg(
        pl.col(c).sum() for c in counts
    )
    return t, e


def _finish_counts(traffic_pl: pl.DataFrame, entities_pl: pl.DataFrame, grain: int) -> RangeAggregates:
    """The counted pieces shaped as the SQL path shapes its answer."""
    blank = pl.lit(None, dtype=pl.String)
    traffic = (
        traffic_pl.with_columns(
            # As coalesce(outcome, 'unknown') in the SQL path.
            outcome=pl.when(pl.col("outcome") == "").then(pl.lit("unknown")).otherwise(pl.col("outcome")),
            service=pl.when(pl.col("service") == "").then(pl.lit("unknown")).otherwise(pl.col("service")),
        )
        .group_by(["bucket", "outcome", "service"])
        .agg(pl.col("count").sum())
        .sort(["bucket", "outcome", "service"])
        .to_pandas()
    )
    traffic = traffic.assign(
        bucket=pd.to_datetime(traffic["bucket"].astype("int64"), unit="s", utc=True),
        outcome=traffic["outcome"].astype("string"), service=traffic["service"].astype("string"),
        count=traffic["count"].astype("int64"),
    )
    entities = (
        entities_pl.with_columns(pl.when(pl.col(c) == "").then(blank).otherwise(pl.col(c)).alias(c)
                                 for c in ("source_ip", "api_key_id", "account"))
        .to_pandas()
    )
    entities = entities.astype({"source_ip": "string", "api_key_id": "string", "account": "string",
                                "requests": "int64", "failures": "int64", "auth_failures": "int64"})
    return _fold_entities(traffic, entities, grain)


def _fold_entities(traffic: pd.DataFrame, entities: pd.DataFrame, grain: int) -> RangeAggregates:
    ips = _sum_by(entities, "source_ip")
    pairs = entities[entities["api_key_id"].notna() | entities["account"].notna()]
    keys = (pairs.groupby(["api_key_id", "account"], as_index=False, dropna=False)
            [["requests", "failures", "auth_failures"]].sum())
    return RangeAggregates(traffic, ips, keys, grain)


def unrotated_keys(keys: pd.DataFrame) -> pd.DataFrame:
    """Keys whose account used no other key in the period: nothing replaced them.

    `keys` has one row per (api_key_id, account) with requests, first_seen, last_seen. A key
    without an account counts as its own account. Most used first.
    """
    columns = ["api_key_id", "account", "requests", "first_seen", "last_seen"]
    if keys.empty:
        return pd.DataFrame(columns=columns)
    frame = keys.assign(
        account=keys["account"].where(keys["account"].notna(), "key:" + keys["api_key_id"].astype(str)),
        first_seen=pd.to_datetime(keys["first_seen"], utc=True, format="mixed"),
        last_seen=pd.to_datetime(keys["last_seen"], utc=True, format="mixed"),
    )
    per_key = frame.groupby("api_key_id").agg(
        account=("account", "first"), accounts=("account", "nunique"), requests=("requests", "sum"),
        first_seen=("first_seen", "min"), last_seen=("last_seen", "max"),
    )
    keys_per_account = frame.groupby("account")["api_key_id"].nunique()
    single = per_key[(per_key["accounts"] == 1) & per_key["account"].map(keys_per_account).eq(1)]
    out = single.reset_index()[columns].sort_values(["requests", "api_key_id"], ascending=[False, True])
    return out.assign(account=out["account"].where(~out["account"].astype(str).str.startswith("key:"), None))


def countries_frame(per_ip: pd.DataFrame) -> pd.DataFrame:
    """Per-address counts folded into countries (offline lookup, iptocc): country, requests, failures."""
    if per_ip.empty:
        return pd.DataFrame({"country": pd.Series(dtype="string"), "requests": pd.Series(dtype="int64"),
                             "failures": pd.Series(dtype="int64")})
    codes = iptocc.country_code([str(ip) for ip in per_ip["source_ip"]])
    located = per_ip.assign(country=pd.Series(codes, index=per_ip.index, dtype="string")).dropna(subset=["country"])
    return (
        located.groupby("country", as_index=False)[["requests", "failures"]].sum()
        .sort_values(["requests", "country"], ascending=[False, True])
        .reset_index(drop=True)
    )


def _in(address: Any, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(str(address)) in network
    except ValueError:
        return False


def _empty_activity() -> pd.DataFrame:
    return pd.DataFrame({"bucket": pd.Series(dtype="datetime64[ns, UTC]"), "outcome": pd.Series(dtype="string"),
                         "count": pd.Series(dtype="int64")})


Loader = Callable[[FrameReader, Span], dict[str, Any]]

# Keyword arguments of FIGURES[name] for a range; a figure without a loader here is not served by
# range (alert_activity takes an alert).
LOADERS: dict[str, Loader] = {
    "requests_over_time": FrameReader.requests_over_time,
    "auth_failures_over_time": FrameReader.auth_failures_over_time,
    "failure_heatmap": FrameReader.failure_heatmap,
    "top_ips": FrameReader.top_ips,
    "top_subnets": FrameReader.top_subnets,
    "top_keys": FrameReader.top_keys,
    "top_accounts": FrameReader.top_accounts,
    "countries_map": FrameReader.countries_map,
    "alert_timeline": FrameReader.alert_timeline,
    "score_distribution": FrameReader.score_distribution,
}
