"""The API's reads and writes on the store: alert triage, event search, stats, silences and audit."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import sqlalchemy as sa

from api.tables import audit_log, silences
from pipeline.schema import AlertStatus, Outcome
from pipeline.store import Store, alerts, events

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Column a sort key may name; "-" in front sorts descending.
ALERT_SORT_COLUMNS = {
    "severity": alerts.c.severity,
    "score": alerts.c.score,
    "window_start": alerts.c.window_start,
    "window_end": alerts.c.window_end,
    "created_at": alerts.c.created_at,
    "updated_at": alerts.c.updated_at,
    "detector": alerts.c.detector,
    "entity": alerts.c.entity,
    "status": alerts.c.status,
}
DEFAULT_ALERT_SORT = "-severity,-window_start"

# Which statuses an alert may move to a status from (the same status again is a no-op).
TRANSITIONS: dict[AlertStatus, frozenset[AlertStatus]] = {
    AlertStatus.ACKNOWLEDGED: frozenset({AlertStatus.OPEN, AlertStatus.SILENCED}),
    AlertStatus.RESOLVED: frozenset({AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED, AlertStatus.SILENCED}),
}

# Evidence events shown with one alert.
EVIDENCE_EVENTS = 200


def as_utc(value: Any) -> datetime | None:
    """Timestamps as aware UTC datetimes, whatever the dialect handed back (SQLite: naive or text)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(str(value))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def parse_alert_sort(spec: str | None) -> list[sa.ColumnElement]:
    """`-severity,window_start` to ORDER BY clauses, always ending in the id so pages are stable."""
    clauses: list[sa.ColumnElement] = []
    for part in (spec or DEFAULT_ALERT_SORT).split(","):
        part = part.strip()
        if not part:
            continue
        descending = part.startswith("-")
        name = part.lstrip("-+")
        if name not in ALERT_SORT_COLUMNS:
            raise ValueError(f"unknown sort key {name!r} (known: {', '.join(ALERT_SORT_COLUMNS)})")
        column = ALERT_SORT_COLUMNS[name]
        clauses.append(column.desc() if descending else column.asc())
    clauses.append(alerts.c.alert_id.asc())
    return clauses


def parse_ip_filter(value: str) -> tuple[str | None, Network | None]:
    """An address (normalised the way parsers store it) or a CIDR; ValueError when neither."""
    value = value.strip()
    if "/" in value:
        net = ipaddress.ip_network(value, strict=False)
        if net.num_addresses == 1:
            return net.network_address.compressed, None
        return None, net
    return ipaddress.ip_address(value.strip("[]")).compressed, None


def network_text_prefix(net: Network) -> str:
    """A text prefix every address of `net` starts with, as parsers write addresses (compressed).

    It is a pre-filter the database can use; membership is then checked exactly. IPv4: the whole
    octets of the prefix. IPv6: the whole groups before the first zero group, since a zero group
    may be folded into `::`.
    """
    if isinstance(net, ipaddress.IPv4Network):
        octets = str(net.network_address).split(".")[: net.prefixlen // 8]
        return ".".join(octets) + "." if octets else ""
    groups = []
    for group in net.network_address.exploded.split(":")[: net.prefixlen // 16]:
        if int(group, 16) == 0:
            break
        groups.append(f"{int(group, 16):x}")
    return ":".join(groups) + ":" if groups else ""


def _in_network(address: str | None, net: Network) -> bool:
    if address is None:
        return False
    try:
        return ipaddress.ip_address(address) in net
    except ValueError:
        return False


def encode_cursor(ts: datetime, event_id: str) -> str:
    payload = json.dumps([as_utc(ts).isoformat(), event_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        ts_text, event_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return as_utc(datetime.fromisoformat(ts_text)), str(event_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValueError("invalid cursor (pass next_cursor from the previous page unchanged)") from None


@dataclass
class AlertQuery:
    statuses: Sequence[str] = ()
    severities: Sequence[int] = ()
    min_severity: int | None = None
    detectors: Sequence[str] = ()
    entity: str | None = None
    entity_kind: str | None = None
    # Alerts whose window overlaps [since, until].
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[sa.ColumnElement]:
        conds: list[sa.ColumnElement] = []
        if self.statuses:
            conds.append(alerts.c.status.in_(list(self.statuses)))
        if self.severities:
            conds.append(alerts.c.severity.in_(list(self.severities)))
        if self.min_severity is not None:
            conds.append(alerts.c.severity >= self.min_severity)
        if self.detectors:
            conds.append(alerts.c.detector.in_(list(self.detectors)))
        if self.entity is not None:
            conds.append(alerts.c.entity == self.entity)
        if self.entity_kind is not None:
            conds.append(alerts.c.entity_kind == self.entity_kind)
        if self.since is not None:
            conds.append(alerts.c.window_end >= as_utc(self.since))
        if self.until is not None:
            conds.append(alerts.c.window_start <= as_utc(self.until))
        return conds


@dataclass
class EventQuery:
    since: datetime | None = None
    until: datetime | None = None
    ip: str | None = None
    network: Network | None = None
    api_key_id: str | None = None
    account: str | None = None
    outcomes: Sequence[str] = ()
    # Exact path, or a prefix when it ends in `*`.
    path: str | None = None
    services: Sequence[str] = field(default_factory=tuple)

    def conditions(self) -> list[sa.ColumnElement]:
        conds: list[sa.ColumnElement] = []
        if self.since is not None:
            conds.append(events.c.ts >= as_utc(self.since))
        if self.until is not None:
            conds.append(events.c.ts <= as_utc(self.until))
        if self.ip is not None:
            conds.append(events.c.source_ip == self.ip)
        if self.network is not None:
            prefix = network_text_prefix(self.network)
            if prefix:
                conds.append(events.c.source_ip.startswith(prefix, autoescape=True))
            else:
                conds.append(events.c.source_ip.isnot(None))
        if self.api_key_id is not None:
            conds.append(events.c.api_key_id == self.api_key_id)
        if self.account is not None:
            conds.append(events.c.account == self.account)
        if self.outcomes:
            conds.append(events.c.outcome.in_(list(self.outcomes)))
        if self.services:
            conds.append(events.c.service.in_(list(self.services)))
        if self.path is not None:
            if self.path.endswith("*"):
                conds.append(events.c.path.startswith(self.path[:-1], autoescape=True))
            else:
                conds.append(events.c.path == self.path)
        return conds

    def matches(self, row: Mapping[str, Any]) -> bool:
        """The exact check the SQL pre-filter cannot do (CIDR membership)."""
        return self.network is None or _in_network(row["source_ip"], self.network)


@dataclass
class EventPage:
    items: list[dict[str, Any]]
    next_cursor: str | None
    scanned: int


def silence_matches(silence: Mapping[str, Any], alert: Mapping[str, Any]) -> bool:
    """Whether a silence's matchers (unset = any) all hold for an alert. A CIDR matches alerts
    about an address inside it, or about a subnet inside it."""
    if silence.get("detector") and silence["detector"] != alert["detector"]:
        return False
    if silence.get("entity") and silence["entity"] != alert["entity"]:
        return False
    if silence.get("cidr"):
        net = ipaddress.ip_network(silence["cidr"], strict=False)
        try:
            if alert["entity_kind"] == "subnet":
                sub = ipaddress.ip_network(alert["entity"], strict=False)
                return sub.version == net.version and sub.subnet_of(net)  # type: ignore[arg-type]
            return ipaddress.ip_address(alert["entity"]) in net
        except ValueError:
            return False
    return True


def _alert_dict(row: Any) -> dict[str, Any]:
    item = dict(row._mapping)
    item["evidence"] = json.loads(item["evidence"]) if item["evidence"] else {}
    for col in ("window_start", "window_end", "created_at", "updated_at"):
        item[col] = as_utc(item[col])
    return item


def _event_dict(row: Any) -> dict[str, Any]:
    item = dict(row._mapping)
    item["ts"] = as_utc(item["ts"])
    return item


def _silence_dict(row: Any, now: datetime) -> dict[str, Any]:
    item = dict(row._mapping)
    for col in ("created_at", "expires_at"):
        item[col] = as_utc(item[col])
    item["active"] = item["expires_at"] > now
    return item


class ApiQueries:
    """Store methods only the API needs, on the store's engine and tables."""

    def __init__(self, store: Store):
        self.store = store
        self.engine = store.engine
        # Event reads may use a replica (read_database_url); alerts, silences and audit stay on the
        # primary, so a triage change is read back at once.
        self.read_engine = getattr(store, "read_engine", store.engine)
        self.dialect = store.dialect

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # ---- alerts ------------------------------------------------------------------------------
    def list_alerts(
        self, query: AlertQuery, sort: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        conds = query.conditions()
        order = parse_alert_sort(sort)
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(alerts).where(*conds)).scalar_one()
            rows = conn.execute(sa.select(alerts).where(*conds).order_by(*order).limit(limit).offset(offset)).all()
        return [_alert_dict(r) for r in rows], total

    def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(alerts).where(alerts.c.alert_id == alert_id)).first()
        return _alert_dict(row) if row is not None else None

    def set_alert_status(
        self, alert_id: str, status: AlertStatus, now: datetime | None = None
    ) -> tuple[dict[str, Any] | None, str]:
        """Move an alert to `status`: returns (alert, "changed" | "unchanged" | "conflict" | "missing").

        The allowed previous statuses are part of the UPDATE, so two racing callers cannot both
        move it.
        """
        now = now or datetime.now(timezone.utc)
        allowed = [s.value for s in TRANSITIONS[status]]
        with self.engine.begin() as conn:
            result = conn.execute(
                alerts.update()
                .where(alerts.c.alert_id == alert_id, alerts.c.status.in_(allowed))
                .values(status=status.value, updated_at=now)
            )
        alert = self.get_alert(alert_id)
        if alert is None:
            return None, "missing"
        if result.rowcount:
            return alert, "changed"
        return alert, "unchanged" if alert["status"] == status.value else "conflict"

    def alert_events(self, alert: Mapping[str, Any], limit: int = EVIDENCE_EVENTS) -> list[dict[str, Any]]:
        """The evidence events of an alert, oldest first: its sample event ids, else its entity's
        events in its window."""
        ids = [str(i) for i in (alert.get("evidence") or {}).get("sample_event_ids") or []][:limit]
        if ids:
            with self.read_engine.connect() as conn:
                rows = conn.execute(
                    sa.select(events).where(events.c.event_id.in_(ids)).order_by(events.c.ts, events.c.event_id)
                ).all()
            return [_event_dict(r) for r in rows]
        query = EventQuery(since=alert["window_start"], until=alert["window_end"])
        kind, entity = alert["entity_kind"], alert["entity"]
        try:
            if kind in ("ip", "subnet"):
                query.ip, query.network = parse_ip_filter(entity)
            elif kind == "api_key":
                query.api_key_id = entity
            elif kind == "account":
                query.account = entity
            else:
                return []
        except ValueError:
            return []
        # The newest `limit` of them, told in order like the sample events.
        return list(reversed(self.search_events(query, limit=limit).items))

    # ---- events ------------------------------------------------------------------------------
    def search_events(
        self, query: EventQuery, limit: int, cursor: str | None = None, scan_budget: int = 100_000
    ) -> EventPage:
        """Newest first, keyset-paginated on (ts, event_id); at most `limit` rows.

        A CIDR the SQL pre-filter cannot express exactly is checked here row by row; `scan_budget`
        bounds the rows read per call, and `next_cursor` then continues where the scan stopped.
        """
        conds = query.conditions()
        position = decode_cursor(cursor) if cursor else None
        exact = query.network is None
        chunk = limit + 1 if exact else min(max(4 * (limit + 1), 1000), max(scan_budget, 1))
        found: list[dict[str, Any]] = []
        scanned = 0
        last: tuple[datetime, str] | None = None
        with self.read_engine.connect() as conn:
            while True:
                where = list(conds)
                if position is not None:
                    ts, event_id = position
                    where.append(
                        sa.or_(events.c.ts < ts, sa.and_(events.c.ts == ts, events.c.event_id < event_id))
                    )
                rows = conn.execute(
                    sa.select(events)
                    .where(*where)
                    .order_by(events.c.ts.desc(), events.c.event_id.desc())
                    .limit(chunk)
                ).all()
                for row in rows:
                    scanned += 1
                    item = _event_dict(row)
                    last = (item["ts"], item["event_id"])
                    if query.matches(item):
                        found.append(item)
                        if len(found) > limit:
                            tail = found[limit - 1]
                            return EventPage(found[:limit], encode_cursor(tail["ts"], tail["event_id"]), scanned)
                if len(rows) < chunk:
                    return EventPage(found, None, scanned)
                position = last
                if scanned >= scan_budget:
                    assert last is not None
                    return EventPage(found, encode_cursor(*last), scanned)

    def latest_event_time(self) -> datetime | None:
        with self.read_engine.connect() as conn:
            return as_utc(conn.execute(sa.select(sa.func.max(events.c.ts))).scalar())

    # ---- stats and plot frames ---------------------------------------------------------------
    def _range(self, since: datetime | None, until: datetime | None) -> list[sa.ColumnElement]:
        conds = []
        if since is not None:
            conds.append(events.c.ts >= as_utc(since))
        if until is not None:
            conds.append(events.c.ts <= as_utc(until))
        return conds

    def outcome_counts(self, since: datetime | None, until: datetime | None) -> dict[str, int]:
        with self.read_engine.connect() as conn:
            rows = conn.execute(
                sa.select(events.c.outcome, sa.func.count())
                .where(*self._range(since, until))
                .group_by(events.c.outcome)
            ).all()
        return {str(outcome) if outcome is not None else "unknown": int(n) for outcome, n in rows}

    def top_entities(
        self, column: str, since: datetime | None, until: datetime | None, top: int
    ) -> list[dict[str, Any]]:
        """The `top` values of an event column by requests, with their failures (outcome not ok)."""
        col = events.c[column]
        failures = sa.func.sum(sa.case((events.c.outcome != Outcome.OK.value, 1), else_=0))
        auth_failures = sa.func.sum(sa.case((events.c.outcome == Outcome.AUTH_FAILED.value, 1), else_=0))
        requests = sa.func.count().label("requests")
        query = (
            sa.select(col.label("value"), requests, failures.label("failures"), auth_failures.label("auth_failures"))
            .where(col.isnot(None), *self._range(since, until))
            .group_by(col)
            .order_by(requests.desc(), col)
            .limit(top)
        )
        with self.read_engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {"value": r.value, "requests": int(r.requests), "failures": int(r.failures or 0),
             "auth_failures": int(r.auth_failures or 0)}
            for r in rows
        ]

    def _epoch_seconds(self) -> sa.ColumnElement:
        if self.dialect == "sqlite":
            # The store writes SQLite timestamps as UTC text; strftime('%s') reads that text.
            return sa.cast(sa.func.strftime("%s", events.c.ts), sa.BigInteger)
        return sa.cast(sa.func.floor(sa.extract("epoch", events.c.ts)), sa.BigInteger)

    def requests_over_time_frame(self, since: datetime, until: datetime, bucket_seconds: int) -> pd.DataFrame:
        """Requests per time bucket and outcome: columns bucket (UTC), outcome, count."""
        epoch = self._epoch_seconds()
        bucket = (epoch - epoch % bucket_seconds).label("bucket")
        outcome = sa.func.coalesce(events.c.outcome, "unknown").label("outcome")
        query = (
            sa.select(bucket, outcome, sa.func.count().label("count"))
            .where(*self._range(since, until))
            .group_by(bucket, outcome)
            .order_by(bucket, outcome)
        )
        with self.read_engine.connect() as conn:
            rows = conn.execute(query).all()
        frame = pd.DataFrame(rows, columns=["bucket", "outcome", "count"])
        return frame.assign(
            bucket=pd.to_datetime(frame["bucket"].astype("int64"), unit="s", utc=True),
            outcome=frame["outcome"].astype("string"),
            count=frame["count"].astype("int64"),
        )

    def top_ips_frame(self, since: datetime | None, until: datetime | None, top: int = 20) -> pd.DataFrame:
        """Columns source_ip, requests, failures, auth_failures; most requests first."""
        rows = self.top_entities("source_ip", since, until, top)
        frame = pd.DataFrame(rows, columns=["value", "requests", "failures", "auth_failures"])
        return frame.rename(columns={"value": "source_ip"}).astype(
            {"source_ip": "string", "requests": "int64", "failures": "int64", "auth_failures": "int64"}
        )

    def alert_counts(self) -> list[tuple[str, str, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(alerts.c.detector, alerts.c.status, sa.func.count())
                .group_by(alerts.c.detector, alerts.c.status)
                .order_by(alerts.c.detector, alerts.c.status)
            ).all()
        return [(d, s, int(n)) for d, s, n in rows]

    # ---- silences ----------------------------------------------------------------------------
    def create_silence(
        self,
        *,
        detector: str | None,
        entity: str | None,
        cidr: str | None,
        comment: str,
        created_by: str,
        expires_at: datetime,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        now = now or datetime.now(timezone.utc)
        silence_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(
                silences.insert().values(
                    silence_id=silence_id, detector=detector, entity=entity, cidr=cidr, comment=comment,
                    created_by=created_by, created_at=now, expires_at=as_utc(expires_at),
                )
            )
        silence = self.get_silence(silence_id, now)
        assert silence is not None
        return silence

    def get_silence(self, silence_id: str, now: datetime | None = None) -> dict[str, Any] | None:
        now = now or datetime.now(timezone.utc)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(silences).where(silences.c.silence_id == silence_id)).first()
        return _silence_dict(row, now) if row is not None else None

    def list_silences(self, now: datetime | None = None, include_expired: bool = False) -> list[dict[str, Any]]:
        now = now or datetime.now(timezone.utc)
        query = sa.select(silences).order_by(silences.c.created_at.desc(), silences.c.silence_id)
        if not include_expired:
            query = query.where(silences.c.expires_at > now)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_silence_dict(r, now) for r in rows]

    def update_silence(
        self, silence_id: str, *, comment: str | None = None, expires_at: datetime | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any] | None:
        changes: dict[str, Any] = {}
        if comment is not None:
            changes["comment"] = comment
        if expires_at is not None:
            changes["expires_at"] = as_utc(expires_at)
        if changes:
            with self.engine.begin() as conn:
                conn.execute(silences.update().where(silences.c.silence_id == silence_id).values(**changes))
        return self.get_silence(silence_id, now)

    def expire_silence(self, silence_id: str, now: datetime | None = None) -> dict[str, Any] | None:
        """End a silence now (kept, so what was muted when stays answerable)."""
        now = now or datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            conn.execute(
                silences.update()
                .where(silences.c.silence_id == silence_id, silences.c.expires_at > now)
                .values(expires_at=now)
            )
        return self.get_silence(silence_id, now)

    def silencing(self, found: Iterable[Mapping[str, Any]], now: datetime | None = None) -> dict[str, str]:
        """alert_id -> id of an active silence that matches it, for the given alerts."""
        active = self.list_silences(now)
        out: dict[str, str] = {}
        for alert in found:
            for silence in active:
                if silence_matches(silence, alert):
                    out[alert["alert_id"]] = silence["silence_id"]
                    break
        return out

    def apply_silences(self, now: datetime | None = None) -> tuple[int, int]:
        """Open alerts an active silence matches become silenced (notify skips those); silenced
        alerts no active silence matches any more are open again. Returns (silenced, reopened).

        Run after a silence changes, and after each detection run so new alerts are muted too.
        """
        now = now or datetime.now(timezone.utc)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(alerts.c.alert_id, alerts.c.detector, alerts.c.entity_kind, alerts.c.entity, alerts.c.status)
                .where(alerts.c.status.in_([AlertStatus.OPEN.value, AlertStatus.SILENCED.value]))
            ).all()
        matched = self.silencing([dict(r._mapping) for r in rows], now)
        to_silence = [r.alert_id for r in rows if r.status == AlertStatus.OPEN.value and r.alert_id in matched]
        to_open = [r.alert_id for r in rows if r.status == AlertStatus.SILENCED.value and r.alert_id not in matched]
        with self.engine.begin() as conn:
            for ids, old, new in (
                (to_silence, AlertStatus.OPEN, AlertStatus.SILENCED),
                (to_open, AlertStatus.SILENCED, AlertStatus.OPEN),
            ):
                # The old status is part of the WHERE: an ack that raced us is not overwritten.
                for start in range(0, len(ids), 500):
                    conn.execute(
                        alerts.update()
                        .where(alerts.c.alert_id.in_(ids[start : start + 500]), alerts.c.status == old.value)
                        .values(status=new.value, updated_at=now)
                    )
        return len(to_silence), len(to_open)

    # ---- audit -------------------------------------------------------------------------------
    def write_audit(self, entry: Mapping[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(audit_log.insert().values(**entry))

    def list_audit(
        self,
        *,
        limit: int,
        before_id: int | None = None,
        key_id: str | None = None,
        client_ip: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        conds = []
        if before_id is not None:
            conds.append(audit_log.c.audit_id < before_id)
        if key_id is not None:
            conds.append(audit_log.c.key_id == key_id)
        if client_ip is not None:
            conds.append(audit_log.c.client_ip == client_ip)
        if outcome is not None:
            conds.append(audit_log.c.outcome == outcome)
        if since is not None:
            conds.append(audit_log.c.ts >= as_utc(since))
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(audit_log).where(*conds).order_by(audit_log.c.audit_id.desc()).limit(limit)
            ).all()
        out = []
        for r in rows:
            item = dict(r._mapping)
            item["ts"] = as_utc(item["ts"])
            out.append(item)
        return out

