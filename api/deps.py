"""Typed dependencies of the handlers: the app's state, the store, and the authenticated caller."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cache
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.auth import FailureLimiter, KeyRing, Network, Principal, Scope
from api.metrics import Metrics
from api.queries import ApiQueries, as_utc
from pipeline.config import Settings
from pipeline.store import Store, make_engine


@dataclass(frozen=True)
class ApiLimits:
    """The API's guard rails; defaults suit one service's logs on one database."""

    # Hard cap on rows in one /events page (a larger `limit` is cut to it).
    max_event_rows: int = 1000
    # Rows read per /events call when a CIDR is checked row by row after the SQL pre-filter.
    event_scan_rows: int = 100_000
    # POST /ingest: body bytes (after gzip) and lines per request.
    max_ingest_bytes: int = 10 << 20
    max_ingest_lines: int = 100_000
    # Failed authentications allowed per client (IPv4 address, IPv6 /64) per window.
    auth_failures: int = 10
    auth_window_seconds: float = 60.0
    max_alerts_page: int = 500


@dataclass
class ApiState:
    """Everything the handlers share, built once by create_app."""

    settings: Settings
    store: Store
    queries: ApiQueries
    keys: KeyRing
    limiter: FailureLimiter
    metrics: Metrics
    limits: ApiLimits
    trusted_proxies: list[Network] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, store: Store, limits: ApiLimits) -> ApiState:
        if settings.read_database_url and store.read_engine is store.engine:
            # API replicas read events from MAILWARDEN_READ_DATABASE_URL; Store.close disposes it.
            store.read_engine = make_engine(settings.read_database_url)
        return cls(
            settings=settings,
            store=store,
            queries=ApiQueries(store),
            keys=KeyRing(store.engine),
            limiter=FailureLimiter(limits.auth_failures, limits.auth_window_seconds),
            metrics=Metrics(),
            limits=limits,
            trusted_proxies=[ipaddress.ip_network(c, strict=False) for c in settings.trusted_proxies],
        )


AUDIT_KEY = "mailwarden.audit"


@dataclass
class AuditContext:
    """What the audit log records about one request; filled in as the request is handled."""

    client: str = "unknown"
    key_id: str | None = None
    key_name: str | None = None
    outcome: str | None = None
    detail: str | None = None


# The dependencies that only look things up are `async def`: FastAPI runs a plain `def` dependency
# in its thread pool, and six such hops per request were most of a light request's latency.
async def get_state(request: Request) -> ApiState:
    return request.app.state.api


StateDep = Annotated[ApiState, Depends(get_state)]


async def get_store(state: StateDep) -> Store:
    return state.store


async def get_queries(state: StateDep) -> ApiQueries:
    return state.queries


StoreDep = Annotated[Store, Depends(get_store)]
QueriesDep = Annotated[ApiQueries, Depends(get_queries)]


def audit_context(request: Request) -> AuditContext:
    ctx = request.scope.get(AUDIT_KEY)
    if ctx is None:  # only when the audit middleware is not installed (never in create_app)
        ctx = request.scope[AUDIT_KEY] = AuditContext(client=request.client.host if request.client else "unknown")
    return ctx


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key: mwk_…")
_bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")


def authenticate(
    request: Request,
    state: StateDep,
    x_api_key: Annotated[str | None, Security(_api_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Principal:
    """The caller's key, checked; 429 while its address is locked out, 401 for no or a wrong key."""
    ctx = audit_context(request)
    wait = state.limiter.retry_after(ctx.client)
    if wait is not None:
        # Checked before the key, so a locked-out client learns nothing, even from a right guess.
        ctx.outcome = "rate_limited"
        state.metrics.inc("mailwarden_api_rate_limited_total")
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many failed authentications from this address; retry later",
            headers={"Retry-After": str(wait)},
        )
    raw = (x_api_key or (bearer.credentials if bearer else "") or "").strip()
    if not raw:
        ctx.outcome = "missing_key"
        state.metrics.inc("mailwarden_api_auth_failures_total", reason="missing_key")
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "an API key is required (header X-API-Key or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal, reason = state.keys.verify(raw)
    if principal is None:
        state.limiter.record_failure(ctx.client)
        ctx.outcome = reason
        state.metrics.inc("mailwarden_api_auth_failures_total", reason=reason)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    ctx.key_id, ctx.key_name = principal.key_id, principal.name
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


@cache
def require(scope: Scope) -> Callable[..., Principal]:
    """A dependency admitting only keys with `scope` (403 otherwise); one function per scope, so
    FastAPI runs each check once per request however many places declare it."""

    async def check(request: Request, principal: PrincipalDep) -> Principal:
        if not principal.allows(scope):
            ctx = audit_context(request)
            ctx.outcome, ctx.detail = "forbidden", f"missing scope {scope.value}"
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this key lacks the {scope.value} scope")
        return principal

    check.__name__ = f"require_{scope.value.replace(':', '_')}"
    return check


def check_range(since: datetime | None, until: datetime | None) -> None:
    """A reversed range is a mistake to report (422), not an empty answer."""
    if since is not None and until is not None and as_utc(since) > as_utc(until):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "since is after until")


def split_values(values: list[str] | None) -> list[str]:
    """Repeated parameters and comma-separated lists both work: ?status=open&status=acknowledged
    or ?status=open,acknowledged."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


AlertsReader = Annotated[Principal, Depends(require(Scope.ALERTS_READ))]
AlertsWriter = Annotated[Principal, Depends(require(Scope.ALERTS_WRITE))]
EventsReader = Annotated[Principal, Depends(require(Scope.EVENTS_READ))]
Ingester = Annotated[Principal, Depends(require(Scope.INGEST))]
MetricsReader = Annotated[Principal, Depends(require(Scope.METRICS_READ))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
