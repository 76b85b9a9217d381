"""/events: search stored events by time, address or CIDR, key, account, outcome and path."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from api.auth import Scope
from api.deps import QueriesDep, StateDep, check_range, require, split_values
from api.queries import EventQuery, parse_ip_filter
from api.schemas import EventOut, EventPage
from pipeline.schema import Outcome, Service

router = APIRouter(prefix="/events", tags=["events"], dependencies=[Depends(require(Scope.EVENTS_READ))])


@router.get("", response_model=EventPage)
def search_events(
    queries: QueriesDep,
    state: StateDep,
    since: Annotated[datetime | None, Query(description="Events at or after (ISO-8601; no offset = UTC).")] = None,
    until: Annotated[datetime | None, Query(description="Events at or before.")] = None,
    ip: Annotated[str | None, Query(description="A client address or a CIDR (203.0.113.0/24, 2001:db8::/48).")] = None,
    key_id: Annotated[str | None, Query(description="API key fingerprint, as stored in events.")] = None,
    account: Annotated[str | None, Query(max_length=512)] = None,
    outcome: Annotated[list[str] | None, Query(description="ok, auth_failed, forbidden, …")] = None,
    service: Annotated[list[str] | None, Query(description="api, smtp, imap, pop3, web")] = None,
    path: Annotated[str | None, Query(max_length=2000, description="Exact path, or a prefix ending in *.")] = None,
    limit: Annotated[int, Query(ge=1, description="Rows per page; cut to the server's hard cap.")] = 100,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> EventPage:
    """Newest first. Follow `next_cursor` for older pages; no page holds more than the hard cap."""
    check_range(since, until)
    outcomes = split_values(outcome)
    bad = [o for o in outcomes if o not in {x.value for x in Outcome}]
    services = split_values(service)
    bad += [s for s in services if s not in {x.value for x in Service}]
    if bad:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown outcome or service {bad[0]!r}")
    query = EventQuery(
        since=since, until=until, api_key_id=key_id, account=account, outcomes=outcomes, services=services, path=path
    )
    if ip:
        try:
            query.ip, query.network = parse_ip_filter(ip)
        except ValueError:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{ip!r} is not an address or CIDR") from None
    limit = min(limit, state.limits.max_event_rows)
    try:
        page = queries.search_events(query, limit=limit, cursor=cursor, scan_budget=state.limits.event_scan_rows)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return EventPage(items=[EventOut(**e) for e in page.items], limit=limit, next_cursor=page.next_cursor)
