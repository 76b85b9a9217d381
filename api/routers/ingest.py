"""POST /ingest: log shippers push batches of raw lines; parsed, quarantined and deduplicated like files."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool

from api.auth import Scope
from api.deps import Ingester, StateDep, require
from api.push import PushError, batch_source, check_batch_id, gunzip, parse_body, store_lines
from api.schemas import IngestBody, IngestOut
from pipeline.schema import ConfigError

router = APIRouter(prefix="/ingest", tags=["ingest"], dependencies=[Depends(require(Scope.INGEST))])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "text/plain": {"schema": {"type": "string"}, "example": "203.0.113.9 - - [30/Nov/2026:14:03:11 +0000] ..."},
            "application/json": {"schema": IngestBody.model_json_schema()},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }
}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: never buffered beyond it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PushError(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PushError(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        body = gunzip(body, limit)
    elif encoding not in ("identity", ""):
        raise PushError(415, f"unsupported content encoding {encoding!r} (gzip or none)")
    return body


@router.post("", response_model=IngestOut, openapi_extra=_BODY_DOC)
async def ingest(
    request: Request,
    state: StateDep,
    principal: Ingester,
    format_: Annotated[
        str | None, Query(alias="format", description="auto (default), combined, json, smtp-auth")
    ] = None,
    batch_id: Annotated[
        str | None, Query(description="The client's id for this batch: resending it is a no-op.")
    ] = None,
    x_batch_id: Annotated[
        str | None, Header(description="Alternative to ?batch_id= for shippers that set headers.")
    ] = None,
) -> IngestOut:
    """Store a batch of raw log lines (plain, JSON or NDJSON body, optionally gzip).

    Event ids come from the batch id (scoped to the calling key) or, without one, from a hash
    of the lines, plus the line index: retrying a batch stores nothing twice.
    """
    limits = state.limits
    try:
        body = await read_body(request, limits.max_ingest_bytes)
        pushed = parse_body(body, request.headers.get("content-type"))
        fmt = pushed.fmt or format_ or "auto"
        if len(pushed.lines) > limits.max_ingest_lines:
            raise PushError(413, f"more than {limits.max_ingest_lines} lines in one batch")
        client_batch = check_batch_id(pushed.batch_id or batch_id or x_batch_id)
    except PushError as exc:
        raise HTTPException(exc.status, exc.message) from None
    source_key, label = batch_source(client_batch, principal.key_id, pushed.lines)
    try:
        result = await run_in_threadpool(store_lines, state.store, state.settings, pushed.lines, fmt, source_key, label)
    except ConfigError as exc:  # an unknown format, named with the known ones
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    metrics = state.metrics
    metrics.inc("mailwarden_ingest_lines_total", result.lines, format=result.format)
    metrics.inc("mailwarden_ingest_events_stored_total", result.stored, format=result.format)
    metrics.inc("mailwarden_ingest_duplicates_total", result.duplicates, format=result.format)
    metrics.inc("mailwarden_ingest_quarantined_total", result.quarantined, format=result.format)
    return IngestOut(
        batch_id=result.batch_id,
        format=result.format,
        lines=result.lines,
        stored=result.stored,
        duplicates=result.duplicates,
        quarantined=result.quarantined,
        reasons=dict(result.reasons),
    )
