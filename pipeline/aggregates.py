"""Window aggregates computed by the database: per entity per time bucket, without raw rows in Python.

The same numbers as `detectors.features.window_features` / `bucket_counts` on a frame, but as one
`GROUP BY entity, bucket` query, so a week of tens of millions of events comes back as one row per
(entity, bucket). Buckets are aligned to the epoch like pandas' `floor`, so both sides agree row
for row. The queries are plain SQL aggregates on `events`: they run on SQLite, PostgreSQL (one
daily partition at a time when the range is narrow) and Citus (pushed down to every shard).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.schema import Outcome
from pipeline.store import events

# Entities the aggregates may be grouped by (the alert entity kinds that are columns).
ENTITY_COLUMNS = ("source_ip", "api_key_id", "account")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def epoch_seconds(dialect: str) -> sa.ColumnElement:
    """Whole seconds since the epoch of `events.ts`, in the dialect's own functions."""
    if dialect == "sqlite":
        # SQLite stores UTC text; strftime('%s') reads it as UTC and drops the fraction (a floor).
        return sa.cast(sa.func.strftime("%s", events.c.ts), sa.BigInteger)
    return sa.cast(sa.func.floor(sa.extract("epoch", events.c.ts)), sa.BigInteger)


def _bucket(dialect: str, width: int) -> sa.ColumnElement:
    epoch = epoch_seconds(dialect)
    return (epoch - epoch % width).label("bucket")


def _check(by: str, bucket_seconds: int) -> None:
    if by not in ENTITY_COLUMNS:
        raise ValueError(f"cannot aggregate by {by!r} (one of {', '.join(ENTITY_COLUMNS)})")
    if bucket_seconds <= 0:
        raise ValueError("bucket_seconds must be positive")


def _frame(rows: list, columns: list[str], by: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    frame[by] = frame[by].astype("string")
    frame["bucket"] = pd.to_datetime(frame["bucket"].astype("int64"), unit="s", utc=True)
    return frame


def window_aggregates(
    engine: Engine, since: datetime, until: datetime, by: str = "source_ip", bucket_seconds: int = 600
) -> pd.DataFrame:
    """Per (entity, bucket) over since <= ts <= until: requests, auth_failures, distinct accounts,
    keys, paths and IPs, and failure_ratio; sorted by entity and bucket, like window_features."""
    _check(by, bucket_seconds)
    dialect = engine.dialect.name
    entity = events.c[by]
    bucket = _bucket(dialect, bucket_seconds)
    failed = sa.func.sum(sa.case((events.c.outcome == Outcome.AUTH_FAILED.value, 1), else_=0))
    query = (
        sa.select(
            entity.label(by),
            bucket,
            sa.func.count().label("requests"),
            failed.label("auth_failures"),
            sa.func.count(sa.distinct(events.c.account)).label("distinct_accounts"),
            sa.func.count(sa.distinct(events.c.api_key_id)).label("distinct_api_keys"),
            sa.func.count(sa.distinct(events.c.path)).label("distinct_paths"),
            sa.func.count(sa.distinct(events.c.source_ip)).label("distinct_ips"),
        )
        .where(entity.isnot(None), events.c.ts >= _utc(since), events.c.ts <= _utc(until))
        .group_by(entity, bucket)
        .order_by(entity, bucket)
    )
    columns = [by, "bucket", "requests", "auth_failures", "distinct_accounts", "distinct_api_keys",
               "distinct_paths", "distinct_ips"]
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    frame = _frame(rows, columns, by)
    counts = {c: frame[c].astype("int64") for c in columns[2:]}
    return frame.assign(**counts).assign(failure_ratio=lambda f: f["auth_failures"] / f["requests"])


def bucket_counts(
    engine: Engine,
    since: datetime,
    until: datetime,
    by: str = "source_ip",
    bucket_seconds: int = 60,
    outcome: Outcome | None = None,
) -> pd.DataFrame:
    """Events per (entity, bucket), optionally only those with one outcome: columns by, bucket, events."""
    _check(by, bucket_seconds)
    entity = events.c[by]
    bucket = _bucket(engine.dialect.name, bucket_seconds)
    where = [entity.isnot(None), events.c.ts >= _utc(since), events.c.ts <= _utc(until)]
    if outcome is not None:
        where.append(events.c.outcome == Outcome(outcome).value)
    query = (
        sa.select(entity.label(by), bucket, sa.func.count().label("events"))
        .where(*where)
        .group_by(entity, bucket)
        .order_by(entity, bucket)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    frame = _frame(rows, [by, "bucket", "events"], by)
    return frame.assign(events=frame["events"].astype("int64"))
