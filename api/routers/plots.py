"""/plots/{name}: the dashboards' figures as Plotly JSON, drawn from store aggregates."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated

import pandas as pd
from fastapi import APIRouter, Depends, HTTPException, Query, Response, status

from api.auth import Scope
from api.deps import QueriesDep, require
from api.queries import ApiQueries, as_utc
from dashboards.figures import FIGURES

router = APIRouter(prefix="/plots", tags=["plots"], dependencies=[Depends(require(Scope.EVENTS_READ))])

# Bucket widths to choose from; the narrowest giving at most MAX_BUCKETS bars is used.
BUCKETS = [60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400]
MAX_BUCKETS = 300


def bucket_seconds(since: datetime, until: datetime) -> int:
    span = max((until - since).total_seconds(), 1.0)
    return next((b for b in BUCKETS if span / b <= MAX_BUCKETS), BUCKETS[-1])


Loader = Callable[[ApiQueries, datetime, datetime], pd.DataFrame]

# The query whose frame each figure draws; a figure without a loader is not served.
LOADERS: dict[str, Loader] = {
    "requests_over_time": lambda q, since, until: q.requests_over_time_frame(
        since, until, bucket_seconds(since, until)
    ),
    "top_ips": lambda q, since, until: q.top_ips_frame(since, until, top=20),
}


@router.get("/{name}", responses={200: {"content": {"application/json": {}}, "description": "A Plotly figure."}})
def plot(
    name: str,
    queries: QueriesDep,
    since: Annotated[datetime | None, Query(description="Default: the first stored event.")] = None,
    until: Annotated[datetime | None, Query(description="Default: the last stored event.")] = None,
) -> Response:
    """Figure JSON (`data` and `layout`) for Plotly.newPlot; names: requests_over_time, top_ips."""
    if name not in FIGURES or name not in LOADERS:
        known = ", ".join(sorted(set(FIGURES) & set(LOADERS)))
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no figure {name!r} (known: {known})")
    since, until = as_utc(since), as_utc(until)
    if since is None or until is None:
        # Time comes from the data: a replayed month plots the same as it did live.
        stored = queries.store.event_time_range()
        if stored is None:
            return Response(FIGURES[name](pd.DataFrame()).to_json(), media_type="application/json")
        since, until = since or stored[0], until or stored[1]
    if since > until:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "since is after until")
    figure = FIGURES[name](LOADERS[name](queries, since, until))
    return Response(figure.to_json(), media_type="application/json")

