"""/alerts: list (filter, sort, paginate), one alert with its evidence events, ack and resolve."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from api.auth import Scope
from api.deps import AlertsWriter, QueriesDep, StateDep, check_range, require, split_values
from api.queries import ALERT_SORT_COLUMNS, DEFAULT_ALERT_SORT, AlertQuery
from api.schemas import AlertDetail, AlertOut, AlertPage, EventOut
from pipeline.schema import AlertStatus, ConfigError, Severity

router = APIRouter(prefix="/alerts", tags=["alerts"], dependencies=[Depends(require(Scope.ALERTS_READ))])

ListParam = Annotated[list[str] | None, Query()]


def _severities(values: list[str]) -> list[int]:
    try:
        return [int(Severity.parse(v)) for v in values]
    except ConfigError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


@router.get("", response_model=AlertPage)
def list_alerts(
    queries: QueriesDep,
    state: StateDep,
    status_: Annotated[
        list[str] | None, Query(alias="status", description="open, acknowledged, resolved, silenced")
    ] = None,
    severity: Annotated[list[str] | None, Query(description="Exact severities: info … critical.")] = None,
    min_severity: Annotated[str | None, Query(description="This severity or worse.")] = None,
    detector: ListParam = None,
    entity: Annotated[str | None, Query(max_length=512)] = None,
    entity_kind: Annotated[str | None, Query(description="ip, subnet, api_key, account")] = None,
    since: Annotated[datetime | None, Query(description="Alerts whose window ends at or after this.")] = None,
    until: Annotated[datetime | None, Query(description="Alerts whose window starts at or before this.")] = None,
    sort: Annotated[
        str, Query(description=f"Comma-separated keys, `-` for descending: {', '.join(ALERT_SORT_COLUMNS)}.")
    ] = DEFAULT_ALERT_SORT,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> AlertPage:
    check_range(since, until)
    statuses = split_values(status_)
    unknown = [s for s in statuses if s not in {a.value for a in AlertStatus}]
    if unknown:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown status {unknown[0]!r}")
    query = AlertQuery(
        statuses=statuses,
        severities=_severities(split_values(severity)),
        min_severity=_severities([min_severity])[0] if min_severity else None,
        detectors=split_values(detector),
        entity=entity,
        entity_kind=entity_kind,
        since=since,
        until=until,
    )
    limit = min(limit, state.limits.max_alerts_page)
    try:
        rows, total = queries.list_alerts(query, sort=sort, limit=limit, offset=offset)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    silenced = queries.silencing(rows)
    items = [AlertOut.from_row(r, silenced.get(r["alert_id"])) for r in rows]
    return AlertPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{alert_id}", response_model=AlertDetail)
def get_alert(alert_id: str, queries: QueriesDep) -> AlertDetail:
    """One alert with its evidence events (its sample event ids, else its entity's events in its window)."""
    alert = queries.get_alert(alert_id)
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id!r}")
    silenced = queries.silencing([alert])
    base = AlertOut.from_row(alert, silenced.get(alert_id))
    events = [EventOut(**e) for e in queries.alert_events(alert)]
    return AlertDetail(**base.model_dump(), events=events)


def _move(alert_id: str, target: AlertStatus, queries: QueriesDep) -> AlertOut:
    alert, result = queries.set_alert_status(alert_id, target)
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id!r}")
    if result == "conflict":
        raise HTTPException(status.HTTP_409_CONFLICT, f"alert is {alert['status']}; it cannot become {target.value}")
    return AlertOut.from_row(alert, queries.silencing([alert]).get(alert_id))


@router.post("/{alert_id}/ack", response_model=AlertOut)
def acknowledge(alert_id: str, queries: QueriesDep, _: AlertsWriter) -> AlertOut:
    """Someone is on it: open (or silenced) → acknowledged. Acknowledging twice changes nothing."""
    return _move(alert_id, AlertStatus.ACKNOWLEDGED, queries)


@router.post("/{alert_id}/resolve", response_model=AlertOut)
def resolve(alert_id: str, queries: QueriesDep, _: AlertsWriter) -> AlertOut:
    """Dealt with: open, acknowledged or silenced → resolved. Re-running detection keeps it resolved."""
    return _move(alert_id, AlertStatus.RESOLVED, queries)
