"""/plots/{name}: the dashboards' figures as Plotly JSON, drawn from store aggregates."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import pandas as pd
import plotly.graph_objects as go
from fastapi import APIRouter, Depends, HTTPException, Query, Response, status

from api.auth import Scope
from api.deps import PrincipalDep, QueriesDep, check_range, require
from api.frames import LOADERS, FrameReader, Span, bucket_seconds  # noqa: F401 - bucket_seconds re-exported
from api.queries import as_utc
from dashboards.figures import FIGURES
from pipeline.store import clip_range

router = APIRouter(prefix="/plots", tags=["plots"], dependencies=[Depends(require(Scope.EVENTS_READ))])

# The loaders (one per figure) live in api.frames, shared with the dashboard and the report.
FIGURES_BY_RANGE = sorted(set(FIGURES) & set(LOADERS))


@router.get("/{name}", responses={200: {"content": {"application/json": {}}, "description": "A Plotly figure."}})
def plot(
    name: str,
    queries: QueriesDep,
    principal: PrincipalDep,
    since: Annotated[datetime | None, Query(description="Default: the first stored event.")] = None,
    until: Annotated[datetime | None, Query(description="Default: the last stored event.")] = None,
    tz: Annotated[
        str | None,
        Query(max_length=64, description="The viewer's IANA zone (Europe/Berlin): hover texts show it. A zone "
              "this server does not know falls back to UTC (a browser may know newer zones than its tzdata)."),
    ] = None,
    alert_id: Annotated[str | None, Query(max_length=64, description="For alert_activity: the alert.")] = None,
) -> Response:
    """Figure JSON (`data` and `layout`) for Plotly.newPlot. Names: alert_activity (with alert_id),
    and by range: alert_timeline, auth_failures_over_time, countries_map, failure_heatmap,
    requests_over_time, score_distribution (iforest_ip fitted on the range's last 24 h, seconds on a
    big store), top_accounts, top_ips, top_keys, top_subnets."""
    if alert_id is not None and name != "alert_activity":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "alert_id goes with the alert_activity figure only")
    reader = FrameReader(queries.store, queries)
    if name == "alert_activity":
        # The figure names the alert and its entity: reading alerts is needed as well.
        if not principal.allows(Scope.ALERTS_READ):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "alert_activity also needs the alerts:read scope")
        if not alert_id:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "alert_activity needs alert_id")
        alert = queries.get_alert(alert_id)
        if alert is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id!r}")
        return _json(FIGURES[name](**reader.alert_activity(alert, tz)))
    if name not in FIGURES or name not in LOADERS:
        known = ", ".join(["alert_activity", *FIGURES_BY_RANGE])
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no figure {name!r} (known: {known})")
    since, until = as_utc(since), as_utc(until)
    if since is not None and until is not None:
        check_range(since, until)
    # Time comes from the data: a replayed month plots the same as it did live. A range outside
    # the stored span draws the empty figure.
    stored = reader.stored_range()
    if stored is None:
        return _json(FIGURES[name](pd.DataFrame()))
    since, until = clip_range(since, until, stored)
    if since > until:
        return _json(FIGURES[name](pd.DataFrame()))
    return _json(FIGURES[name](**LOADERS[name](reader, Span(since, until, tz))))


def _json(figure: go.Figure) -> Response:
    return Response(figure.to_json(), media_type="application/json")
