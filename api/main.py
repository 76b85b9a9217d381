"""create_app(settings): the FastAPI application, assembled from the routers (OpenAPI at /docs)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.deps import ApiLimits, ApiState
from api.middleware import AuditMiddleware, BodyLimitMiddleware, install_access_log_redaction
from api.routers import alerts, audit, dashboard, events, health, ingest, metrics, plots, silences, stats
from pipeline.config import Settings, load_settings
from pipeline.schema import StoreError
from pipeline.store import Store

log = logging.getLogger(__name__)

ROUTERS = [health, alerts, silences, events, stats, plots, ingest, metrics, audit, dashboard]

DESCRIPTION = """Alerts, events, stats and plots of a mailwarden store, and a push endpoint for log shippers.

Every endpoint but `/health` needs an API key (`mailwarden apikey create --scope …`), sent as
`X-API-Key: mwk_…` or `Authorization: Bearer mwk_…`. Every request is written to the audit log;
an address that presents wrong keys too often is refused with 429 for a while."""


async def _unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    # A parameter the database cannot compare with (PostgreSQL: a NUL character in text) is the
    # caller's mistake, not an outage.
    return JSONResponse({"detail": "a parameter holds a value the store cannot use (e.g. a NUL character)"},
                        status_code=422)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("store error on %s %s: %s", request.method, request.url.path, str(exc).splitlines()[:1])
    return JSONResponse({"detail": "the store is unavailable; retry later"}, status_code=503)


def create_app(
    settings: Settings | None = None, *, store: Store | None = None, limits: ApiLimits | None = None
) -> FastAPI:
    """The API on `settings.database_url` (or on `store`, which the caller then owns and closes)."""
    settings = settings or load_settings()
    install_access_log_redaction()
    owned = store is None
    store = store if store is not None else Store.open(settings.database_url)
    state = ApiState.build(settings, store, limits or ApiLimits())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            store.close()

    app = FastAPI(title="mailwarden", version=health.VERSION, description=DESCRIPTION, lifespan=lifespan)
    app.state.api = state
    for module in ROUTERS:
        app.include_router(module.router)
    app.add_exception_handler(StoreError, _store_unavailable)
    app.add_exception_handler(sa.exc.OperationalError, _store_unavailable)
    app.add_exception_handler(sa.exc.DataError, _unstorable_value)
    # Added last = runs first: the audit sees every answer, the 413s of the body limit included.
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(AuditMiddleware, state=state)
    return app
