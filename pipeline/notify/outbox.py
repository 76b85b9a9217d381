"""The outbox: each alert waits here per route until the chat confirms it, through retries and rate limits.

One row per (route, alert, repeat round), created once, so a route hears of an alert at most once
per round however often the job runs. Sending claims rows with a lease (a conditional UPDATE, safe
with several workers on PostgreSQL and SQLite alike), posts, then records the outcome and a
delivery-log row in one transaction. A receiver that fails, throttles or is down keeps the rows
pending with a backoff; they go out once it answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.notify.builders import AlertView, build, view
from pipeline.notify.ratelimit import PLATFORM_LIMITS, DestinationLimiter, TokenBucket, plan_messages
from pipeline.notify.routes import Route
from pipeline.notify.sender import SendResult, send, shared_client
from pipeline.schema import AlertStatus
from pipeline.store import Store, alerts, metadata

log = logging.getLogger(__name__)
_run_lock = threading.Lock()

TS = sa.DateTime(timezone=True)
_BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

outbox = sa.Table(
    "outbox",
    metadata,
    # Hash of (route, alert, round): a second enqueue of the same round is a no-op, even racing.
    sa.Column("notification_id", sa.String(40), primary_key=True),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("alert_id", sa.String(40), nullable=False),
    # 0 for the first notification, n for the n-th repeat of a still-open alert.
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("severity", sa.Integer, nullable=False),
    sa.Column("group_key", sa.String(255), nullable=False),
    # Snapshot of the alert at enqueue time (used when the alert row is gone, e.g. pruned).
    sa.Column("alert", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("claim", sa.String(32)),
    sa.Column("next_attempt_at", TS, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("last_attempt_at", TS),
    sa.Column("delivered_at", TS),
    sa.Column("message_id", sa.String(40)),
    sa.Column("last_error", sa.Text),
    sa.UniqueConstraint("route", "alert_id", "seq", name="uq_outbox_route_alert_seq"),
    sa.Index("ix_outbox_due", "status", "next_attempt_at"),
    sa.Index("ix_outbox_route_group", "route", "group_key"),
)

# The delivery log: one row per HTTP attempt. Never the URL, the key or the body.
deliveries = sa.Table(
    "deliveries",
    metadata,
    # INTEGER on SQLite so the key is the rowid and autoincrements; BIGINT identity on PostgreSQL.
    sa.Column("delivery_id", _BIGINT_ID, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(40), nullable=False),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),
    sa.Column("destination", sa.String(16), nullable=False),
    sa.Column("alert_count", sa.Integer, nullable=False),
    sa.Column("digest", sa.Boolean, nullable=False),
    sa.Column("attempted_at", TS, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("retry_after", sa.Float),
    sa.Column("duration_ms", sa.Float),
    sa.Column("error", sa.Text),
    sa.Index("ix_deliveries_route_attempted", "route", "attempted_at"),
    sa.Index("ix_deliveries_message", "message_id"),
)

notify_buckets = sa.Table(
    "notify_buckets",
    metadata,
    sa.Column("bucket_key", sa.String(64), primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
# The alert was silenced before its notification went out.
CANCELLED = "cancelled"

# Exponential backoff between attempts: 5 s, 10 s, 20 s… capped at 10 min, ±20 % jitter so
# many messages failing together do not retry together.
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 600.0
# A claimed row becomes due again if its sender died mid-send (SIGKILL, power loss): after the
# longest a send can take (httpx applies the timeout to connect, write and read in turn, so up to
# CLAIM_TIMEOUTS of them) plus a margin for the database writes around it.
CLAIM_TIMEOUTS = 4
CLAIM_LEASE_S = 10.0
# Due notifications read per route and run; the rest wait for the next run.
BATCH = 500
# Machine receivers get every alert; still, one request carries at most this many.
MAX_ALERTS_PER_MESSAGE = 200
# Bound on SQL IN lists (SQLite allows 32766 parameters; this keeps statements small).
IN_CHUNK = 500
# A throttle without Retry-After (Teams' 429-in-a-200, DingTalk codes…) pauses the destination
# this long; Microsoft's advice for Teams webhooks is to wait 10-15 s.
DEFAULT_THROTTLE_S = 15.0


@dataclass
class NotifySummary:
    enqueued: int = 0
    messages_sent: int = 0
    alerts_delivered: int = 0
    digests: int = 0
    retrying: int = 0
    failed: int = 0
    cancelled: int = 0
    deferred: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def notification_id(route: str, alert_id: str, seq: int) -> str:
    return hashlib.sha256(f"{route}|{alert_id}|{seq}".encode()).hexdigest()[:40]


def message_id_for(notification_ids: Iterable[str]) -> str:
    """Same notifications, same id: a retry carries the webhook-id of the first try, so a receiver
    that did process a request whose answer was lost can drop the copy."""
    joined = ",".join(sorted(notification_ids))
    return "msg_" + hashlib.sha256(joined.encode()).hexdigest()[:32]


def backoff_seconds(attempts: int, message_id: str) -> float:
    base = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    # Deterministic jitter (from the message id) keeps tests exact and retries spread.
    fraction = int(hashlib.sha256(f"{message_id}|{attempts}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return min(BACKOFF_MAX_S, base * (0.8 + 0.4 * fraction))


def _is_due(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(outbox.c.status == PENDING, outbox.c.next_attempt_at <= now)


def _insert_ignore(dialect: str, table: sa.Table) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def _upsert(dialect: str, table: sa.Table, key: str, columns: Sequence[str]) -> Any:
    stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    return stmt.on_conflict_do_update(index_elements=[key], set_={c: stmt.excluded[c] for c in columns})


# ---- enqueue -----------------------------------------------------------------------------------
def _alert_row_view(row: Any) -> AlertView:
    data = dict(row._mapping)
    data["window_start"] = _utc(data["window_start"])
    data["window_end"] = _utc(data["window_end"])
    return view(data)


def enqueue(store: Store, routes: Sequence[Route], now: datetime) -> int:
    """Queue every open alert each route wants and has not been told of (or must hear of again)."""
    routes = [r for r in routes if r.enabled]
    if not routes:
        return 0
    now = _utc(now)
    horizon = now - timedelta(seconds=max(r.max_alert_age for r in routes))
    query = sa.select(alerts).where(alerts.c.status == AlertStatus.OPEN.value, alerts.c.window_end >= horizon)
    with store.engine.connect() as conn:
        open_alerts = [_alert_row_view(r) for r in conn.execute(query)]
    if not open_alerts:
        return 0
    inserted = 0
    with store.engine.begin() as conn:
        for route in routes:
            oldest = now - timedelta(seconds=route.max_alert_age)
            wanted = [a for a in open_alerts if route.matches(a.detector, a.severity) and a.window_end >= oldest]
            if not wanted:
                continue
            latest = _latest_rounds(conn, route.name, [a.alert_id for a in wanted])
            rows = []
            for a in wanted:
                seq = _next_round(latest.get(a.alert_id), route, now)
                if seq is None:
                    continue
                snapshot = a.as_dict()
                rows.append(
                    {
                        "notification_id": notification_id(route.name, a.alert_id, seq),
                        "route": route.name,
                        "alert_id": a.alert_id,
                        "seq": seq,
                        "severity": int(a.severity),
                        "group_key": route.group_key(snapshot),
                        "alert": json.dumps(snapshot, default=str, sort_keys=True),
                        "status": PENDING,
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    }
                )
            for chunk in _chunks(rows):
                result = conn.execute(_insert_ignore(store.dialect, outbox), list(chunk))
                inserted += result.rowcount if result.rowcount >= 0 else len(chunk)
    return inserted


def _latest_rounds(conn: sa.Connection, route: str, alert_ids: list[str]) -> dict[str, Any]:
    latest: dict[str, Any] = {}
    cols = [
        outbox.c.alert_id,
        outbox.c.seq,
        outbox.c.status,
        outbox.c.delivered_at,
        outbox.c.last_attempt_at,
        outbox.c.created_at,
    ]
    for chunk in _chunks(alert_ids):
        query = sa.select(*cols).where(outbox.c.route == route, outbox.c.alert_id.in_(list(chunk)))
        for row in conn.execute(query):
            if row.alert_id not in latest or row.seq > latest[row.alert_id].seq:
                latest[row.alert_id] = row
    return latest


def _next_round(last: Any, route: Route, now: datetime) -> int | None:
    """0 for a new alert; last+1 once repeat_interval has passed since the last round ended."""
    if last is None:
        return 0
    if last.status == PENDING or route.repeat_interval <= 0:
        return None
    ended = _utc(last.delivered_at or last.last_attempt_at or last.created_at)
    if ended + timedelta(seconds=route.repeat_interval) <= now:
        return last.seq + 1
    return None


# ---- drain -------------------------------------------------------------------------------------
def drain(store: Store, routes: Sequence[Route], now: datetime, client: httpx.Client, summary: NotifySummary) -> None:
    """Send what is due, route by route, within each destination's rate limit."""
    now = _utc(now)
    paused: set[str] = set()
    for route in routes:
        if not route.enabled or route.destination in paused:
            continue
        _give_up(store, route, now, summary)
        due = _due(store, route, now)
        if not due:
            continue
        groups = _ready_groups(store, route, due, now)
        if not groups:
            continue
        limiter = _load_limiter(store, route, now)
        plan, digest = plan_messages([[r.notification_id for r in g] for g in groups], limiter.available(now))
        if not plan:
            summary.deferred += sum(len(g) for g in groups)
            continue
        by_id = {r.notification_id: r for g in groups for r in g}
        for ids in plan:
            stop = False
            for chunk in _chunks(ids, MAX_ALERTS_PER_MESSAGE):
                if not limiter.take(now):
                    summary.deferred += len(chunk)
                    continue
                result = _send_one(store, route, [by_id[i] for i in chunk], digest, now, client, summary)
                if result is None:
                    continue
                if result.throttled:
                    limiter.pause(result.retry_after if result.retry_after is not None else DEFAULT_THROTTLE_S, now)
                if not result.ok and result.retryable:
                    # Down, failing or throttling: the rest would fail the same way (each after a
                    # timeout); they stay due for the next run.
                    paused.add(route.destination)
                    stop = True
                    break
            if stop:
                break
        if limiter.changed:
            _save_limiter(store, route, limiter)


def _give_up(store: Store, route: Route, now: datetime, summary: NotifySummary) -> None:
    cutoff = now - timedelta(seconds=route.give_up_after)
    stmt = (
        outbox.update()
        .where(
            outbox.c.route == route.name,
            outbox.c.status == PENDING,
            outbox.c.created_at < cutoff,
            outbox.c.next_attempt_at <= now,
        )
        .values(status=FAILED, claim=None, last_error=f"not delivered within {route.give_up_after:.0f} s; gave up")
    )
    with store.engine.begin() as conn:
        summary.failed += conn.execute(stmt).rowcount


def _due(store: Store, route: Route, now: datetime) -> list[Any]:
    query = (
        sa.select(outbox)
        .where(outbox.c.route == route.name, _is_due(now))
        .order_by(outbox.c.severity.desc(), outbox.c.created_at, outbox.c.notification_id)
        .limit(BATCH)
    )
    with store.engine.connect() as conn:
        return list(conn.execute(query))


def _ready_groups(store: Store, route: Route, due: list[Any], now: datetime) -> list[list[Any]]:
    """Groups whose last message is at least group_interval old; the others wait until then."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for row in due:
        groups[row.group_key].append(row)
    last_sent: dict[str, datetime] = {}
    if route.group_interval > 0:
        keys = list(groups)
        with store.engine.connect() as conn:
            for chunk in _chunks(keys):
                query = (
                    sa.select(outbox.c.group_key, sa.func.max(outbox.c.delivered_at))
                    .where(
                        outbox.c.route == route.name,
                        outbox.c.status == DELIVERED,
                        outbox.c.group_key.in_(list(chunk)),
                    )
                    .group_by(outbox.c.group_key)
                )
                for key, when in conn.execute(query):
                    if when is not None:
                        last_sent[key] = _utc(when)
    ready, waiting = [], {}
    interval = timedelta(seconds=route.group_interval)
    for key, rows in groups.items():
        if key in last_sent and last_sent[key] + interval > now:
            waiting[key] = (rows, last_sent[key] + interval)
        else:
            ready.append(rows)
    if waiting:
        # Park them until their group may speak again, so runs in between skip them cheaply.
        with store.engine.begin() as conn:
            for rows, when in waiting.values():
                ids = [r.notification_id for r in rows]
                conn.execute(
                    outbox.update()
                    .where(_is_due(now), outbox.c.notification_id.in_(ids))
                    .values(next_attempt_at=when)
                )
    return ready


def _claim(store: Store, route: Route, rows: list[Any], now: datetime) -> tuple[str, list[Any]]:
    """Take the rows for this sender. Another worker's claim has already moved next_attempt_at into
    the future, so the conditional UPDATE skips rows someone else is sending."""
    token = uuid.uuid4().hex
    lease = now + timedelta(seconds=CLAIM_TIMEOUTS * route.timeout + CLAIM_LEASE_S)
    ids = [r.notification_id for r in rows]
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            # Rows another drainer is claiming this instant are skipped, not waited for.
            ids = list(conn.execute(
                sa.select(outbox.c.notification_id)
                .where(_is_due(now), outbox.c.notification_id.in_(ids))
                .with_for_update(skip_locked=True)
            ).scalars())
        conn.execute(
            outbox.update()
            .where(_is_due(now), outbox.c.notification_id.in_(ids))
            .values(claim=token, next_attempt_at=lease)
        )
        query = sa.select(outbox).where(outbox.c.claim == token).order_by(outbox.c.notification_id)
        claimed = list(conn.execute(query))
    return token, claimed


def _current_views(store: Store, rows: list[Any]) -> dict[str, tuple[AlertView, str]]:
    """The alert as it is now (score and title may have grown since enqueue), else the snapshot."""
    ids = [r.alert_id for r in rows]
    current: dict[str, Any] = {}
    with store.engine.connect() as conn:
        for chunk in _chunks(ids):
            for row in conn.execute(sa.select(alerts).where(alerts.c.alert_id.in_(list(chunk)))):
                current[row.alert_id] = row
    out = {}
    for r in rows:
        if r.alert_id in current:
            v = _alert_row_view(current[r.alert_id])
        else:
            v = view(json.loads(r.alert))
        out[r.notification_id] = (v, v.status)
    return out


def _send_one(
    store: Store,
    route: Route,
    rows: list[Any],
    digest: bool,
    now: datetime,
    client: httpx.Client,
    summary: NotifySummary,
) -> SendResult | None:
    token, claimed = _claim(store, route, rows, now)
    if not claimed:
        return None
    views = _current_views(store, claimed)
    silenced = [r for r in claimed if views[r.notification_id][1] == AlertStatus.SILENCED.value]
    live = [r for r in claimed if views[r.notification_id][1] != AlertStatus.SILENCED.value]
    if silenced:
        with store.engine.begin() as conn:
            conn.execute(
                outbox.update()
                .where(outbox.c.notification_id.in_([r.notification_id for r in silenced]), outbox.c.claim == token)
                .values(status=CANCELLED, claim=None, last_error="alert silenced before delivery")
            )
        summary.cancelled += len(silenced)
    if not live:
        return None
    message_id = message_id_for(r.notification_id for r in live)
    prepared = build([views[r.notification_id][0] for r in live], route, now, digest=digest, message_id=message_id)
    result = send(client, route.kind, prepared, now, timeout=route.timeout, secrets=route.secret_values())
    if result.throttled and result.retry_after is None:
        # Rows and the destination's bucket must agree on when to try again.
        result.retry_after = DEFAULT_THROTTLE_S
    _record(store, route, live, token, message_id, digest, result, now, summary)
    return result


def _record(
    store: Store,
    route: Route,
    rows: list[Any],
    token: str,
    message_id: str,
    digest: bool,
    result: SendResult,
    now: datetime,
    summary: NotifySummary,
) -> None:
    outcome = "delivered" if result.ok else "retry" if result.retryable else "failed"
    with store.engine.begin() as conn:
        conn.execute(
            deliveries.insert().values(
                message_id=message_id,
                route=route.name,
                platform=route.platform,
                destination=route.destination,
                alert_count=len(rows),
                digest=digest,
                attempted_at=now,
                outcome=outcome,
                status_code=result.status_code,
                retry_after=result.retry_after,
                duration_ms=round(result.duration_ms, 3),
                error=result.error,
            )
        )
        mine = sa.and_(outbox.c.claim == token)
        if result.ok:
            conn.execute(
                outbox.update()
                .where(outbox.c.notification_id.in_([r.notification_id for r in rows]), mine)
                .values(
                    status=DELIVERED,
                    claim=None,
                    attempts=outbox.c.attempts + 1,
                    last_attempt_at=now,
                    delivered_at=now,
                    message_id=message_id,
                    last_error=None,
                )
            )
            summary.messages_sent += 1
            summary.alerts_delivered += len(rows)
            summary.digests += int(digest)
            return
        for r in rows:
            attempts = r.attempts + 1
            values: dict[str, Any] = {
                "claim": None,
                "attempts": attempts,
                "last_attempt_at": now,
                "last_error": result.error,
            }
            if result.retryable:
                # Retry-After is the receiver's word: the next attempt is not before it.
                wait = result.retry_after if result.retry_after is not None else backoff_seconds(attempts, message_id)
                next_at = now + timedelta(seconds=wait)
                if next_at > _utc(r.created_at) + timedelta(seconds=route.give_up_after):
                    values.update(status=FAILED, next_attempt_at=now)
                    summary.failed += 1
                else:
                    values.update(next_attempt_at=next_at)
                    summary.retrying += 1
            else:
                values.update(status=FAILED, next_attempt_at=now)
                summary.failed += 1
            conn.execute(outbox.update().where(outbox.c.notification_id == r.notification_id, mine).values(**values))
    if result.error:
        # Route name and the scrubbed error only: never the URL or key.
        log.warning("notify route %s: %s (%s)", route.name, result.error, outcome)
        summary.errors.append(f"{route.name}: {result.error}")


# ---- rate-limit state --------------------------------------------------------------------------
def _bucket_keys(route: Route) -> list[str]:
    return [f"{route.destination}:{route.kind}:{i}" for i in range(len(PLATFORM_LIMITS[route.kind]))]


def _load_limiter(store: Store, route: Route, now: datetime) -> DestinationLimiter:
    keys = _bucket_keys(route)
    with store.engine.connect() as conn:
        query = sa.select(notify_buckets).where(notify_buckets.c.bucket_key.in_(keys))
        saved = {r.bucket_key: r for r in conn.execute(query)}
    buckets = []
    for key, limit in zip(keys, PLATFORM_LIMITS[route.kind]):
        bucket = TokenBucket.full(limit, now)
        if key in saved:
            bucket.tokens = min(bucket.capacity, saved[key].tokens)
            bucket.updated = _utc(saved[key].updated_at)
        buckets.append(bucket)
    return DestinationLimiter(buckets)


def _save_limiter(store: Store, route: Route, limiter: DestinationLimiter) -> None:
    rows = [
        {"bucket_key": key, "tokens": bucket.tokens, "updated_at": bucket.updated}
        for key, bucket in zip(_bucket_keys(route), limiter.buckets)
    ]
    with store.engine.begin() as conn:
        conn.execute(_upsert(store.dialect, notify_buckets, "bucket_key", ["tokens", "updated_at"]), rows)


# ---- reading -----------------------------------------------------------------------------------
def delivery_log(store: Store, route: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Recent delivery attempts, newest first (safe to show: no URL, key or body is stored)."""
    newest_first = (deliveries.c.attempted_at.desc(), deliveries.c.delivery_id.desc())
    query = sa.select(deliveries).order_by(*newest_first).limit(limit)
    if route:
        query = query.where(deliveries.c.route == route)
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        row["attempted_at"] = _utc(row["attempted_at"])
    return rows


def outbox_rows(store: Store, route: str | None = None) -> list[dict[str, Any]]:
    """The outbox as plain dicts (for the API, the CLI and tests); the snapshot stays JSON text."""
    query = sa.select(outbox).order_by(outbox.c.created_at, outbox.c.notification_id)
    if route:
        query = query.where(outbox.c.route == route)
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        for col in ("next_attempt_at", "created_at", "last_attempt_at", "delivered_at"):
            row[col] = _utc(row[col])
    return rows


def notify_once(
    store: Store, routes: Sequence[Route], now: datetime, client: httpx.Client | None = None
) -> NotifySummary:
    """Enqueue new alerts for every route, then send what is due. The scheduler calls this."""
    summary = NotifySummary()
    # Claims already keep two runs from sending the same row; the lock also keeps two runs of one
    # process (the detect tick and the notify interval) from both spending a bucket's tokens.
    with _run_lock:
        summary.enqueued = enqueue(store, routes, now)
        drain(store, routes, now, client or shared_client(), summary)
    return summary
