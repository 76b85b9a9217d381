"""The dashboard: the page at / and its static files (plotly.js served by us, never a CDN), open to
all because they hold no data; the data comes from the authenticated API, plus /dashboard/range."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse

from api.auth import Scope
from api.deps import StoreDep, require
from api.frames import FrameReader
from dashboards import static
from dashboards.figures import OVERVIEW

router = APIRouter(tags=["dashboard"])

# Everything the page loads comes from this service; plotly needs inline style attributes.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    media_type: str


@lru_cache(maxsize=None)
def asset(name: str) -> Asset | None:
    """A static file by name, with its gzip form and ETag computed once per process."""
    if name == "plotly.min.js":
        text = static.dashboard_plotly_js()
    elif name in ("dashboard.js", "dashboard.css"):
        text = static.template(name)
    else:
        return None
    body = text.encode("utf-8")
    return Asset(
        body=body,
        # Level 6: plotly.js shrinks from 4.8 MB to about 1.4 MB in a fraction of a second, once.
        gzipped=gzip.compress(body, compresslevel=6, mtime=0),
        etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
        media_type=MEDIA_TYPES[name[name.rfind("."):]],
    )


@lru_cache(maxsize=1)
def index_html() -> str:
    return static.template("index.html").replace(
        '<main id="view"', f'<main id="view" data-figures="{",".join(OVERVIEW)}"', 1
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    """The dashboard page; it asks for an API key and then calls the API with it."""
    return HTMLResponse(index_html(), headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str, request: Request) -> Response:
    """plotly.min.js (from the installed plotly package), dashboard.js and dashboard.css."""
    found = asset(name)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")
    headers = {"ETag": found.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding",
               "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == found.etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(found.gzipped, media_type=found.media_type, headers={**headers, "Content-Encoding": "gzip"})
    return Response(found.body, media_type=found.media_type, headers=headers)


@router.get("/dashboard/range", dependencies=[Depends(require(Scope.EVENTS_READ))], tags=["dashboard"])
def stored_range(store: StoreDep) -> dict[str, str | None]:
    """The first and last stored event times (UTC): the dashboard's ranges are relative to the last."""
    stored = FrameReader(store).stored_range()
    if stored is None:
        return {"first": None, "last": None}
    return {"first": stored[0].isoformat(), "last": stored[1].isoformat()}
