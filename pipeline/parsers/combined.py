"""nginx/Apache access logs (combined, common or any nginx `log_format`) into events, vectorised."""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import polars as pl

from pipeline.parsers import register
from pipeline.parsers.base import (
    ParseContext,
    ParsedBatch,
    Parser,
    conform,
    empty_events,
    outcome_from_http_status,
)
from pipeline.privacy import fingerprint_expr, has_secret_expr, normalise_path_expr
from pipeline.schema import ConfigError, Flag, Service

# nginx's own presets plus ours ("mailapi": combined with the fields the mail API adds).
LOG_FORMATS: dict[str, str] = {
    "combined": (
        '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
        '"$http_referer" "$http_user_agent"'
    ),
    "common": '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent',
    "mailapi": (
        '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
        '"$http_referer" "$http_user_agent" $request_time $scheme "$http_x_api_key" '
        '"$http_x_forwarded_for"'
    ),
}

# Without a configured format we accept Apache's combined and common (any ident field, not only
# nginx's literal "-") and combined lines with extra fields appended, which is how most sites
# extend the combined format.
_DEFAULT_FORMAT = (
    '$remote_addr $remote_ident $remote_user [$time_local] "$request" $status $body_bytes_sent'
    ' "$http_referer" "$http_user_agent"'
)

_NUMBER = r"[0-9]+|-"
_SECONDS = r"[0-9]+(?:\.[0-9]+)?|-"
# Upstream variables list one value per upstream tried: "0.004, 0.010 : 0.002".
_LIST_SEP = r"(?:, | : )"
_UPSTREAM_SECONDS = rf"(?:[0-9]+(?:\.[0-9]+)?|-)(?:{_LIST_SEP}(?:[0-9]+(?:\.[0-9]+)?|-))*"
_UPSTREAM_STATUS = rf"(?:[0-9]{{3}}|-)(?:{_LIST_SEP}(?:[0-9]{{3}}|-))*"
_TIME_LOCAL = r"[0-9]{1,2}/[A-Za-z]{3}/[0-9]{4}:[0-9]{2}:[0-9]{2}:[0-9]{2} [+-][0-9]{4}"
_TIME_ISO = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:?[0-9]{2})"
)
_FREE_TEXT = ".*?"

# How a variable looks when the format does not put it in quotes or brackets. Character
# classes are spelled [0-9] because \d is Unicode-aware in both regex engines.
_UNQUOTED: dict[str, str] = {
    "remote_addr": r"\S+",
    "realip_remote_addr": r"\S+",
    "remote_ident": r"\S+",
    "remote_user": r"\S+",
    "time_local": _TIME_LOCAL,
    "time_iso8601": _TIME_ISO,
    "msec": r"[0-9]+(?:\.[0-9]+)?",
    "status": r"[0-9]{3}",
    "upstream_status": _UPSTREAM_STATUS,
    "body_bytes_sent": _NUMBER,
    "bytes_sent": _NUMBER,
    "request_length": _NUMBER,
    "connection": _NUMBER,
    "connection_requests": _NUMBER,
    "remote_port": _NUMBER,
    "server_port": _NUMBER,
    "pid": _NUMBER,
    "request_time": _SECONDS,
    "upstream_response_time": _UPSTREAM_SECONDS,
    "upstream_connect_time": _UPSTREAM_SECONDS,
    "upstream_header_time": _UPSTREAM_SECONDS,
    "scheme": r"[A-Za-z][A-Za-z0-9+.-]*|-",
    "request_method": r"[A-Za-z][A-Za-z0-9_-]*|-",
    # Free text may contain spaces; it ends where the next literal of the format starts.
    "request": _FREE_TEXT,
    "http_user_agent": _FREE_TEXT,
    "http_referer": _FREE_TEXT,
    "http_x_forwarded_for": _FREE_TEXT,
    "http_authorization": _FREE_TEXT,
}
_UNKNOWN = r"\S*"

# A format needs one of the time variables; one of the key variables makes every line an API call.
_TIME_VARIABLES = ("time_local", "time_iso8601", "msec")
_KEY_VARIABLES = ("http_x_api_key", "http_authorization")

_VARIABLE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")
_QUOTES = "\"'"
_REGEX_META = set("\\.+*?()|[]{}^$")

# A TLS ClientHello starts with record type 0x16 and version 0x03 0x0n (an SSLv2-style hello
# with 0x80, a length byte, 0x01 0x03); nginx and Apache log such bytes as \xNN text, a decoded
# file may hold them raw.
_TLS_HANDSHAKE = r"^(?:\\x16\\x03|\x16\x03|\\x80\\x[0-9A-Fa-f]{2}\\x01\\x03)"
_CONTROL_CHARS = r"[\x00-\x1F\x7F]|\\x(?:[01][0-9A-Fa-f]|7[Ff])"
_ESCAPED_BYTES = r"\\x[0-9A-Fa-f]{2}"
# HTTP/0.9 requests have no version; the target may hold spaces from a broken client.
_REQUEST_LINE = r"^(?P<method>[A-Z][A-Z0-9_-]*) (?P<url>.+?)(?: HTTP/[0-9]+(?:\.[0-9]+)?)?$"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Already canonical IPv4 needs no Python; everything else goes through ipaddress once per value.
_CANONICAL_IPV4 = rf"^(?:{_OCTET}\.){{3}}{_OCTET}$"
_PORT = re.compile(r":[0-9]{1,5}")
_API_PATH = r"^/v[0-9]"
_AUTH_SCHEME = r"(?i)^\s*(?:bearer|token|basic)\s+"

# Below this many lines one thread is faster than splitting the regex work across the pool.
_PARALLEL_MIN_LINES = 50_000


def _escape_literal(text: str) -> str:
    # Only the classic metacharacters: both polars' Rust engine and Python's re accept these
    # escapes, while re.escape's escaped spaces and dashes are not portable.
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


@dataclass(frozen=True)
class _Token:
    literal: str | None = None  # set for literal text
    variable: str | None = None  # set for a variable
    group: str | None = None  # capture group name of the variable
    quote: str | None = None  # the quote character around the variable, if any
    bracketed: bool = False  # inside [ ... ], as $time_local usually is


@dataclass(frozen=True)
class CompiledLogFormat:
    """A log_format string turned into one anchored regex with a named group per variable.

    `regex` works with polars (`str.extract_groups`) and Python's `re` alike. Group names are
    `g0, g1, ...`; `groups` maps them to the nginx variable names (first occurrence wins).
    """

    log_format: str
    regex: str
    groups: dict[str, str]
    tokens: tuple[_Token, ...]
    # Token index from which the rest of the line is optional (the default: common lines).
    optional_from: int | None = None
    # Extra fields after the last variable are accepted and ignored.
    trailing: bool = False

    @property
    def variables(self) -> set[str]:
        return set(self.groups.values())


def _tokenise(log_format: str) -> list[_Token]:
    pieces: list[tuple[str, str]] = []
    pos = 0
    for match in _VARIABLE.finditer(log_format):
        if match.start() > pos:
            pieces.append(("lit", log_format[pos : match.start()]))
        pieces.append(("var", match.group(1) or match.group(2)))
        pos = match.end()
    if pos < len(log_format):
        pieces.append(("lit", log_format[pos:]))

    tokens: list[_Token] = []
    for i, (kind, text) in enumerate(pieces):
        if kind == "lit":
            tokens.append(_Token(literal=text))
            continue
        before = pieces[i - 1][1] if i > 0 and pieces[i - 1][0] == "lit" else ""
        after = pieces[i + 1][1] if i + 1 < len(pieces) and pieces[i + 1][0] == "lit" else ""
        quote = before[-1] if before and before[-1] in _QUOTES and after[:1] == before[-1] else None
        bracketed = before.endswith("[") and after.startswith("]")
        tokens.append(_Token(variable=text, group=f"g{i}", quote=quote, bracketed=bracketed))
    return tokens


def _variable_regex(token: _Token) -> str:
    if token.quote:
        # Any character but the quote, or a backslash escape (Apache writes \" inside quotes).
        q = _escape_literal(token.quote)
        return rf"(?:[^{q}\\]|\\.)*"
    pattern = _UNQUOTED.get(token.variable or "", None)
    if pattern is None:
        return r"[^\]]*" if token.bracketed else _UNKNOWN
    return pattern


def compile_log_format(log_format: str) -> CompiledLogFormat:
    """Compile an nginx log_format string (or a LOG_FORMATS preset name) into a regex."""
    # Formats copied out of nginx.conf often keep the config file's \" escapes.
    text = LOG_FORMATS.get(log_format, log_format).replace('\\"', '"').replace("\\'", "'")
    tokens = _tokenise(text)
    if not any(t.variable for t in tokens):
        names = ", ".join(sorted(LOG_FORMATS))
        raise ConfigError(
            f"log_format {log_format!r} is neither a preset ({names}) nor a format with $variables"
        )
    return _build(text, tokens, optional_from=None, trailing=False)


def _build(text: str, tokens: list[_Token], optional_from: int | None, trailing: bool) -> CompiledLogFormat:
    parts: list[str] = []
    groups: dict[str, str] = {}
    for i, token in enumerate(tokens):
        if i == optional_from:
            parts.append("(?:")
        if token.literal is not None:
            parts.append(_escape_literal(token.literal))
        else:
            assert token.group is not None and token.variable is not None
            parts.append(f"(?P<{token.group}>{_variable_regex(token)})")
            if token.variable not in groups.values():
                groups[token.group] = token.variable
    if trailing:
        parts.append(r"(?:\s.*)?")
    if optional_from is not None:
        parts.append(")?")
    # The empty group `m` is "" on a match and null otherwise: every variable may be optional.
    regex = "^(?P<m>)" + "".join(parts) + "$"
    return CompiledLogFormat(text, regex, groups, tuple(tokens), optional_from, trailing)


def _default_format() -> CompiledLogFormat:
    tokens = _tokenise(_DEFAULT_FORMAT)
    referer = next(i for i, t in enumerate(tokens) if t.variable == "http_referer")
    return _build(_DEFAULT_FORMAT, tokens, optional_from=referer - 1, trailing=True)


DEFAULT_FORMAT = _default_format()


# ---------------------------------------------------------------------------------------------
# Per-line fallback: a forgiving left-to-right scanner over the same tokens. It accepts runs of
# whitespace where the format has one space and unescaped quotes inside quoted fields, never
# backtracks (so hostile lines cost linear time), and says where a line stops matching.


_BLANK_TAIL = re.compile(r"\s*\Z")


class _NoMatch(Exception):
    pass


@dataclass(frozen=True)
class _Step:
    token: _Token
    regex: re.Pattern[str]  # literal (whitespace-lenient) or variable pattern, anchored by match()
    free: bool  # the variable's end is found by looking for the next literal
    bare: re.Pattern[str] | None = None  # the variable's pattern without its look-ahead


def _lenient_literal(text: str) -> re.Pattern[str]:
    pieces = re.split(r"(\s+)", text)
    return re.compile("".join(r"\s+" if p.isspace() else re.escape(p) for p in pieces if p))


def _scanner_steps(fmt: CompiledLogFormat) -> list[_Step]:
    steps = []
    tokens = fmt.tokens
    for i, token in enumerate(tokens):
        if token.literal is not None:
            steps.append(_Step(token, _lenient_literal(token.literal), free=False))
            continue
        pattern = _UNQUOTED.get(token.variable or "", _UNKNOWN)
        if token.quote or token.bracketed or pattern == _FREE_TEXT:
            steps.append(_Step(token, re.compile(""), free=True))
            continue
        # A fixed-shape variable must be followed by what the format puts after it, so `\S+`
        # before a ":" stops at the colon instead of swallowing it.
        if i + 1 < len(tokens) and tokens[i + 1].literal is not None:
            follow = _lenient_literal(tokens[i + 1].literal).pattern
            if i + 1 == fmt.optional_from:
                follow += r"|\s*\Z"
        elif i + 1 < len(tokens):
            follow = ""
        else:
            follow = r"\s|\Z" if fmt.trailing else r"\s*\Z"
        regex = f"(?:{pattern})(?={follow})" if follow else f"(?:{pattern})"
        steps.append(_Step(token, re.compile(regex), free=False, bare=re.compile(f"(?:{pattern})")))
    return steps


def _describe(token: _Token) -> str:
    return f"${token.variable}" if token.variable else repr(token.literal)


def _is_escaped(line: str, pos: int) -> bool:
    backslashes = 0
    while pos - backslashes - 1 >= 0 and line[pos - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _scan(line: str, steps: list[_Step], fmt: CompiledLogFormat) -> dict[str, str]:
    values: dict[str, str] = {}
    pos = len(line) - len(line.lstrip())
    n = len(steps)
    i = 0
    while i < n:
        if i == fmt.optional_from and _BLANK_TAIL.match(line, pos):
            return values
        step = steps[i]
        token = step.token
        if token.literal is not None:
            found = step.regex.match(line, pos)
            if found is None:
                shown = line[pos : pos + 12]
                raise _NoMatch(f"expected {token.literal!r} at column {pos + 1}, found {shown!r}")
            pos = found.end()
            i += 1
            continue
        if not step.free:
            found = step.regex.match(line, pos)
            if found is None:
                raise _NoMatch(_mismatch(line, pos, i, steps))
            values[token.group or ""] = found.group(0)
            pos = found.end()
            i += 1
            continue
        end, after = _free_end(line, pos, i, steps, fmt)
        values[token.group or ""] = line[pos:end]
        pos = after
        i += 2 if i + 1 < n else 1
    rest = line[pos:]
    if rest.strip() and not (fmt.trailing and rest[:1].isspace()):
        raise _NoMatch(f"unexpected text after the last field at column {pos + 1}: {rest[:24]!r}")
    return values


def _mismatch(line: str, pos: int, i: int, steps: list[_Step]) -> str:
    """Say whether the variable itself or the text after it is what does not fit."""
    step = steps[i]
    bare = step.bare.match(line, pos) if step.bare is not None else None
    wanted = steps[i + 1].token.literal if i + 1 < len(steps) else None
    if bare is not None and bare.end() > pos and wanted is not None:
        end = bare.end()
        shown = line[end : end + 12]
        return f"expected {wanted!r} at column {end + 1} after {_describe(step.token)}, found {shown!r}"
    return f"{_describe(step.token)} not found at column {pos + 1}: {line[pos : pos + 24]!r}"


def _free_end(line: str, pos: int, i: int, steps: list[_Step], fmt: CompiledLogFormat) -> tuple[int, int]:
    """Where the free-text variable at steps[i] ends, and where the literal after it ends."""
    token = steps[i].token
    if i + 1 >= len(steps):  # last token of the format: the rest of the line
        end = len(line.rstrip())
        if token.quote and end > pos and line[end - 1] == token.quote:
            end -= 1
        return end, len(line)
    literal = steps[i + 1]
    if literal.token.literal is None:
        raise _NoMatch(f"{_describe(token)} is followed by another variable; cannot tell where it ends")
    following = steps[i + 2] if i + 2 < len(steps) else None
    # Quote positions, for the parity test on trailing fields: counted once, not per candidate.
    quotes = [m.start() for m in re.finditer('"', line)] if following is None and fmt.trailing else []
    start = pos
    first_end = None
    while True:
        found = literal.regex.search(line, start)
        if found is None:
            break
        start = found.start() + 1
        if token.quote and _is_escaped(line, found.start()):
            continue
        if _acceptable_follow(line, found.end(), following, fmt, quotes):
            return found.start(), found.end()
        first_end = found.end() if first_end is None else first_end
    if first_end is None and following is None and token.quote and literal.token.literal == token.quote:
        # The last field lost its closing quote (a truncated line): the rest of the line is it.
        end = len(line.rstrip())
        return end, end
    if first_end is not None and following is not None:
        shown = line[first_end : first_end + 24]
        where = f"after {_describe(token)} at column {first_end + 1}"
        raise _NoMatch(f"{_describe(following.token)} not found {where}: {shown!r}")
    wanted = literal.token.literal or ""
    if token.quote and wanted.strip() != token.quote and token.quote in line[pos:]:
        raise _NoMatch(f"expected {wanted!r} after {_describe(token)} (opened at column {pos})")
    closing = token.quote or wanted.strip() or "separator"
    raise _NoMatch(f"no closing {closing!r} for {_describe(token)} opened at column {pos}")


def _acceptable_follow(
    line: str, pos: int, following: _Step | None, fmt: CompiledLogFormat, quotes: list[int]
) -> bool:
    # One token of look-ahead is enough to tell the closing quote from a stray one inside. Every
    # test here is bounded, so a hostile line with thousands of quotes stays linear.
    if following is None:
        if _BLANK_TAIL.match(line, pos):
            return True
        # Extra fields come in whole pairs of quotes; an odd count means the quote we are at was
        # a stray one inside the last field (`"ua "quoted" here"`).
        quotes_after = len(quotes) - bisect.bisect_left(quotes, pos)
        return fmt.trailing and line[pos : pos + 1].isspace() and quotes_after % 2 == 0
    if following.free:
        return True
    check = following.bare or following.regex
    return check.match(line, pos, min(len(line), pos + 256)) is not None


# ---------------------------------------------------------------------------------------------
# Addresses


def _normalise_ip(value: str) -> str | None:
    """'[2001:DB8::1]:443', '2001:db8:0::1', '1.2.3.4:80', '::ffff:1.2.3.4' -> canonical address."""
    text = value.strip()
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        end = text.find("]")
        if end < 0 or not (end == len(text) - 1 or _PORT.fullmatch(text, end + 1)):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4:port
        host, _, port = text.partition(":")
        if not _PORT.fullmatch(":" + port):
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Dual-stack sockets log IPv4 clients as ::ffff:a.b.c.d; count them as the IPv4 client.
        return str(address.ipv4_mapped)
    return str(address)


def _normalise_ip_series(raw: pl.Series) -> pl.Series:
    """Canonical addresses; null where the value is no address. Python only for odd spellings."""
    canonical = raw.str.contains(_CANONICAL_IPV4).fill_null(False)
    odd = raw.filter(~canonical).drop_nulls().unique()
    if odd.len() == 0:
        return pl.select(pl.when(canonical).then(raw).otherwise(None)).to_series().alias(raw.name)
    mapping = {v: _normalise_ip(v) for v in odd.to_list()}
    mapped = raw.replace_strict(mapping, default=None, return_dtype=pl.String)
    return pl.select(pl.when(canonical).then(raw).otherwise(mapped)).to_series().alias(raw.name)


# ---------------------------------------------------------------------------------------------


@register
class CombinedParser(Parser):
    """Access logs of nginx and Apache: combined, common, or the configured nginx log_format."""

    name: ClassVar[str] = "combined"

    def __init__(self, ctx: ParseContext):
        super().__init__(ctx)
        if ctx.log_format:
            self.format = compile_log_format(ctx.log_format)
            self._what = "does not match the configured log_format"
        else:
            self.format = DEFAULT_FORMAT
            self._what = "not a combined/common access log line"
        self._have = self.format.variables
        if not self._have & set(_TIME_VARIABLES):
            names = ", ".join("$" + v for v in _TIME_VARIABLES)
            raise ConfigError(f"log_format {ctx.log_format!r} has no time variable ({names})")
        try:
            self._trusted = ctx.trusted_networks()
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {exc}") from None
        self._steps = _scanner_steps(self.format)

    # -- public ------------------------------------------------------------------------------

    @classmethod
    def sniff(cls, lines: Sequence[str]) -> float:
        if not lines:
            return 0.0
        series = _as_series(lines)
        return float(series.str.contains(DEFAULT_FORMAT.regex).fill_null(False).mean() or 0.0)

    def parse(self, lines: Sequence[str]) -> ParsedBatch:
        if len(lines) == 0:
            return ParsedBatch.empty()
        series = _as_series(lines)
        frame = pl.DataFrame({"line": series}).with_row_index("row").cast({"row": pl.Int64})
        staged = _in_parallel(frame, lambda lf: self._row_stage(self._extract_stage(lf)))
        matched = staged.filter(pl.col("m").is_not_null()).drop("m")
        unmatched = staged.filter(pl.col("m").is_null())["row"].to_list()

        rescued, rejected = self._fallback(series, unmatched)
        if rescued.height:
            rescued = self._row_stage(rescued.lazy()).collect()
            matched = pl.concat([matched, rescued.select(matched.columns)], how="vertical_relaxed")
        if matched.height == 0:
            return ParsedBatch(empty_events(), sorted(rejected))

        events = self._finish(matched)
        bad = events.filter(pl.col("_reject").is_not_null())
        rejected.extend(zip(bad["row"].to_list(), bad["_reject"].to_list(), strict=True))
        events = events.filter(pl.col("_reject").is_null()).drop("_reject")
        if not events["row"].is_sorted():  # only rows rescued by the fallback come out of order
            events = events.sort("row")
        return ParsedBatch(conform(events), sorted(rejected))

    # -- fast path ---------------------------------------------------------------------------

    def _extract_stage(self, lf: pl.LazyFrame) -> pl.LazyFrame:
        """Every line through the one regex: a column per variable, and `m` (null: no match)."""
        fields = pl.col("line").str.extract_groups(self.format.regex).alias("fields")
        groups = self.format.groups
        return (
            lf.select(pl.col("row"), fields)
            .unnest("fields")
            .select("row", "m", *(pl.col(group).alias(name) for group, name in groups.items()))
        )

    # -- per-line fallback -------------------------------------------------------------------

    def _fallback(self, series: pl.Series, rows: list[int]) -> tuple[pl.DataFrame, list[tuple[int, str]]]:
        rejected: list[tuple[int, str]] = []
        found: list[dict[str, str | int]] = []
        for row in rows:
            line = series[row]
            if line is None or not line.strip():
                rejected.append((row, "empty line"))
                continue
            try:
                values = _scan(line, self._steps, self.format)
            except _NoMatch as exc:
                rejected.append((row, f"{self._what}: {exc}"))
                continue
            record: dict[str, str | int] = {"row": row}
            for group, variable in self.format.groups.items():
                if group in values:
                    record[variable] = values[group]
            found.append(record)
        schema = {"row": pl.Int64, **{v: pl.String for v in self.format.groups.values()}}
        return pl.DataFrame(found, schema=schema), rejected

    # -- fields to event columns -------------------------------------------------------------

    def _value(self, name: str) -> pl.Expr:
        """A variable's text; null when the format lacks it or nginx wrote "-" for empty."""
        if name not in self._have:
            return pl.lit(None, dtype=pl.String)
        return pl.when(pl.col(name).is_in(["-", ""])).then(None).otherwise(pl.col(name))

    def _row_stage(self, lf: pl.LazyFrame) -> pl.LazyFrame:
        """Everything computed from one row alone: pure polars, so it runs in parallel slices."""
        have = self._have
        value = self._value
        sent = "body_bytes_sent" if "body_bytes_sent" in have else "bytes_sent"
        # Apache's %b writes "-" for a response without a body: that is 0 bytes, not unknown.
        sent_bytes = pl.lit(None, pl.Int64)
        if sent in have:
            number = pl.col(sent).cast(pl.Int64, strict=False)
            sent_bytes = pl.when(pl.col(sent) == "-").then(pl.lit(0, pl.Int64)).otherwise(number)
        status = pl.col("status").cast(pl.Int64, strict=False) if "status" in have else pl.lit(None, pl.Int64)
        # "Authorization: Bearer <key>": the key is what identifies the caller, not the scheme.
        key = pl.coalesce(value("http_x_api_key"), value("http_authorization").str.replace(_AUTH_SCHEME, ""))
        lf = lf.with_columns(
            _ts=self._timestamp_expr(),
            _status=status,
            _bytes=sent_bytes,
            _duration=(value("request_time").cast(pl.Float64, strict=False) * 1000).round(3),
            _account=pl.coalesce(value("http_x_account"), value("remote_user")),
            _ua=value("http_user_agent").str.replace_all(r'\"', '"', literal=True),
            _scheme=value("scheme").str.to_lowercase(),
            _key=key,
        )
        if "request" not in have:
            return self._request_stage(lf)
        # Requests repeat a lot in real traffic; the costly URL work runs once per distinct one.
        distinct = self._request_stage(lf.select(pl.col("request").unique()))
        return lf.join(distinct, on="request", how="left", nulls_equal=True, maintain_order="left")

    def _request_stage(self, lf: pl.LazyFrame) -> pl.LazyFrame:
        """Method, normalised path and the request flags; each step a column so none runs twice."""
        have = self._have
        if "request" in have:
            # Apache writes a quote inside the request as \"; nginx as \x22, which we keep.
            request = pl.col("request").fill_null("").str.replace_all('\\"', '"', literal=True)
            lf = lf.with_columns(_request=request).with_columns(
                _parts=pl.col("_request").str.extract_groups(_REQUEST_LINE)
            )
            lf = lf.with_columns(
                _method=pl.col("_parts").struct.field("method"),
                _target=pl.col("_parts").struct.field("url"),
                _empty=pl.col("_request").str.strip_chars().is_in(["", "-"]),
            ).drop("_parts")
        else:
            method = self._value("request_method").str.to_uppercase()
            target = self._value("request_uri")
            if "request_uri" not in have and "uri" in have:
                uri, args = self._value("uri"), self._value("args")
                target = pl.when(args.is_not_null()).then(pl.format("{}?{}", uri, args)).otherwise(uri)
            lf = lf.with_columns(_request=pl.lit("", pl.String), _method=method)
            lf = lf.with_columns(_target=pl.when(pl.col("_method").is_not_null()).then(target))
            lf = lf.with_columns(_empty=pl.col("_method").is_null() & pl.col("_target").is_null())
        request = pl.col("_request")
        lf = lf.with_columns(
            _path=normalise_path_expr(pl.col("_target")),
            _secret=has_secret_expr(pl.col("_target")).fill_null(False),
            _tls=request.str.contains(_TLS_HANDSHAKE),
            _control=request.str.contains(_CONTROL_CHARS),
            # Non-ASCII bytes in a well-formed request line are a sloppy client, not binary junk.
            _unparsed=pl.col("_method").is_null() & request.str.contains(_ESCAPED_BYTES),
        )
        return lf.with_columns(_binary=~pl.col("_tls") & (pl.col("_control") | pl.col("_unparsed"))).drop(
            "_request", "_target", "_control", "_unparsed"
        )

    def _timestamp_expr(self) -> pl.Expr:
        have = self._have
        utc = pl.Datetime("us", "UTC")
        candidates = []
        if "time_local" in have:
            text = pl.col("time_local").str.strip_chars()
            candidates.append(text.str.strptime(utc, "%d/%b/%Y:%H:%M:%S %z", strict=False))
        if "time_iso8601" in have:
            text = pl.col("time_iso8601").str.strip_chars()
            candidates.append(text.str.strptime(utc, "%Y-%m-%dT%H:%M:%S%.f%#z", strict=False))
        if "msec" in have:
            seconds = pl.col("msec").cast(pl.Float64, strict=False)
            micros = (seconds * 1_000_000).round(0).cast(pl.Int64, strict=False)
            candidates.append(pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC"))
        return pl.coalesce(candidates).cast(utc)

    def _finish(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Columns needing Python per distinct value (addresses, key fingerprints), then the event."""
        status = pl.col("_status")
        if self._have & set(_KEY_VARIABLES):
            service: pl.Expr = pl.lit(Service.API.value)
            key_id = fingerprint_expr(pl.col("_key"), self.ctx.pepper)
        else:
            is_api = pl.col("_path").str.contains(_API_PATH).fill_null(False)
            service = pl.when(is_api).then(pl.lit(Service.API.value)).otherwise(pl.lit(Service.WEB.value))
            key_id = pl.lit(None, pl.String)
        flags = pl.concat_str(
            [
                pl.when(pl.col("_secret")).then(pl.lit(Flag.SECRET_IN_URL.value)),
                pl.when(pl.col("_tls")).then(pl.lit(Flag.TLS_ON_PLAIN_PORT.value)),
                pl.when(pl.col("_binary")).then(pl.lit(Flag.BINARY_REQUEST.value)),
                pl.when(pl.col("_empty")).then(pl.lit(Flag.EMPTY_REQUEST.value)),
            ],
            separator="|",
            ignore_nulls=True,
        )
        return frame.with_columns(_ip=self._source_ip(frame)).select(
            pl.col("row"),
            ts=pl.col("_ts"),
            source_ip=pl.col("_ip"),
            service=service,
            scheme=pl.col("_scheme"),
            method=pl.col("_method"),
            path=pl.col("_path"),
            status=status,
            outcome=outcome_from_http_status(status),
            api_key_id=key_id,
            account=pl.col("_account"),
            user_agent=pl.col("_ua"),
            bytes=pl.col("_bytes"),
            duration_ms=pl.col("_duration"),
            flags=pl.when(flags != "").then(flags),
            _reject=self._reject_expr(),
        )

    def _reject_expr(self) -> pl.Expr:
        time_var = next(v for v in _TIME_VARIABLES if v in self._have)
        shown = pl.col(time_var).fill_null("(missing)").str.slice(0, 64)
        reason = pl.when(pl.col("_ts").is_null()).then(pl.format("bad timestamp {}", shown))
        address_var = self._address_variable()
        if address_var is not None:
            shown = pl.col(address_var).fill_null("(missing)").str.slice(0, 64)
            reason = reason.when(pl.col("_ip").is_null()).then(
                pl.format("client address is not an IP address: {}", shown)
            )
        return reason.otherwise(None)

    def _address_variable(self) -> str | None:
        return next((v for v in ("remote_addr", "realip_remote_addr") if v in self._have), None)

    def _source_ip(self, frame: pl.DataFrame) -> pl.Series:
        address_var = self._address_variable()
        if address_var is None:
            return pl.Series("_ip", [None] * frame.height, dtype=pl.String)
        direct = _normalise_ip_series(frame[address_var]).alias("_ip")
        if not self._trusted or "http_x_forwarded_for" not in self._have:
            return direct
        # Only a proxy we trust may tell us who its client was; anyone else's header is ignored.
        proxies = [ip for ip in direct.drop_nulls().unique().to_list() if self._is_trusted(ip)]
        if not proxies:
            return direct
        pairs = pl.DataFrame({"direct": direct, "xff": frame["http_x_forwarded_for"]})
        via_proxy = pairs["direct"].is_in(proxies)
        resolved = [
            {"direct": d, "xff": x, "client": self._client_from_chain(d, x)}
            for d, x in pairs.filter(via_proxy).unique().iter_rows()
        ]
        schema = {"direct": pl.String, "xff": pl.String, "client": pl.String}
        clients = pairs.with_row_index("i").join(
            pl.DataFrame(resolved, schema=schema), on=["direct", "xff"], how="left", nulls_equal=True
        )
        client = clients.sort("i")["client"]
        return pl.select(pl.when(via_proxy).then(client).otherwise(direct)).to_series().alias("_ip")

    def _is_trusted(self, ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return any(address in net for net in self._trusted)

    def _client_from_chain(self, direct: str, chain: str | None) -> str:
        """Walk X-Forwarded-For from the right past our own proxies; the first other hop is the client."""
        if not chain or chain.strip() in ("", "-"):
            return direct
        current = direct
        for hop in reversed(chain.split(",")):
            address = _normalise_ip(hop)
            if address is None:
                # A hop that is no address was forged or mangled: stop at the last one we trust.
                return current
            current = address
            if not self._is_trusted(address):
                return address
        return current


def _in_parallel(frame: pl.DataFrame, stage: Callable[[pl.LazyFrame], pl.LazyFrame]) -> pl.DataFrame:
    """Run a lazy stage over slices of the frame side by side: one regex pass uses one core."""
    threads = pl.thread_pool_size()
    if frame.height < _PARALLEL_MIN_LINES or threads < 2:
        return stage(frame.lazy()).collect()
    step = -(-frame.height // threads)
    parts = [stage(frame.slice(i * step, step).lazy()) for i in range(threads)]
    return pl.concat(parts, parallel=True).collect()


def _as_series(lines: Sequence[str]) -> pl.Series:
    try:
        return pl.Series("line", lines, dtype=pl.String)
    except Exception:  # lone surrogates or non-str items from a careless caller
        return pl.Series("line", [_clean(line) for line in lines], dtype=pl.String)


def _clean(line: object) -> str | None:
    """The source's spelling of undecodable bytes (\\xNN) for whatever a caller handed us."""
    if line is None:
        return None
    if isinstance(line, bytes):
        return line.decode("utf-8", "backslashreplace")
    text = str(line)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that never were bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
