"""/stats: requests, failures and the busiest addresses and keys over a time range."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.auth import Scope
from api.deps import QueriesDep, check_range, require
from api.queries import as_utc
from api.schemas import StatsOut, TopEntry
from pipeline.schema import Outcome

router = APIRouter(prefix="/stats", tags=["stats"], dependencies=[Depends(require(Scope.EVENTS_READ))])


@router.get("", response_model=StatsOut)
def stats(
    queries: QueriesDep,
    since: Annotated[datetime | None, Query(description="Start (ISO-8601); default: the first stored event.")] = None,
    until: Annotated[datetime | None, Query(description="End; default: the last stored event.")] = None,
    top: Annotated[int, Query(ge=1, le=100, description="How many addresses and keys to list.")] = 10,
) -> StatsOut:
    check_range(since, until)  # a reversed range is 422 here too, as on /events and /alerts
    by_outcome = queries.outcome_counts(since, until)
    requests = sum(by_outcome.values())
    return StatsOut(
        since=as_utc(since),
        until=as_utc(until),
        requests=requests,
        failures=requests - by_outcome.get(Outcome.OK.value, 0) - by_outcome.get("unknown", 0),
        auth_failures=by_outcome.get(Outcome.AUTH_FAILED.value, 0),
        by_outcome=by_outcome,
        top_ips=[TopEntry(**t) for t in queries.top_entities("source_ip", since, until, top)],
        top_keys=[TopEntry(**t) for t in queries.top_entities("api_key_id", since, until, top)],
    )
