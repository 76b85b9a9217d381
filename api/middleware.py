"""ASGI middleware: every request audited (who, when, what, answer) and counted; bodies bounded."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

import anyio

from api.auth import client_address
from pipeline.privacy import redact_text
from api.deps import AUDIT_KEY, ApiState, AuditContext

log = logging.getLogger(__name__)

# Bodies of requests other than POST /ingest (which has its own, larger limit) are small JSON.
DEFAULT_BODY_LIMIT = 1 << 20
# Longest path+query and user agent kept per audit row.
PATH_LIMIT = 2000
AGENT_LIMIT = 512


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _text(value: str | None, limit: int) -> str | None:
    """A column-safe copy: PostgreSQL text cannot hold NUL, and a request that smuggles one in
    (a decoded `%00` in the path) must still be audited."""
    if value is None:
        return None
    return value.replace("\x00", "\\x00")[:limit]


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "server_error"


class AuditMiddleware:
    """Plain ASGI (no response buffering): notes the status sent, then writes the audit row."""

    def __init__(self, app: Any, state: ApiState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        peer = scope["client"][0] if scope.get("client") else None
        ctx = AuditContext(client=client_address(peer, _header(scope, b"x-forwarded-for"), self.state.trusted_proxies))
        scope[AUDIT_KEY] = ctx
        started = time.perf_counter()
        when = datetime.now(timezone.utc)
        status = 500

        async def send_noting_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = 500
            raise
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.state.metrics.inc(
                "mailwarden_api_requests_total", method=scope["method"], route=template, status=str(status)
            )
            self.state.metrics.observe("mailwarden_api_request_duration_seconds", seconds, route=template)
            query = scope.get("query_string", b"").decode("latin-1")
            # A key or password pasted into a query string must not come to rest in the audit table.
            path = redact_text(scope.get("path", "") + (f"?{query}" if query else ""))
            entry = {
                "ts": when,
                "client_ip": ctx.client,
                "key_id": ctx.key_id,
                "key_name": ctx.key_name,
                "method": scope["method"][:16],
                "path": _text(path, PATH_LIMIT),
                "status": status,
                "outcome": ctx.outcome or _outcome(status),
                "detail": _text(ctx.detail, PATH_LIMIT),
                "duration_ms": round(seconds * 1000, 3),
                "user_agent": _text(_header(scope, b"user-agent"), AGENT_LIMIT) or None,
            }
            try:
                await anyio.to_thread.run_sync(self.state.queries.write_audit, entry)
            except Exception as exc:  # an audit hiccup must not turn an answered request into an error
                log.warning("could not write the audit row for %s %s: %s", entry["method"], entry["path"], exc)


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses (413) request bodies over `limit` bytes before a handler buffers them: FastAPI
    reads a JSON body before running the dependencies that check the key."""

    def __init__(self, app: Any, limit: int = DEFAULT_BODY_LIMIT, exempt: tuple[str, ...] = ("/ingest",)):
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "") in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length") or ""
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def noting_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = b'{"detail":"request body too large"}'
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class RedactAccessLog(logging.Filter):
    """Redacts secrets in the request line of uvicorn's access log, as the audit table does."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access logs (client, method, path with query, http version, status).
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_text(args[2]), *args[3:])
        return True


def install_access_log_redaction() -> None:
    """Attach the redacting filter once to uvicorn's access logger (idempotent)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactAccessLog) for f in logger.filters):
        logger.addFilter(RedactAccessLog())
