"""Keep secrets out of the store: key fingerprints, URL redaction, hashed addresses (vectorised)."""

from __future__ import annotations

import hashlib
import hmac

import polars as pl

REDACTED = "REDACTED"

# Query parameters whose value is a credential. Mail APIs and their SDKs use all of these.
# A separator may come percent-encoded (`api%5Fkey`): clients encode more than they must.
_SEP = "(?:[_-]|%5[Ff]|%2[Dd])"
SECRET_PARAMS = (
    f"api{_SEP}?key|apikey|key|token|access{_SEP}?token|refresh{_SEP}?token|id{_SEP}?token|auth|"
    f"authorization|password|passwd|pwd|pass|secret|client{_SEP}?secret|sig|signature|x{_SEP}api{_SEP}key"
)
_SECRET_QUERY = rf"(?i)([?&;](?:{SECRET_PARAMS})=)[^&;#\s]+"
_USERINFO = r"(//)[^/@\s:]+:[^/@\s]+@"  # https://user:pass@host/...
_EMAIL = r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
# Path segments that are ids, so `/v3/messages/8f1c…` and `/v3/messages/9a2b…` count as one path.
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_ID_SEGMENT = rf"/(?:{_UUID}|[0-9a-fA-F]{{16,}}|[0-9]{{3,}}|[A-Za-z0-9_-]{{24,}})(/|\?|$)"


def fingerprint(secret: str, pepper: bytes) -> str:
    """Keyed fingerprint of an API key: stable per pepper, useless to an attacker without it."""
    return hmac.new(pepper, secret.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:20]


def hash_address(address: str, pepper: bytes) -> str:
    """Recipient addresses are personal data: keep only a keyed hash, case-folded."""
    return "h:" + fingerprint(address.strip().lower(), pepper)[:16]


def fingerprint_expr(column: pl.Expr, pepper: bytes) -> pl.Expr:
    """Fingerprint a column of raw keys; computed once per distinct key, not per row."""
    return column.map_batches(
        lambda s: _fingerprint_series(s, pepper), return_dtype=pl.String, is_elementwise=True
    )


def _fingerprint_series(series: pl.Series, pepper: bytes) -> pl.Series:
    uniques = series.drop_nulls().unique()
    mapping = {k: fingerprint(k, pepper) for k in uniques.to_list() if k not in ("", "-")}
    return series.replace_strict(mapping, default=None, return_dtype=pl.String)


def has_secret_expr(url: pl.Expr) -> pl.Expr:
    """True where the URL carries a credential in its query string or user-info."""
    return url.str.contains(_SECRET_QUERY) | url.str.contains(_USERINFO)


def redact_expr(url: pl.Expr) -> pl.Expr:
    """Replace credential values in a URL with REDACTED and e-mail addresses with {email}."""
    return (
        url.str.replace_all(_SECRET_QUERY, "${1}" + REDACTED)
        .str.replace_all(_USERINFO, "${1}[" + REDACTED + "]@")  # brackets: not mistaken for an e-mail
        .str.replace_all(_EMAIL, "{email}")
    )


def normalise_path_expr(url: pl.Expr) -> pl.Expr:
    """Redact secrets, then fold id-like path segments into `{id}` (twice: ids can be adjacent)."""
    redacted = redact_expr(url)
    return redacted.str.replace_all(_ID_SEGMENT, "/{id}${1}").str.replace_all(_ID_SEGMENT, "/{id}${1}")


# Free text (a quarantined line may be anything): `name=value` and `"name": "value"` for every
# secret-looking name, header lines, bearer tokens, SMTP/IMAP AUTH exchanges (base64 of user and
# password), and the key shapes of the big mail providers and of this product. An unquoted
# `name: value` is left alone (syslog's "dovecot: auth: Debug:" is not a secret) except for the
# password names (PASSWORD_FIELD) and credential headers.
_FREE_SECRET = (
    rf"""(?i)((?:["'](?:{SECRET_PARAMS})["']\s*[=:]|\b(?:{SECRET_PARAMS})\s*=)\s*["'<(]?)[^\s"'&;,<>)]+"""
)
_HEADER_SECRET = r"(?i)(\b(?:x-api-key|api-key|x-auth-token|authorization|proxy-authorization|cookie)\s*:\s*)[^\s\"',;]+"
_BEARER = r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"
# `AUTH PLAIN dXNlcgBwYXNz`, IMAP `a1 AUTHENTICATE PLAIN …`, Dovecot's auth debug `resp=<base64>`.
_AUTH_EXCHANGE = r"(?i)(\bauth(?:enticate)?\s+(?:plain|login|xoauth2|oauthbearer|cram-md5)\s+|\bresp=)[A-Za-z0-9+/=_-]{4,}"
_KEY_SHAPES = (
    r"\b(?:SG\.[\w-]{16,}\.[\w-]{16,}|key-[0-9a-f]{32}|mw_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|(?:sk|pk|rk|mk|ak)_(?:live|test)_[A-Za-z0-9]{12,}|mwk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|gh[pousr]_[A-Za-z0-9]{30,})"
)
# A quoted field that is one long token (no spaces, slashes or colons: not a user agent, a URL or a
# date) is what a custom log_format's `"$http_x_api_key"` looks like when the line did not parse.
_QUOTED_TOKEN = r'"[A-Za-z0-9_.+=-]{24,}"'
# Dovecot can log the tried password ("given password: x", Dovecot 2.4 `password=x`); never keep it.
PASSWORD_FIELD = r"(?i)(\b(?:password|passwd|pass|pwd)\s*[=:]\s*<?)[^\s,>&;)]+"


def redact_text_expr(text: pl.Expr) -> pl.Expr:
    """Redaction for free text such as quarantined raw lines: everything `redact_expr` does, and more."""
    return (
        redact_expr(text)
        .str.replace_all(_BEARER, "${1}" + REDACTED)
        .str.replace_all(_AUTH_EXCHANGE, "${1}" + REDACTED)
        .str.replace_all(_HEADER_SECRET, "${1}" + REDACTED)
        .str.replace_all(_FREE_SECRET, "${1}" + REDACTED)
        .str.replace_all(PASSWORD_FIELD, "${1}" + REDACTED)
        .str.replace_all(_KEY_SHAPES, REDACTED)
        .str.replace_all(_QUOTED_TOKEN, '"' + REDACTED + '"')
    )


def redact_text(text: str) -> str:
    return redact_texts([text])[0]


def redact_texts(texts: list[str]) -> list[str]:
    """Vectorised redaction of a batch of quarantined lines."""
    if not texts:
        return []
    frame = pl.DataFrame({"t": texts}, schema={"t": pl.String})
    return frame.select(redact_text_expr(pl.col("t")))["t"].to_list()
