"""Pushed log batches (POST /ingest): body to lines, and lines to stored events, idempotently.

Shippers send what their HTTP outputs send: plain newline-delimited lines (Vector `codec=text`,
rsyslog omhttp `batch.format=newline`), a JSON array of strings or records (Fluent Bit `json`,
rsyslog `jsonarray`), NDJSON (Fluent Bit `json_lines`), or our own `{"format", "batch_id", "lines"}`.
A record's line is its `message` (Vector), `log` (Fluent Bit) or `msg` (rsyslog) field; a record
without one is itself the line, as a JSON log line.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.config import Settings
from pipeline.jobs import SNIFF_LINES, choose_parser, prepare_batch
from pipeline.sources import FileIdentity, LineBatch
from pipeline.store import Store

MESSAGE_FIELDS = ("message", "log", "msg")
NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonlines", "application/x-jsonlines",
     "application/json-lines"}
)
BATCH_ID_MAX = 200
_TERMINATOR = re.compile(r"\r\n|\r|\n")


class PushError(Exception):
    """A request the API refuses, with the HTTP status that says why (400, 413, 415)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PushBatch:
    lines: list[str]
    fmt: str | None = None
    batch_id: str | None = None


@dataclass
class PushResult:
    batch_id: str
    format: str
    lines: int
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)


def split_lines(text: str) -> list[str]:
    """Lines as the file sources cut them (LF, CRLF or a bare CR); a final terminator ends the
    last line rather than starting an empty one."""
    if not text:
        return []
    parts = _TERMINATOR.split(text)
    if parts[-1] == "":
        parts.pop()
    return parts


def _clean(text: str) -> str:
    # JSON strings may hold lone surrogates that no database accepts; they become \udxxx text.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _decode(body: bytes) -> str:
    # Like the file sources: invalid UTF-8 bytes become \xNN escapes, never an error.
    return body.decode("utf-8", "backslashreplace").removeprefix("\ufeff")


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body, refusing (413) once the output passes `limit`: no zip bombs."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    out = bytearray()
    data = body
    try:
        while True:
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise PushError(413, f"body inflates to more than {limit} bytes")
            data = inflater.unconsumed_tail
            if not data:
                break
        out += inflater.flush()
    except zlib.error as exc:
        raise PushError(400, f"body is not valid gzip: {exc}") from None
    if len(out) > limit:
        raise PushError(413, f"body inflates to more than {limit} bytes")
    if not inflater.eof:
        raise PushError(400, "gzip body is cut short")
    return bytes(out)


def _record_lines(item: Any) -> list[str]:
    if isinstance(item, str):
        return [_clean(line) for line in split_lines(item)] or [""]
    if isinstance(item, dict):
        for name in MESSAGE_FIELDS:
            if isinstance(item.get(name), str):
                return _record_lines(item[name])
    return [_clean(json.dumps(item, ensure_ascii=False, separators=(",", ":")))]


def parse_body(body: bytes, content_type: str | None) -> PushBatch:
    """The lines (and any format and batch id) a request body carries."""
    media = (content_type or "text/plain").split(";")[0].strip().lower()
    if media == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PushError(400, f"body is not valid JSON: {exc}") from None
        if isinstance(doc, dict) and "lines" in doc:
            lines = doc["lines"]
            if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
                raise PushError(400, '"lines" must be a list of strings')
            fmt, batch_id = doc.get("format"), doc.get("batch_id")
            if not isinstance(fmt, (str, type(None))) or not isinstance(batch_id, (str, type(None))):
                raise PushError(400, '"format" and "batch_id" must be strings')
            return PushBatch([line for x in lines for line in _record_lines(x)], fmt, batch_id)
        items = doc if isinstance(doc, list) else [doc]
        return PushBatch([line for item in items for line in _record_lines(item)])
    if media in NDJSON_TYPES:
        lines = []
        for raw in split_lines(_decode(body)):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if isinstance(record, dict) and any(isinstance(record.get(n), str) for n in MESSAGE_FIELDS):
                lines.extend(_record_lines(record))
            else:
                lines.append(raw)  # the record is itself the log line (e.g. a JSON access log)
        return PushBatch(lines)
    if media.startswith("text/") or media in ("application/octet-stream", "application/x-www-form-urlencoded"):
        return PushBatch(split_lines(_decode(body)))
    raise PushError(415, f"unsupported content type {media!r} (text/plain, application/json or application/x-ndjson)")


def check_batch_id(batch_id: str | None) -> str | None:
    if batch_id is None or batch_id == "":
        return None
    if len(batch_id) > BATCH_ID_MAX or not batch_id.isprintable():
        raise PushError(400, f"batch_id must be 1 to {BATCH_ID_MAX} printable characters")
    return batch_id


def batch_source(batch_id: str | None, key_id: str, lines: list[str]) -> tuple[str, str]:
    """(source key for event ids, label for `origin`) of a pushed batch.

    A client's batch id names the batch within that client's key: two shippers both counting
    batches from 1 must not swallow each other's lines. Without one, the lines' hash is the
    identity, so a retried body (with any encoding) is stored once.
    """
    if batch_id is not None:
        key = hashlib.sha256(f"push\0{key_id}\0{batch_id}".encode()).hexdigest()
        return key[:32], batch_id
    digest = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()
    key = hashlib.sha256(f"push-body\0{digest}".encode()).hexdigest()
    return key[:32], f"sha256:{digest[:16]}"


def store_lines(
    store: Store,
    settings: Settings,
    lines: list[str],
    fmt: str,
    source_key: str,
    label: str,
    now: datetime | None = None,
) -> PushResult:
    """Parse and store one pushed batch exactly as a file batch: same parsers, same quarantine,
    event id = source key + line index."""
    now = now or datetime.now(timezone.utc)
    parser, name = choose_parser(fmt, lines[:SNIFF_LINES], settings, now)
    result = PushResult(batch_id=label, format=name if parser else "unrecognised", lines=len(lines))
    if not lines:
        return result
    batch = LineBatch(
        identity=FileIdentity(key=source_key, dev=0, inode=0, first_line_hash=""),
        path=f"push:{label}",
        lines=lines,
        offsets=list(range(len(lines))),
        end_offset=len(lines),
        line_numbers=list(range(1, len(lines) + 1)),
        is_gzip=False,
    )
    frame, quarantined = prepare_batch(batch, parser, name, source_key)
    written = store.write_batch(frame, quarantined, None)
    result.stored, result.duplicates, result.quarantined = written.inserted, written.duplicates, written.quarantined
    result.reasons.update(q["reason"] for q in quarantined)
    return result
