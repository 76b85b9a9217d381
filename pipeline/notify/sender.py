"""Sends one prepared message and says what happened, platform by platform; errors never hold secrets."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs, urlsplit

import httpx

from pipeline.notify.builders import Prepared, build
from pipeline.notify.routes import Route
from pipeline.schema import Alert, EntityKind, NotifyError, Severity

# Longest wait a receiver may impose through Retry-After before we cap it (and try again then).
MAX_RETRY_AFTER_S = 3600.0
# DingTalk mutes a robot for 10 minutes after it exceeds 20 messages a minute.
DINGTALK_MUTE_S = 600.0
# Error bodies are cut to this in the delivery log.
ERROR_SNIPPET = 200

_TEAMS_WRAPPED = re.compile(r"HTTP error (\d{3})")
# Feishu custom bot codes meaning "slow down": 11232 is its frequency limit; 9499 covers
# generic throttling; msg text is checked too because codes are poorly documented.
_FEISHU_THROTTLED = {11232, 9499}
# DingTalk: 130101 "send too fast, exceed 20 times per minute"; 90018 / -1 are transient.
_DINGTALK_THROTTLED = {130101}
_DINGTALK_TRANSIENT = {-1, 90018}
# WeCom: 45009 "api freq out of limit", 45033 concurrency, -1 "system busy".
_WECOM_THROTTLED = {45009, 45033}
_WECOM_TRANSIENT = {-1}


@dataclass
class SendResult:
    ok: bool
    retryable: bool
    status_code: int | None
    retry_after: float | None = None
    error: str | None = None
    duration_ms: float = 0.0
    # The receiver asked us to slow down (429 or a throttling code): pause the whole destination.
    throttled: bool = False

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise NotifyError(self.error or "delivery failed", retryable=self.retryable)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Remove every credential (and its query string, which holds DingTalk/WeCom tokens) from text."""
    out = text
    for secret in secrets:
        if not secret:
            continue
        parts = urlsplit(secret)
        # The whole value, then the pieces a message may quote alone: path (Slack, Discord, Feishu
        # tokens) and query (DingTalk access_token, WeCom key).
        query = parse_qs(parts.query)
        candidates = {secret, parts.path, parts.query, *query.get("access_token", []), *query.get("key", [])}
        for candidate in sorted(candidates, key=len, reverse=True):
            if len(candidate) >= 6:
                out = out.replace(candidate, "<redacted>")
    # URLs in exception texts (httpx names the request URL) are cut to their host.
    return re.sub(r"(https?://[^/\s'\"]+)[^\s'\"]*", r"\1/<redacted>", out)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - now).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _cut(text: str, secrets: Iterable[str]) -> str:
    """Scrub, then shorten: cutting first could leave half a token that no longer matches."""
    return redact(text.strip().replace("\n", " "), secrets)[:ERROR_SNIPPET]


def _json_body(response: httpx.Response) -> dict:
    try:
        data = json.loads(response.content or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def classify(kind: str, response: httpx.Response, now: datetime, secrets: Iterable[str] = ()) -> SendResult:
    """Delivered, worth retrying, or failed for good, from status, headers and body."""
    secrets = list(secrets)
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
    if status == 429:
        if retry_after is None and kind == "discord":
            # Discord also puts the wait (float seconds) in the JSON body.
            body_wait = _json_body(response).get("retry_after")
            if isinstance(body_wait, (int, float)):
                retry_after = min(max(float(body_wait), 0.0), MAX_RETRY_AFTER_S)
        error = f"HTTP 429 rate limited: {_cut(response.text, secrets)}"
        return SendResult(False, True, status, retry_after, error, throttled=True)
    if status in (408, 425) or status >= 500:
        return SendResult(False, True, status, retry_after, f"HTTP {status}: {_cut(response.text, secrets)}")
    if status >= 400:
        return SendResult(False, False, status, None, f"HTTP {status}: {_cut(response.text, secrets)}")
    if 300 <= status < 400:
        # Redirects are not followed (see make_client): the configured URL must be updated.
        return SendResult(False, False, status, None, f"HTTP {status}: the webhook redirects; configure its new URL")
    if status < 200 or status >= 300:
        return SendResult(False, True, status, retry_after, f"unexpected HTTP {status}")
    check = _BODY_CHECKS.get(kind)
    return check(response, status, secrets) if check else SendResult(True, False, status)


def _teams_body(response: httpx.Response, status: int, secrets: list[str]) -> SendResult:
    # Teams connectors answer 200 and put the real outcome in text: "Webhook message delivery
    # failed with error: Microsoft Teams endpoint returned HTTP error 429 ...".
    text = response.text
    if "delivery failed" not in text and "ApplicationThrottled" not in text:
        return SendResult(True, False, status)
    match = _TEAMS_WRAPPED.search(text)
    inner = int(match.group(1)) if match else 429 if "Throttled" in text else 500
    retryable = inner == 429 or inner >= 500 or inner in (408, 425)
    error = f"Teams reported HTTP {inner} in a 200 body"
    return SendResult(False, retryable, status, None, error, throttled=inner == 429)


def _feishu_body(response: httpx.Response, status: int, secrets: list[str]) -> SendResult:
    data = _json_body(response)
    code = data.get("code", data.get("StatusCode", 0))
    if code in (0, None):
        return SendResult(True, False, status)
    msg = _cut(str(data.get("msg", data.get("StatusMessage", ""))), secrets)
    throttled = code in _FEISHU_THROTTLED or "frequency" in msg.lower() or "limit" in msg.lower()
    return SendResult(False, throttled, status, None, f"Feishu code {code}: {msg}", throttled=throttled)


def _errcode_body(name: str, throttled_codes: set[int], transient: set[int], mute_s: float | None):
    def check(response: httpx.Response, status: int, secrets: list[str]) -> SendResult:
        data = _json_body(response)
        code = data.get("errcode", 0)
        if code in (0, None):
            return SendResult(True, False, status)
        msg = _cut(str(data.get("errmsg", "")), secrets)
        throttled = code in throttled_codes
        retryable = throttled or code in transient
        wait = mute_s if throttled else None
        return SendResult(False, retryable, status, wait, f"{name} errcode {code}: {msg}", throttled=throttled)

    return check


_BODY_CHECKS = {
    "teams": _teams_body,
    "feishu": _feishu_body,
    "dingtalk": _errcode_body("DingTalk", _DINGTALK_THROTTLED, _DINGTALK_TRANSIENT, DINGTALK_MUTE_S),
    "wecom": _errcode_body("WeCom", _WECOM_THROTTLED, _WECOM_TRANSIENT, 60.0),
}


class _ScrubRequestLines(logging.Filter):
    """httpx logs "HTTP Request: POST <full URL>" at INFO; a webhook URL is a credential, so the
    line keeps the host only. Installed on the "httpx" logger the first time we make a client."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("HTTP Request:") and isinstance(record.args, tuple):
            record.args = tuple(_host_only(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


def _host_only(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}/<redacted>"


_client_lock = threading.Lock()
_shared: httpx.Client | None = None


def make_client() -> httpx.Client:
    """A client (connection pool). Redirects are not followed: a webhook that redirects is
    misconfigured, and following would re-send the signed body to another host."""
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _ScrubRequestLines) for f in httpx_log.filters):
        httpx_log.addFilter(_ScrubRequestLines())
    return httpx.Client(follow_redirects=False, timeout=httpx.Timeout(10.0, connect=5.0))


def shared_client() -> httpx.Client:
    """One client for the process: building one loads the CA bundle (~50 ms), and keep-alive
    connections to Slack or Teams are reused between scheduler runs."""
    global _shared
    with _client_lock:
        if _shared is None or _shared.is_closed:
            _shared = make_client()
        return _shared


def send(
    client: httpx.Client,
    kind: str,
    message: Prepared,
    now: datetime,
    timeout: float = 10.0,
    secrets: Iterable[str] = (),
) -> SendResult:
    """POST the message once. Network failures are retryable results, not exceptions."""
    secrets = list(secrets)
    started = time.perf_counter()
    try:
        response = client.post(
            message.url,
            content=message.body,
            headers=message.headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        )
    except httpx.TimeoutException as exc:
        result = SendResult(False, True, None, None, f"timeout: {type(exc).__name__}")
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        # Retrying cannot fix the URL; the operator must.
        result = SendResult(False, False, None, None, f"invalid webhook URL: {type(exc).__name__}")
    except httpx.HTTPError as exc:
        result = SendResult(False, True, None, None, f"{type(exc).__name__}: {redact(str(exc), secrets)}"[:300])
    else:
        result = classify(kind, response, now, secrets)
    result.duration_ms = (time.perf_counter() - started) * 1000.0
    if result.error:
        result.error = redact(result.error, secrets)
    return result


def sample_alert(now: datetime) -> Alert:
    """A harmless alert about a documentation address (RFC 5737), clearly labelled as a test."""
    end = now.astimezone(timezone.utc)
    return Alert(
        detector="mailwarden_test",
        severity=Severity.HIGH,
        entity_kind=EntityKind.IP,
        entity="192.0.2.1",
        window_start=end - timedelta(minutes=10),
        window_end=end,
        score=1.0,
        title="Test alert from mailwarden: this route works (192.0.2.1 is a documentation address)",
        evidence={"note": "sent by `mailwarden notify test`; no action needed"},
    )


def send_test(route: Route, now: datetime, client: httpx.Client | None = None) -> SendResult:
    """Build and send the sample alert to one route, bypassing its filters and the outbox."""
    message = build([sample_alert(now)], route, now)
    http = client or shared_client()
    return send(http, route.kind, message, now, timeout=route.timeout, secrets=route.secret_values())
