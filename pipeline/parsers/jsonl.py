"""JSON-lines access logs (our mail API, AWS API Gateway, Traefik) to events through a field mapping."""

from __future__ import annotations

import io
import ipaddress
import json
import math
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import polars as pl

from pipeline.parsers import register
from pipeline.parsers.base import (
    MAX_YEAR,
    MIN_YEAR,
    ParseContext,
    ParsedBatch,
    Parser,
    conform,
    empty_events,
    outcome_from_http_status,
)
from pipeline.privacy import fingerprint_expr, has_secret_expr, normalise_path_expr
from pipeline.schema import ConfigError, Flag, Service

# What a mapping may point at: the event columns a JSON log can fill directly, plus a few inputs
# that become columns after some work (a raw key is fingerprinted, a route is split, durations
# are converted). docs/formats.md describes each one.
TARGETS: dict[str, str] = {
    "ts": "event time: ISO-8601, CLF or epoch seconds/ms/us/ns",
    "source_ip": "client address, IPv4 or IPv6, optionally with a port or in brackets",
    "forwarded_for": "X-Forwarded-For list; used only when source_ip is a trusted proxy",
    "method": "HTTP method",
    "path": "request path or absolute URL",
    "route": "`METHOD /path` route key (API Gateway) or a bare path",
    "status": "HTTP status code (number or string)",
    "api_key": "raw API key or `Authorization` value; only its fingerprint is kept",
    "api_key_id": "key id that is not secret; stored as `id:<value>`",
    "account": "customer account or user name",
    "recipients": "number of recipients, or the list of addresses (counted, never stored)",
    "scheme": "http, https, ...",
    "protocol": "HTTP/1.1, HTTP/2.0, ...; HTTP/2 and HTTP/3 imply https when scheme is absent",
    "user_agent": "User-Agent header",
    "bytes": "response size in bytes",
    "duration_ms": "request duration in milliseconds",
    "duration_s": "request duration in seconds",
    "duration_ns": "request duration in nanoseconds",
    "service": "overrides the mapping's service (api, web, ...)",
}
REQUIRED_TARGETS = ("ts", "source_ip")


@dataclass(frozen=True)
class JsonMapping:
    """Which JSON field (dotted path, alternatives in preference order) fills which target."""

    name: str
    fields: Mapping[str, tuple[str, ...]]
    service: str = Service.API.value
    # Traefik fronts websites and APIs alike: a versioned path (/v3/...) means an API call.
    versioned_paths_are_api: bool = False
    # Used when the record says nothing about the scheme (API Gateway only serves HTTPS).
    default_scheme: str | None = None


MAILAPI = JsonMapping(
    name="mailapi",
    fields={
        "ts": ("time",),
        "source_ip": ("client_ip",),
        "forwarded_for": ("forwarded_for",),
        "method": ("method",),
        "path": ("path",),
        "status": ("status",),
        "api_key": ("api_key", "x-api-key", "authorization"),
        "api_key_id": ("key_id",),
        "account": ("account",),
        "recipients": ("recipients",),
        "scheme": ("scheme",),
        "user_agent": ("user_agent",),
        "duration_ms": ("duration_ms",),
        "bytes": ("bytes",),
    },
)

# Field names are the $context variables AWS documents for access-log formats; users name the JSON
# keys themselves, so the common spellings (flat and nested `identity.*`) are all accepted.
APIGATEWAY = JsonMapping(
    name="apigateway",
    fields={
        # Epoch milliseconds first: requestTime (CLF) only has whole seconds.
        "ts": ("requestTimeEpoch", "requestTime"),
        "source_ip": ("ip", "identity.sourceIp", "sourceIp"),
        "method": ("httpMethod",),
        "route": ("routeKey",),
        "path": ("resourcePath", "path"),
        "status": ("status",),
        "protocol": ("protocol",),
        "bytes": ("responseLength",),
        "duration_ms": ("responseLatency",),
        "account": ("user", "caller", "identity.user", "identity.caller", "authorizer.principalId"),
        # $context.identity.apiKey is the raw key (REST APIs with usage plans): fingerprint it.
        "api_key": ("apiKey", "identity.apiKey"),
        "api_key_id": ("apiKeyId", "identity.apiKeyId"),
        "user_agent": ("userAgent", "identity.userAgent"),
    },
    default_scheme="https",
)

TRAEFIK = JsonMapping(
    name="traefik",
    fields={
        # StartUTC is the request start with nanoseconds; `time` is when the line was written.
        "ts": ("StartUTC", "StartLocal", "time"),
        # ClientHost is the address Traefik settled on (after its own forwarded-header handling).
        "source_ip": ("ClientHost", "ClientAddr"),
        "forwarded_for": ("request_X-Forwarded-For",),
        "method": ("RequestMethod",),
        "path": ("RequestPath",),
        "status": ("DownstreamStatus",),
        "scheme": ("RequestScheme",),
        "protocol": ("RequestProtocol",),
        "user_agent": ("request_User-Agent",),
        "account": ("ClientUsername",),
        # Present only when headers are kept in the access log; never store them raw.
        "api_key": ("request_X-Api-Key", "request_Authorization"),
        "bytes": ("DownstreamContentSize",),
        "duration_ns": ("Duration",),
    },
    service=Service.WEB.value,
    versioned_paths_are_api=True,
)

BUILTIN_MAPPINGS: dict[str, JsonMapping] = {m.name: m for m in (MAILAPI, APIGATEWAY, TRAEFIK)}

# Keys only Traefik writes (Go field names of its access-log record).
_TRAEFIK_KEYS = frozenset(
    {"ClientAddr", "ClientHost", "DownstreamStatus", "RequestMethod", "RequestPath", "RequestProtocol",
     "Duration", "StartUTC", "RouterName", "ServiceName"}
)
_APIGW_TIME_KEYS = frozenset({"requestTime", "requestTimeEpoch"})
_APIGW_KEYS = frozenset({"requestId", "ip", "httpMethod", "routeKey", "resourcePath", "identity", "extendedRequestId"})
_MAILAPI_KEYS = frozenset({"time", "client_ip"})
_DETECT_SAMPLE = 100

# Batches that do not decode in one go are cut into blocks, and failing blocks into FANOUT
# pieces, until a piece is small enough that per-line json.loads is cheaper than another try.
_BLOCK = 4096
_FANOUT = 8
_MIN_PIECE = 16

_AUTH_SCHEME = r"^(?i)(?:bearer|token|basic|apikey|api-key|key)\s+"
_EPOCH = r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$"
_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"^(?:{_IPV4_OCTET}\.){{3}}{_IPV4_OCTET}$"
_BRACKETED = r"^\[([^\]]*)\](?::\d*)?$"
_IPV4_PORT = r"^([0-9.]+):\d+$"
_ABSOLUTE_URL = r"^(?i)([a-z][a-z0-9+.-]*)://[^/?#]*(.*)$"
_ROUTE_KEY = r"^([A-Za-z]+)\s+(\S.*)$"
# Plausible event times; also keeps every value convertible to a Python datetime downstream.
_MIN_YEAR, _MAX_YEAR = MIN_YEAR, MAX_YEAR
_REASON_VALUE_CHARS = 64


def resolve_mapping(spec: str | Mapping[str, Any] | None) -> JsonMapping | None:
    """ctx.json_mapping to a mapping; None means "detect per batch". Bad specs are ConfigErrors."""
    if spec is None:
        return None
    if isinstance(spec, str):
        mapping = BUILTIN_MAPPINGS.get(spec.strip().lower())
        if mapping is None:
            raise ConfigError(
                f"json_mapping: unknown mapping {spec!r} (built-in: {', '.join(BUILTIN_MAPPINGS)}; "
                "or give a {column: field path} table)"
            )
        return mapping
    if not isinstance(spec, Mapping):
        raise ConfigError(f"json_mapping: expected a name or a table, got {type(spec).__name__}")
    fields: dict[str, tuple[str, ...]] = {}
    for target, paths in spec.items():
        if target not in TARGETS:
            raise ConfigError(f"json_mapping: unknown column {target!r} (known: {', '.join(TARGETS)})")
        alternatives = (paths,) if isinstance(paths, str) else paths
        if (
            not isinstance(alternatives, Sequence)
            or not alternatives
            or not all(isinstance(p, str) and p and "" not in p.split(".") for p in alternatives)
        ):
            raise ConfigError(
                f"json_mapping.{target}: expected a dotted field path or a non-empty list of them, got {paths!r}"
            )
        fields[target] = tuple(alternatives)
    missing = [t for t in REQUIRED_TARGETS if t not in fields]
    if missing:
        raise ConfigError(f"json_mapping: {', '.join(missing)} must be mapped (time and client IP are required)")
    mapping = JsonMapping(name="custom", fields=fields)
    _Plan.build(mapping)  # surfaces conflicting paths ("a" and "a.b") at start-up
    return mapping


def detect_mapping(lines: Sequence[str]) -> JsonMapping:
    """Traefik or API Gateway when most sampled objects carry their field names, else mailapi."""
    step = max(1, len(lines) // _DETECT_SAMPLE)
    votes = {"traefik": 0, "apigateway": 0, "mailapi": 0}
    for line in lines[::step][:_DETECT_SAMPLE]:
        obj = _loads_object(line)
        if not isinstance(obj, dict):
            continue
        keys = obj.keys()
        if len(_TRAEFIK_KEYS.intersection(keys)) >= 2:
            votes["traefik"] += 1
        elif _APIGW_TIME_KEYS.intersection(keys) and _APIGW_KEYS.intersection(keys):
            votes["apigateway"] += 1
        elif _MAILAPI_KEYS.intersection(keys):
            votes["mailapi"] += 1
    best = max(("traefik", "apigateway"), key=lambda name: votes[name])
    if votes[best] > votes["mailapi"]:
        return BUILTIN_MAPPINGS[best]
    return MAILAPI


def _loads_object(line: str) -> Any:
    """json.loads that never raises (None for anything that is not JSON)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _leaf_candidates(path: str) -> list[tuple[str, ...]]:
    # "identity.sourceIp" is usually nested, but flat keys with dots exist too (ECS-style logs).
    parts = tuple(path.split("."))
    return [parts] if len(parts) == 1 else [parts, (path,)]


@dataclass(frozen=True)
class _Plan:
    """A mapping compiled once: the JSON leaves to read, the polars schema, target -> columns."""

    mapping: JsonMapping
    leaves: tuple[tuple[str, ...], ...]
    names: tuple[str, ...]
    columns: dict[str, tuple[str, ...]]
    schema: dict[str, pl.DataType]
    flatten: tuple[pl.Expr, ...] = field(repr=False)

    @classmethod
    def build(cls, mapping: JsonMapping) -> _Plan:
        index: dict[tuple[str, ...], str] = {}
        columns: dict[str, tuple[str, ...]] = {}
        for target, paths in mapping.fields.items():
            names: list[str] = []
            for path in paths:
                for leaf in _leaf_candidates(path):
                    index.setdefault(leaf, f"_f{len(index)}")
                    names.append(index[leaf])
            columns[target] = tuple(dict.fromkeys(names))
        tree: dict[str, Any] = {}
        for leaf in index:
            node = tree
            for key in leaf[:-1]:
                child = node.setdefault(key, {})
                if child is None:
                    raise ConfigError(f"json_mapping: {'.'.join(leaf)!r} goes through a field also mapped as a value")
                node = child
            if isinstance(node.get(leaf[-1]), dict):
                raise ConfigError(f"json_mapping: {'.'.join(leaf)!r} is mapped as a value and as an object")
            node[leaf[-1]] = None
        flatten = []
        for leaf, name in index.items():
            expr = pl.col(leaf[0])
            for key in leaf[1:]:
                expr = expr.struct.field(key)
            flatten.append(expr.alias(name))
        return cls(
            mapping=mapping,
            leaves=tuple(index),
            names=tuple(index.values()),
            columns=columns,
            schema={key: _dtype(node) for key, node in tree.items()},
            flatten=tuple(flatten),
        )


def _dtype(node: dict[str, Any] | None) -> pl.DataType:
    # Every leaf is read as text: polars then keeps numbers, strings, booleans and even nested
    # values (as JSON text) instead of failing the batch on "status": "200" vs 200.
    if node is None:
        return pl.String()
    return pl.Struct({key: _dtype(child) for key, child in node.items()})


@register
class JsonLinesParser(Parser):
    """One JSON object per line; fields found through a JsonMapping (built-in or configured)."""

    name: ClassVar[str] = "json"

    def __init__(self, ctx: ParseContext):
        super().__init__(ctx)
        self.mapping = resolve_mapping(ctx.json_mapping)
        try:
            zoneinfo.ZoneInfo(ctx.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"timezone: unknown time zone {ctx.timezone!r}") from exc
        try:
            self._networks = ctx.trusted_networks()
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {exc}") from None
        self._plans: dict[str, _Plan] = {}

    @classmethod
    def sniff(cls, lines: Sequence[str]) -> float:
        if not lines:
            return 0.0
        return sum(isinstance(_loads_object(line), dict) for line in lines) / len(lines)

    def parse(self, lines: Sequence[str]) -> ParsedBatch:
        lines = list(lines)
        if not lines:
            return ParsedBatch.empty()
        mapping = self.mapping or detect_mapping(lines)
        plan = self._plans.get(mapping.name)
        if plan is None:
            plan = self._plans[mapping.name] = _Plan.build(mapping)
        raw, rejected = _decode(plan, lines)
        events, invalid = self._events(plan, raw)
        rejected.extend(invalid)
        rejected.sort()
        return ParsedBatch(events=events, rejected=rejected)

    # -- from raw text columns to events -------------------------------------------------------

    def _events(self, plan: _Plan, raw: pl.DataFrame) -> tuple[pl.DataFrame, list[tuple[int, str]]]:
        if raw.height == 0:
            return empty_events(), []
        mapping = plan.mapping

        def target(name: str) -> pl.Expr:
            cols = plan.columns.get(name)
            if not cols:
                return pl.lit(None, dtype=pl.String)
            return pl.coalesce([_clean(pl.col(c)) for c in cols])

        frame = raw.select(pl.col("row"), *(target(t).alias(t) for t in TARGETS))
        frame = frame.with_columns(
            _parse_times(frame["ts"], self.ctx.timezone).alias("ts_parsed"),
            _normalise_ips(frame["source_ip"]).alias("ip"),
            _count_recipients(frame["recipients"]).alias("recipients_n"),
        )
        if self._networks and plan.columns.get("forwarded_for"):
            frame = frame.with_columns(self._apply_forwarded_for(frame["ip"], frame["forwarded_for"]).alias("ip"))

        frame = frame.with_columns(_reason(mapping).alias("reason"))
        rejected: list[tuple[int, str]] = []
        if frame["reason"].null_count() < frame.height:
            rejected = list(frame.filter(pl.col("reason").is_not_null()).select("row", "reason").iter_rows())
            frame = frame.filter(pl.col("reason").is_null())
        return conform(_finish(frame, mapping, self.ctx.pepper)), rejected

    def _apply_forwarded_for(self, ips: pl.Series, forwarded: pl.Series) -> pl.Series:
        """Right-most untrusted X-Forwarded-For address, for rows whose client is a trusted proxy."""
        trusted = {ip: self._is_trusted(ip) for ip in ips.drop_nulls().unique().to_list()}
        rows = pl.DataFrame({"ip": ips, "xff": forwarded})
        mask = rows["ip"].replace_strict(trusted, default=False, return_dtype=pl.Boolean) & rows["xff"].is_not_null()
        if not mask.any():
            return ips
        chains = rows.filter(mask)["xff"].unique().to_list()
        resolved = {chain: self._client_from_chain(chain) for chain in chains}
        replaced = rows["xff"].replace_strict(resolved, default=None, return_dtype=pl.String)
        return rows.select(
            pl.when(mask & replaced.is_not_null()).then(replaced).otherwise(pl.col("ip")).alias("ip")
        )["ip"]

    def _is_trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._networks)

    def _client_from_chain(self, chain: str) -> str | None:
        # Only the right end of the chain was written by proxies we trust; everything left of the
        # first untrusted hop is the client's say-so. A hop we cannot read ends the walk there:
        # skipping it would hand the choice to whoever wrote the left part.
        hops = _split_chain(chain)
        for hop in reversed(hops):
            address = _canonical_ip(_strip_port(hop))
            if address is None:
                return None
            if not self._is_trusted(address):
                return address
        return _canonical_ip(_strip_port(hops[0])) if hops else None


def _clean(expr: pl.Expr) -> pl.Expr:
    # "-" is how access logs say "absent". No blanket strip: it costs a copy of every column,
    # and the columns where padding would matter (time, address) are stripped where they fail.
    return pl.when(~expr.is_in(["", "-"])).then(expr)


def _reason(mapping: JsonMapping) -> pl.Expr:
    ts_fields = " or ".join(mapping.fields["ts"])
    ip_fields = " or ".join(mapping.fields["source_ip"])
    return (
        pl.when(pl.col("ts").is_null())
        .then(pl.lit(f"missing time (field {ts_fields})"))
        .when(pl.col("ts_parsed").is_null())
        .then(
            pl.concat_str(
                pl.lit("unparseable time '"),
                pl.col("ts").str.slice(0, _REASON_VALUE_CHARS),
                pl.lit(f"' (want ISO-8601, CLF or epoch, years {_MIN_YEAR}-{_MAX_YEAR - 1})"),
            )
        )
        .when(pl.col("source_ip").is_null())
        .then(pl.lit(f"missing client ip (field {ip_fields})"))
        .when(pl.col("ip").is_null())
        .then(
            pl.concat_str(
                pl.lit("client ip '"),
                pl.col("source_ip").str.slice(0, _REASON_VALUE_CHARS),
                pl.lit("' is not an IP address"),
            )
        )
    )


def _finish(frame: pl.DataFrame, mapping: JsonMapping, pepper: bytes) -> pl.DataFrame:
    """Event columns from the valid rows' target columns (staged, so no expression runs twice)."""
    route = pl.col("route").str.extract_groups(_ROUTE_KEY)
    frame = frame.with_columns(
        route.struct.field("1").str.to_uppercase().alias("route_method"),
        pl.coalesce(
            route.struct.field("2"),
            pl.when(pl.col("route").str.starts_with("/")).then(pl.col("route")),
            pl.col("path"),
            pl.col("route"),
        ).alias("full"),
    )
    frame = frame.with_columns(_whole_number(pl.col("status"), upper=1000).alias("status_n"))
    # URLs repeat a lot (same endpoint, same ids); redaction regexes run once per distinct URL.
    urls = frame.select(pl.col("full").unique()).with_columns(_url_columns(mapping))
    frame = frame.join(urls, on="full", how="left", nulls_equal=True, maintain_order="left")
    scheme = pl.coalesce(
        pl.col("scheme").str.to_lowercase(),
        pl.col("url_scheme"),
        # h2 is spoken over TLS in practice and h3 always is; HTTP/1.x says nothing.
        pl.when(pl.col("protocol").str.contains(r"^(?i)HTTP/[23]")).then(pl.lit("https")),
        pl.lit(mapping.default_scheme, dtype=pl.String),
    )
    duration = pl.coalesce(
        _number(pl.col("duration_ms")),
        _number(pl.col("duration_s")) * 1000.0,
        _number(pl.col("duration_ns")) / 1_000_000.0,
    )
    raw_key = pl.col("api_key").str.replace(_AUTH_SCHEME, "").str.strip_chars()
    return frame.select(
        pl.col("row"),
        pl.col("ts_parsed").alias("ts"),
        pl.col("ip").alias("source_ip"),
        pl.coalesce(pl.col("service").str.to_lowercase(), pl.col("url_service")).alias("service"),
        scheme.alias("scheme"),
        pl.coalesce(
            pl.col("method").str.to_uppercase(),
            pl.when(pl.col("route_method") != "ANY").then(pl.col("route_method")),
        ).alias("method"),
        pl.col("path_norm").alias("path"),
        pl.col("status_n").alias("status"),
        outcome_from_http_status(pl.col("status_n")).alias("outcome"),
        pl.coalesce(
            fingerprint_expr(raw_key, pepper),
            pl.concat_str(pl.lit("id:"), pl.col("api_key_id")),
        ).alias("api_key_id"),
        pl.col("account"),
        pl.col("user_agent"),
        _whole_number(pl.col("bytes"), upper=2.0**62).alias("bytes"),
        # Rounded to the nanosecond: unit conversion must not turn 41.2 into 41.199999999999996.
        pl.when(duration >= 0).then(duration.round(6)).alias("duration_ms"),
        pl.col("recipients_n").alias("recipients"),
        pl.col("url_flags").alias("flags"),
    )


def _url_columns(mapping: JsonMapping) -> list[pl.Expr]:
    """Per distinct `full` URL: scheme it names, normalised path, service, secret flag."""
    url = pl.col("full").str.extract_groups(_ABSOLUTE_URL)
    scheme = url.struct.field("1")
    rest = url.struct.field("2")
    # An absolute-form URL keeps its path only: the host says nothing about abuse of our API.
    path = (
        pl.when(scheme.is_null())
        .then(pl.col("full"))
        .when(rest.str.starts_with("/"))
        .then(rest)
        .otherwise(pl.concat_str(pl.lit("/"), rest))
    )
    service = pl.lit(mapping.service)
    if mapping.versioned_paths_are_api:
        service = pl.when(path.str.contains(r"^/v[0-9]")).then(pl.lit(Service.API.value)).otherwise(service)
    return [
        scheme.str.to_lowercase().alias("url_scheme"),
        normalise_path_expr(path).alias("path_norm"),
        service.alias("url_service"),
        pl.when(has_secret_expr(pl.col("full"))).then(pl.lit(Flag.SECRET_IN_URL.value)).alias("url_flags"),
    ]


def _number(expr: pl.Expr) -> pl.Expr:
    value = expr.cast(pl.Float64, strict=False)
    return pl.when(value.is_finite()).then(value)


def _whole_number(expr: pl.Expr, upper: float) -> pl.Expr:
    value = _number(expr)
    ok = (value >= 0) & (value < upper) & (value == value.floor())
    return pl.when(ok).then(value).cast(pl.Int64)


# -- decoding ------------------------------------------------------------------------------------


def _decode(plan: _Plan, lines: list[str]) -> tuple[pl.DataFrame, list[tuple[int, str]]]:
    """Text columns per mapped leaf (+ row) for lines that are JSON objects; rejects for the rest."""
    parts: list[pl.DataFrame] = []
    slow: list[int] = []
    whole = _read_fast(plan, lines)
    if whole is not None:
        parts.append(whole.with_columns(row=pl.int_range(len(lines), dtype=pl.Int64)))
    else:
        # Something in the batch breaks the one-shot read: set aside what cannot be an object
        # line, then narrow down the failing blocks instead of re-reading everything per line.
        candidates: list[int] = []
        for i, line in enumerate(lines):
            text = line.strip()
            if text[:1] == "{" and text[-1:] == "}" and "\n" not in line and "\r" not in line:
                candidates.append(i)
            else:
                slow.append(i)
        pending = [candidates[k : k + _BLOCK] for k in range(0, len(candidates), _BLOCK)]
        while pending:
            rows = pending.pop()
            frame = _read_fast(plan, [lines[i] for i in rows])
            if frame is not None:
                parts.append(frame.with_columns(row=pl.Series(rows, dtype=pl.Int64)))
            elif len(rows) <= _MIN_PIECE:
                slow.extend(rows)
            else:
                step = -(-len(rows) // _FANOUT)
                pending.extend(rows[k : k + step] for k in range(0, len(rows), step))
    schema = {name: pl.String for name in plan.names} | {"row": pl.Int64}
    frame = pl.concat(parts) if parts else pl.DataFrame(schema=schema)
    # polars reads `[1]`, `"x"` or `null` as an object without fields; only a per-line look
    # tells those apart from a real object that lacks every mapped field.
    empty = frame.select(pl.all_horizontal(pl.col(name).is_null() for name in plan.names))[:, 0]
    if empty.any():  # filtering copies every column: only pay for it when needed
        slow.extend(frame.filter(empty)["row"].to_list())
        frame = frame.filter(~empty)
    if not slow:
        return frame, []
    slow_frame, rejected = _read_slow(plan, lines, slow, schema)
    return pl.concat([frame, slow_frame]), rejected


def _read_fast(plan: _Plan, lines: list[str]) -> pl.DataFrame | None:
    """All lines in one polars ndjson read, or None when any line spoils it."""
    text = "\n".join(lines)
    # ndjson splits on line ends and skips blank lines: either would shift rows.
    if text.count("\n") != len(lines) - 1 or "\r" in text:
        return None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: only the per-line path can clean them
        return None
    try:
        frame = pl.read_ndjson(io.BytesIO(data), schema=plan.schema, ignore_errors=True)
    except (Exception, pl.exceptions.PanicException):  # noqa: BLE001
        # Any failure of the one-shot read (bad JSON, too deep, a polars bug) only means
        # "narrow it down": the per-line path decides what each line really is.
        return None
    if frame.height != len(lines):
        return None
    return frame.select(plan.flatten)


def _read_slow(
    plan: _Plan, lines: list[str], rows: list[int], schema: dict[str, Any]
) -> tuple[pl.DataFrame, list[tuple[int, str]]]:
    values: dict[str, list[str | None]] = {name: [] for name in plan.names}
    kept: list[int] = []
    rejected: list[tuple[int, str]] = []
    for row in rows:
        obj, reason = _load_line(lines[row])
        if reason is not None:
            rejected.append((row, reason))
            continue
        kept.append(row)
        for leaf, name in zip(plan.leaves, plan.names, strict=True):
            values[name].append(_as_text(_dig(obj, leaf)))
    frame = pl.DataFrame({**values, "row": kept}, schema=schema)
    return frame, rejected


_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _load_line(line: str) -> tuple[dict[str, Any] | None, str | None]:
    text = line.strip()
    if not text:
        return None, "empty line"
    try:
        obj = json.loads(text)
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as exc:
        return None, f"invalid JSON: {_safe_text(str(exc))[:200]}"
    if not isinstance(obj, dict):
        kind = "null" if obj is None else _JSON_TYPE_NAMES.get(type(obj), type(obj).__name__)
        return None, f"not a JSON object (got {kind})"
    return obj, None


def _dig(obj: Any, leaf: tuple[str, ...]) -> Any:
    for key in leaf:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _as_text(value: Any) -> str | None:
    """A JSON value as the text polars' ndjson reader gives for a String field."""
    if value is None:
        return None
    if isinstance(value, str):
        return _safe_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        # Python's json accepts NaN/Infinity; they carry no usable number.
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # ASCII-only, so always valid UTF-8


def _safe_text(text: str) -> str:
    # "\udc80"-style lone surrogates cannot enter polars (or any UTF-8 store): escape them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# -- column helpers (Series in, Series out) --------------------------------------------------------


def _parse_times(raw: pl.Series, tz: str) -> pl.Series:
    """ISO-8601 (offset, Z or none = tz), CLF or epoch seconds/ms/us/ns to UTC microseconds."""
    utc = pl.Datetime("us", "UTC")
    # RFC 3339 (Z or offset, any fraction) covers nearly every JSON log; it is the fast path.
    out = raw.str.strptime(utc, "%+", strict=False)
    todo = (out.is_null() & raw.is_not_null()).arg_true()
    if len(todo):
        # Only the rows the common format missed pay for the other formats.
        rest = raw.gather(todo).str.strip_chars().to_frame("raw").with_columns(
            pl.col("raw").str.replace(r"^(\d{4}-\d\d-\d\d)[ tT]", "${1}T").str.replace(r"[Zz]$", "+00:00").alias("iso")
        )
        number = pl.col("raw").cast(pl.Float64, strict=False)
        magnitude = number.abs()
        # The size of an epoch number tells its unit: 1e11 s is year 5138, 1e11 ms is 1973.
        micros = (
            pl.when(magnitude < 1e11)
            .then(number * 1e6)
            .when(magnitude < 1e14)
            .then(number * 1e3)
            .when(magnitude < 1e17)
            .then(number)
            .otherwise(number / 1e3)
        )
        epoch = pl.when(pl.col("raw").str.contains(_EPOCH) & (magnitude < 1e20)).then(
            pl.from_epoch(micros.round(0).cast(pl.Int64, strict=False), "us").dt.replace_time_zone("UTC")
        )
        naive = (
            pl.col("iso")
            .str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S%.f", strict=False)
            .dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
            .dt.convert_time_zone("UTC")
        )
        # "+00" (hours only) is valid ISO-8601 that %+ does not take.
        offset = pl.col("iso").str.strptime(utc, "%Y-%m-%dT%H:%M:%S%.f%#z", strict=False)
        clf = pl.col("raw").str.strptime(utc, "%d/%b/%Y:%H:%M:%S %z", strict=False)
        fixed = rest.select(pl.coalesce(epoch, offset, naive, clf).alias("ts"))["ts"]
        out = out.scatter(todo, fixed)
    year = out.dt.year()
    return out.to_frame("ts").select(
        pl.when((year >= _MIN_YEAR) & (year < _MAX_YEAR)).then(pl.col("ts")).alias("ts")
    )["ts"]


def _normalise_ips(raw: pl.Series) -> pl.Series:
    """Canonical address text: no brackets or port, IPv6 compressed, IPv4-mapped IPv6 as IPv4."""
    # Canonical dotted quads (the bulk of traffic) stay as they are; the rest is looked at once
    # per distinct value.
    plain_v4 = raw.str.contains(_IPV4)
    others = raw.filter(~plain_v4).drop_nulls().unique().to_list()
    if not others:
        return raw
    canonical = {value: _canonical_ip(_strip_port(value)) for value in others}
    mapped = raw.replace_strict(canonical, default=None, return_dtype=pl.String)
    return pl.DataFrame({"s": raw, "m": mapped, "v4": plain_v4}).select(
        pl.when(pl.col("v4")).then(pl.col("s")).otherwise(pl.col("m")).alias("ip")
    )["ip"]


def _strip_port(text: str) -> str:
    text = text.strip()
    match = re.match(_BRACKETED, text) or re.match(_IPV4_PORT, text)
    return match.group(1) if match else text


def _canonical_ip(text: str) -> str | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


def _split_chain(chain: str) -> list[str]:
    """X-Forwarded-For as text ("a, b") or, from JSON, as a list of strings."""
    if chain.startswith("[") and '"' in chain:
        try:
            items = json.loads(chain)
        except ValueError:
            items = None
        if isinstance(items, list):
            return [str(item) for item in items]
    return [hop for hop in chain.split(",") if hop.strip()]


def _count_recipients(raw: pl.Series) -> pl.Series:
    """A count as given, or the length of a list of addresses; the addresses go no further."""
    frame = raw.to_frame("r")
    number = pl.col("r").cast(pl.Float64, strict=False)
    counted = frame.select(
        pl.when(number.is_finite() & (number >= 0) & (number < 1e9) & (number == number.floor()))
        .then(number.cast(pl.Int64))
        # "a@x, b@y": a comma/semicolon separated list in one string.
        .when(pl.col("r").str.contains("@") & ~pl.col("r").str.starts_with("["))
        .then(
            pl.col("r")
            .str.replace_all(";", ",")
            .str.split(",")
            .list.eval(pl.element().str.strip_chars().str.len_chars() > 0)
            .list.sum()
            .cast(pl.Int64)
        )
        .alias("n")
    )["n"]
    lists = (raw.str.starts_with("[") & raw.str.ends_with("]")).arg_true()
    if len(lists):
        texts = raw.gather(lists)
        lengths = {text: _json_list_length(text) for text in texts.unique().to_list()}
        counted = counted.scatter(lists, texts.replace_strict(lengths, default=None, return_dtype=pl.Int64))
    return counted


def _json_list_length(text: str) -> int | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return len(value) if isinstance(value, list) else None
