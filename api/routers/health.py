"""GET /health: open to all, says whether the store answers (for load balancers and probes)."""

from __future__ import annotations

import logging
from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import StateDep
from api.schemas import HealthOut
from pipeline.health import problems

log = logging.getLogger(__name__)

router = APIRouter(prefix="/health", tags=["health"])

try:
    VERSION = metadata.version("mailwarden")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"


@router.get("", response_model=HealthOut, responses={503: {"model": HealthOut}})
def health(state: StateDep) -> HealthOut | JSONResponse:
    """200 when the store answers a query and no background work of this process has stopped
    (a dead follower would otherwise go unnoticed while the API answers), 503 otherwise.
    Needs no key and names no host or path."""
    stopped = problems()
    try:
        state.queries.ping()
    except Exception as exc:  # any database failure means "unhealthy"; details go to the log only
        log.warning("health check: store unavailable: %s", str(exc).strip().splitlines()[:1])
        body = HealthOut(status="error", store=f"unavailable ({type(exc).__name__})", version=VERSION,
                         problems=stopped)
        return JSONResponse(body.model_dump(), status_code=503)
    if stopped:
        body = HealthOut(status="error", store="ok", version=VERSION, problems=stopped)
        return JSONResponse(body.model_dump(), status_code=503)
    return HealthOut(status="ok", store="ok", version=VERSION)
