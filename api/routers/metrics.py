"""GET /metrics: Prometheus text exposition of this process's counters and store-derived gauges."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Response

from api.deps import MetricsReader, StateDep
from api.metrics import CONTENT_TYPE, gauge

# A scope of its own: the numbers hold no event data, so Prometheus gets a key (sent as a bearer
# token) that opens nothing else.
router = APIRouter(prefix="/metrics", tags=["metrics"])


@router.get("", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
def metrics(state: StateDep, _: MetricsReader) -> Response:
    queries = state.queries
    latest = queries.latest_event_time()
    active = queries.list_silences(datetime.now(timezone.utc))
    gauges = [
        gauge(
            "mailwarden_alerts",
            "Stored alerts by detector and status.",
            [({"detector": d, "status": s}, n) for d, s, n in queries.alert_counts()],
        ),
        gauge(
            "mailwarden_events_latest_timestamp_seconds",
            "Time of the newest stored event (ingest lag = time() - this).",
            [({}, latest.timestamp())] if latest else [],
        ),
        gauge("mailwarden_silences_active", "Silences in force now.", [({}, len(active))]),
    ]
    return Response(state.metrics.render(gauges), media_type=CONTENT_TYPE)
