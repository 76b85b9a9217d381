"""Signatures of the signed chat formats, with the matching verify functions receivers and tests use.

Pure: every function takes the timestamp it signs; none reads the clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

from pipeline.schema import ConfigError

WHSEC_PREFIX = "whsec_"
# Standard Webhooks recommends 24 to 64 random bytes; fewer than 16 is too weak to accept.
WHSEC_MIN_BYTES = 16
# Receivers reject signatures older than this (Standard Webhooks suggests 5 min; Feishu and DingTalk 1 h).
STANDARD_WEBHOOKS_TOLERANCE_S = 300
CHAT_TOLERANCE_S = 3600


# ---- Feishu / Lark custom bot -------------------------------------------------------------------
def feishu_sign(secret: str, timestamp: int) -> str:
    """Feishu's scheme is unusual: the key is "{timestamp}\\n{secret}" and the message is empty."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def feishu_verify(secret: str, timestamp: int | str, sign: str, now_s: int | None = None) -> bool:
    """True when `sign` is the bot signature of `timestamp` (seconds) and, given `now_s`, it is fresh."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if now_s is not None and abs(now_s - ts) > CHAT_TOLERANCE_S:
        return False
    return hmac.compare_digest(feishu_sign(secret, ts), str(sign))


# ---- DingTalk robot -----------------------------------------------------------------------------
def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """base64(HMAC-SHA256(key=secret, msg="{timestamp_ms}\\n{secret}")), not yet URL-encoded."""
    msg = f"{timestamp_ms}\n{secret}".encode()
    return base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


def dingtalk_signed_url(url: str, secret: str, timestamp_ms: int) -> str:
    """The webhook URL with `timestamp` and `sign` set; any earlier pair is replaced, never appended
    again (appending on every send grows the URL until DingTalk answers "URI too large")."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("timestamp", "sign")]
    encoded = urlencode(query, quote_via=quote_plus)
    sign = quote_plus(dingtalk_sign(secret, timestamp_ms))
    extra = f"timestamp={timestamp_ms}&sign={sign}"
    return urlunsplit(parts._replace(query=f"{encoded}&{extra}" if encoded else extra))


def dingtalk_verify_url(url: str, secret: str, now_ms: int | None = None) -> bool:
    """True when the URL carries a valid DingTalk `timestamp`/`sign` pair (fresh, given `now_ms`)."""
    params = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    try:
        ts = int(params["timestamp"])
        sign = params["sign"]
    except (KeyError, ValueError):
        return False
    if now_ms is not None and abs(now_ms - ts) > CHAT_TOLERANCE_S * 1000:
        return False
    return hmac.compare_digest(dingtalk_sign(secret, ts), sign)


# ---- Standard Webhooks (generic JSON) -----------------------------------------------------------
def whsec_key(secret: str) -> bytes:
    """The HMAC key inside a `whsec_<base64>` secret. The error never repeats the secret."""
    if not secret.startswith(WHSEC_PREFIX):
        raise ConfigError("a Standard Webhooks secret must look like whsec_<base64 of 24-64 random bytes>")
    try:
        key = base64.b64decode(secret[len(WHSEC_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("the Standard Webhooks secret after whsec_ is not valid base64") from None
    if len(key) < WHSEC_MIN_BYTES:
        raise ConfigError(f"the Standard Webhooks secret decodes to {len(key)} bytes; use at least 24")
    return key


def standard_webhooks_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, the webhook-signature header value."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    digest = hmac.new(whsec_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def standard_webhooks_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_webhooks_signature(secret, msg_id, timestamp, body),
    }


def standard_webhooks_verify(
    secret: str, headers: Mapping[str, str], body: bytes, now_s: int | None = None
) -> bool:
    """What a receiver does: any `v1,` entry of the space-separated header must match, in constant time."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        ts = int(lowered["webhook-timestamp"])
        offered = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if now_s is not None and abs(now_s - ts) > STANDARD_WEBHOOKS_TOLERANCE_S:
        return False
    expected = standard_webhooks_signature(secret, msg_id, ts, body)
    # compare_digest on every entry (no early exit) keeps the time independent of which one matched.
    matches = [hmac.compare_digest(expected, entry) for entry in offered if entry.startswith("v1,")]
    return any(matches)


def new_whsec(random_bytes: bytes) -> str:
    """Format random bytes (from `secrets.token_bytes(32)`) as a secret receivers can paste."""
    return WHSEC_PREFIX + base64.b64encode(random_bytes).decode()
