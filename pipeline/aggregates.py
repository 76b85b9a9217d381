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


# ---------------------------------------------------------------------------------------------
# Candidate pushdown (detectors.pushdown): a detector's necessary condition, computed here


def entity_column(by: str) -> sa.ColumnElement:
    """The SQL of a pushdown entity: a column, or the credential (the key, else the account)."""
    if by == "credential":
        key, account = events.c.api_key_id, events.c.account
        return sa.case(
            (key.isnot(None), sa.literal("k:") + key),
            (account.isnot(None), sa.literal("a:") + account),
            else_=sa.null(),
        )
    if by not in ENTITY_COLUMNS:
        raise ValueError(f"cannot push down by {by!r}")
    return events.c[by]


def _clause(clause) -> sa.ColumnElement:
    column = events.c[clause.column]
    if clause.op == "null":
        return column.is_(None)
    if clause.op == "notnull":
        return column.isnot(None)
    if clause.op == "in":
        values = list(clause.value)
        # A null column never matches, like pandas' isin; the explicit test keeps NOT() exact.
        return sa.and_(column.isnot(None), column.in_(values)) if values else sa.false()
    if clause.op == "ieq":
        return sa.and_(column.isnot(None), sa.func.lower(column) == str(clause.value).lower())
    if clause.op == "prefix":
        # substr, not LIKE: SQLite's LIKE ignores case, and the detectors' regexes do not.
        prefix = str(clause.value)
        return sa.and_(column.isnot(None), sa.func.substr(column, 1, len(prefix)) == prefix)
    if clause.op == "contains":
        return sa.and_(column.isnot(None), column.contains(str(clause.value), autoescape=True))
    return sa.and_(column.isnot(None), column == clause.value)


def rows_condition(rows) -> sa.ColumnElement:
    """The SQL of a detectors.pushdown.Rows: never NULL, so it can be negated and OR'ed safely."""
    parts = [_clause(c) for c in rows.all_of]
    if rows.any_of:
        parts.append(sa.or_(*[_clause(c) for c in rows.any_of]))
    if rows.none_of:
        parts.append(sa.not_(sa.and_(*[_clause(c) for c in rows.none_of])))
    return sa.and_(*parts) if parts else sa.true()


def pushdown_table(engine: Engine, since: datetime, until: datetime, pushdown) -> pd.DataFrame:
    """Per (entity, bucket) over since <= ts <= until, the pushdown's measures; `bucket` is epoch
    seconds (0 when the pushdown has no bucket), its width in `attrs["bucket_seconds"]`."""
    entity = entity_column(pushdown.by).label("entity")
    width = int(pushdown.bucket.total_seconds()) if pushdown.bucket is not None else 0
    if pushdown.bucket is not None and (width <= 0 or pushdown.bucket.total_seconds() != width):
        raise ValueError(f"pushdown bucket must be whole seconds, got {pushdown.bucket}")
    bucket = _bucket(engine.dialect.name, width) if width else sa.literal_column("0").label("bucket")
    columns, conditions = [], []
    for name, measure in pushdown.measures.items():
        condition = rows_condition(measure.rows)
        conditions.append(condition)
        if measure.first:
            value = sa.func.min(sa.case((condition, epoch_seconds(engine.dialect.name)), else_=sa.null()))
        elif measure.distinct is not None:
            value = sa.func.count(sa.distinct(sa.case((condition, events.c[measure.distinct]), else_=sa.null())))
        elif measure.total is not None:
            value = sa.func.coalesce(sa.func.sum(sa.case((condition, events.c[measure.total]), else_=0)), 0)
        else:
            value = sa.func.sum(sa.case((condition, 1), else_=0))
        columns.append(value.label(name))
    where = [entity.isnot(None), events.c.ts >= _utc(since), events.c.ts <= _utc(until)]
    if conditions:
        where.append(sa.or_(*conditions))  # rows no measure counts only make empty groups
    per = [events.c[pushdown.per].label(pushdown.per)] if pushdown.per else []
    group = [entity, *per, bucket] if width else [entity, *per]
    query = sa.select(entity, *per, bucket, *columns).where(*where).group_by(*group)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    names = list(pushdown.measures)
    keys = [pushdown.by, *([pushdown.per] if pushdown.per else [])]
    labels = [*keys, "bucket", *names]
    # Column by column: pandas probes every SQLAlchemy Row for named-tuple fields otherwise.
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(labels)
    frame = pd.DataFrame({label: pd.Series(values, dtype=object) for label, values in zip(labels, columns, strict=True)})
    frame = frame.astype({**{k: object for k in keys}, "bucket": "int64", **{n: "float64" for n in names}})
    frame.attrs["bucket_seconds"] = width
    return frame
