"""Syslog-family line prefixes (RFC 3164/5424, ISO, journald, TAI64N, Exim) to UTC times and headers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from pipeline.schema import ConfigError

# rsyslog's default maximum message size is 8 KiB; anything far beyond that is not a log line
# worth running regexes over, and capping it keeps a hostile file from costing unbounded time.
MAX_LINE_CHARS = 65_536

MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_MONTH_ALT = "|".join(MONTHS)

# Character classes are spelled [0-9] because \d is Unicode-aware in both regex engines, and every
# pattern starts with (?s) so a stray newline inside a "line" cannot make `.` stop short.
_DATE = r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})"
_CLOCK = r"(?P<clock>[0-9]{2}:[0-9]{2}:[0-9]{2})"
_FRAC = r"(?:[.,](?P<frac>[0-9]{1,9}))?"
# `Z`, `+01:00` (RFC 3339), `+0100` (journald short-iso, Exim log_timezone) or Exim's `[+0100]`.
_OFFSET = r"(?P<off>[Zz]|[+-][0-9]{2}:?[0-9]{2}| [+-][0-9]{4}| \[[+-][0-9]{4}\])?"

# Timestamp heads, matched against a line's first HEAD_CHARS characters only: capturing the whole
# rest of every line costs several times more than finding where its timestamp ends.
HEAD_CHARS = 64
ISO_HEAD = rf"(?s)^(?P<head>(?:<[0-9]{{1,3}}>)?{_DATE}[T ]{_CLOCK}{_FRAC}{_OFFSET} +)"
BSD_HEAD = (
    rf"(?s)^(?P<head>(?:<[0-9]{{1,3}}>)?(?P<mon>{_MONTH_ALT}) {{1,2}}(?P<day>[0-9]{{1,2}}) "
    rf"{_CLOCK}(?:\.(?P<frac>[0-9]{{1,9}}))? +)"
)
# daemontools/multilog: `@` + 16 hex digits of TAI64 seconds + 8 hex digits of nanoseconds.
TAI64N_HEAD = r"(?s)^(?P<head>@(?P<sec>[0-9a-fA-F]{16})(?P<nano>[0-9a-fA-F]{8}) +)"
# RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD...]|- MSG; SD values may escape `]`.
RFC5424 = (
    r"(?s)^<[0-9]{1,3}>1 (?P<stamp>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) \S+ "
    r"(?:-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: \x{FEFF}?(?P<msg>.*))?$"
)
# `[host ]tag[pid]: message`. The host token may not end in `:` so `pop3-login: Info: ...` (no
# host) is read as tag `pop3-login`; tags may carry `(label)` and `<session>` parts, as
# Dovecot's `auth-worker(123)` and `auth(user,ip,sasl:plain)<id>` do.
HEADER = (
    r"(?s)^(?:(?P<host>[^\s\[\]]*[^\s:\[\]]) )?(?P<program>[^\s\[\]():]+)"
    r"(?:\[(?P<pid>[0-9]*)\]|\((?P<label>[^)]*)\)(?:<[^>]*>)*)?:(?: (?P<message>.*))?$"
)

# 2^62 marks TAI64's epoch; the extra 10 s are the TAI-UTC difference of 1970 by TAI64 convention
# (daemontools ignores later leap seconds, and so do we).
TAI64_EPOCH = 2**62 + 10
_MAX_EPOCH_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the end of what datetimes hold

UTC_DTYPE = pl.Datetime("us", "UTC")
FOLD_JITTER = timedelta(minutes=1)


@dataclass(frozen=True)
class Clock:
    """How to read times that carry neither year nor offset (resolved once per parser)."""

    tz: str
    reference_year: int
    reference_month: int
    reference_day: int = 31

    @classmethod
    def from_context(cls, tz: str, reference_time: datetime) -> Clock:
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"unknown time zone {tz!r}: {exc}") from None
        if reference_time.tzinfo is None:
            reference_time = reference_time.replace(tzinfo=timezone.utc)
        local = reference_time.astimezone(zone)
        return cls(tz=tz, reference_year=local.year, reference_month=local.month, reference_day=local.day)


def split_lines(lines: pl.Series, clock: Clock, *, header: bool = True) -> pl.DataFrame:
    """One row per line, in order: `ts` (UTC or null), `ts_error` (why `ts` is null) and `rest`
    (the text after the timestamp, syslog header included); with `header`, also `host`,
    `program`, `pid`, `label` and `message` parsed from `rest`.

    Each line goes through one timestamp pattern, chosen by its first character. Lines without a
    leading timestamp but with an Exim one right after their syslog header (journald's
    `host exim[pid]: 2021-07-17 23:20:49 ...`) take that one, and keep the whole line as `rest`.
    """
    base = pl.DataFrame({"line": lines.cast(pl.String)}).with_row_index("i")
    base = _rewrite_5424(base)
    norm = pl.col("norm")
    first = norm.str.slice(0, 1)
    base = base.with_columns(
        pl.when(first == "@").then(pl.lit("tai"))
        .when(first.str.contains(r"^[0-9]")).then(pl.lit("iso"))
        .when(first.str.contains(r"^[A-Z]")).then(pl.lit("bsd"))
        # A leading <PRI> may precede either an ISO or a BSD stamp.
        .when(first == "<").then(pl.lit("pri"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("route")
    )

    found: list[pl.DataFrame] = []
    left = base
    for kind, pattern, routes in (
        ("tai", TAI64N_HEAD, ("tai",)),
        ("iso", ISO_HEAD, ("iso", "pri")),
        ("bsd", BSD_HEAD, ("bsd", "pri")),
    ):
        part = _extract(left.filter(pl.col("route").is_in(routes)), pattern)
        # RFC 5424 requires an offset: a 5424 stamp without one is unreadable, not local time.
        if kind == "iso":
            part = part.filter(~pl.col("is_5424") | pl.col("off").is_not_null())
        found.append(_stamp_parts(part, kind, clock))
        left = left.join(part.select("i"), on="i", how="anti")

    # Journald exports of Exim: `host exim[pid]: 2021-07-17 23:20:49 ...`.
    embedded = left.with_columns(norm.str.extract_groups(HEADER).struct.field("message").alias("msg"))
    embedded = _extract(embedded.filter(pl.col("msg").is_not_null()), ISO_HEAD, "msg")
    found.append(_stamp_parts(embedded.with_columns(norm.alias("rest")), "emb", clock))

    stamps = pl.concat(found, how="vertical")
    frame = base.select("i", "norm").join(stamps, on="i", how="left", maintain_order="left")
    frame = frame.with_columns(_wall_and_offset().alias("parts"))
    frame = _localize_rows(frame, clock.tz)
    frame = frame.with_columns(
        pl.coalesce("ts_fixed", "ts_local").alias("ts"),
        pl.col("rest").fill_null(norm),
    )
    k = pl.col("kind")
    frame = frame.with_columns(
        pl.when(pl.col("ts").is_not_null()).then(pl.lit(None, dtype=pl.String))
        .when(k.is_null()).then(pl.lit("no recognised timestamp"))
        .when(k == "tai").then(pl.lit("TAI64N label out of range"))
        .when(pl.col("wall").is_null()).then(pl.lit("invalid date or time in timestamp"))
        .when(pl.col("off").is_not_null()).then(pl.lit("invalid UTC offset in timestamp"))
        .otherwise(pl.lit(f"local time does not exist in {clock.tz} (daylight-saving gap)"))
        .alias("ts_error")
    )
    if not header:
        return frame.select("ts", "ts_error", "rest")
    h = pl.col("rest").str.extract_groups(HEADER).struct
    return frame.select(
        "ts",
        "ts_error",
        h.field("host").alias("host"),
        h.field("program").alias("program"),
        h.field("pid").alias("pid"),
        h.field("label").alias("label"),
        pl.coalesce(h.field("message"), pl.col("rest")).alias("message"),
        "rest",
    )


def _rewrite_5424(base: pl.DataFrame) -> pl.DataFrame:
    """`norm`: RFC 5424 lines rewritten as `STAMP HOST APP[PROCID]: MSG`, others unchanged."""
    line = pl.col("line")
    candidates = base.filter(line.str.starts_with("<"))
    parsed = candidates.with_columns(line.str.extract_groups(RFC5424).alias("g")).unnest("g")
    parsed = parsed.filter(pl.col("stamp").is_not_null())
    app = pl.when(pl.col("app") == "-").then(pl.lit("")).otherwise(pl.col("app"))
    pid = pl.when(pl.col("procid") == "-").then(pl.lit("")).otherwise("[" + pl.col("procid") + "]")
    rewritten = parsed.select(
        "i",
        pl.concat_str(
            [pl.col("stamp"), pl.lit(" "), pl.col("host"), pl.lit(" "), app, pid, pl.lit(": "),
             pl.col("msg").fill_null("")]
        ).alias("rewritten"),
    )
    joined = base.join(rewritten, on="i", how="left", maintain_order="left")
    return joined.select(
        "i",
        pl.coalesce("rewritten", "line").alias("norm"),
        pl.col("rewritten").is_not_null().alias("is_5424"),
    )


def _extract(part: pl.DataFrame, head_pattern: str, column: str = "norm") -> pl.DataFrame:
    """Rows of `part` whose `column` starts with `head_pattern`: its groups, and `rest` after it."""
    text = pl.col(column)
    groups = text.str.slice(0, HEAD_CHARS).str.extract_groups(head_pattern)
    extracted = part.with_columns(groups.alias("g")).unnest("g").filter(pl.col("head").is_not_null())
    return extracted.with_columns(
        text.str.slice(pl.col("head").str.len_chars()).str.strip_chars_start(" ").alias("rest")
    )


_PARTS_SCHEMA: dict[str, pl.DataType] = {
    "i": pl.UInt32,
    "kind": pl.String,
    "wall_text": pl.String,  # "YYYY-MM-DD HH:MM:SS" wall clock (no fraction, no offset)
    "frac": pl.String,
    "off": pl.String,
    "sec": pl.String,
    "nano": pl.String,
    "rest": pl.String,
}


def _stamp_parts(part: pl.DataFrame, kind: str, clock: Clock) -> pl.DataFrame:
    """The matched pieces of one timestamp family in one schema, ready to be combined."""
    exprs: dict[str, pl.Expr] = {"kind": pl.lit(kind)}
    if kind == "bsd":
        # RFC 3164 stamps have no year: the line lies within the 12 months up to the reference,
        # so a date after the reference date belongs to the previous year (a log across New Year,
        # or an old log read today: Dec 30 read on Dec 4 is last year's). A day of slack allows
        # for clocks and zones that differ a little from the reference.
        month = pl.col("mon").replace_strict(MONTHS, default=None, return_dtype=pl.Int32)
        day = pl.col("day").str.strip_chars().cast(pl.Int32, strict=False)
        later = (month > clock.reference_month) | (
            (month == clock.reference_month) & (day > clock.reference_day + 1)
        )
        year = (
            pl.when(later)
            .then(pl.lit(clock.reference_year - 1))
            .otherwise(pl.lit(clock.reference_year))
        )
        exprs["wall_text"] = pl.concat_str(
            [year.cast(pl.String), pl.lit("-"), month.cast(pl.String).str.zfill(2), pl.lit("-"),
             pl.col("day").str.zfill(2), pl.lit(" "), pl.col("clock")]
        )
    elif kind in ("iso", "emb"):
        exprs["wall_text"] = pl.concat_str([pl.col("date"), pl.lit(" "), pl.col("clock")])
    columns = []
    for name, dtype in _PARTS_SCHEMA.items():
        if name in exprs:
            columns.append(exprs[name].cast(dtype).alias(name))
        elif name in part.columns:
            columns.append(pl.col(name).cast(dtype))
        else:
            columns.append(pl.lit(None, dtype=dtype).alias(name))
    return part.select(columns)


def _wall_and_offset() -> pl.Expr:
    """Struct of the naive wall time (fraction included) and the offset in seconds, if any."""
    micros = pl.col("frac").str.slice(0, 6).str.pad_end(6, "0").cast(pl.Int64, strict=False).fill_null(0)
    wall = pl.col("wall_text").str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S", strict=False)
    return pl.struct(
        (wall + pl.duration(microseconds=micros)).alias("wall"),
        _offset_seconds(pl.col("off")).alias("off_s"),
    )


def _localize_rows(frame: pl.DataFrame, tz: str) -> pl.DataFrame:
    """Adds `wall`, `ts_fixed` (UTC from TAI64N or an offset) and `ts_local` (UTC from local)."""
    parts = pl.col("parts").struct
    frame = frame.with_columns(parts.field("wall").alias("wall"), parts.field("off_s").alias("off_s"))
    sec = pl.col("sec").str.to_integer(base=16, strict=False) - TAI64_EPOCH
    nano = pl.col("nano").str.to_integer(base=16, strict=False)
    tai_ok = sec.is_between(0, _MAX_EPOCH_SECONDS) & (nano < 1_000_000_000)
    tai_ts = pl.when(tai_ok).then(
        pl.from_epoch(sec * 1_000_000 + nano // 1000, time_unit="us").dt.replace_time_zone("UTC")
    )
    with_offset = (pl.col("wall") - pl.duration(seconds=pl.col("off_s"))).dt.replace_time_zone("UTC")
    frame = frame.with_columns(
        pl.when(pl.col("kind") == "tai").then(tai_ts)
        .when(pl.col("off").is_not_null() & pl.col("off_s").is_not_null()).then(with_offset)
        .otherwise(pl.lit(None, dtype=UTC_DTYPE))
        .alias("ts_fixed"),
        pl.when(pl.col("kind").is_in(["bsd", "iso", "emb"]) & pl.col("off").is_null())
        .then(pl.col("wall"))
        .otherwise(pl.lit(None, dtype=pl.Datetime("us")))
        .alias("local"),
    )
    if tz == "UTC":
        return frame.with_columns(pl.col("local").dt.replace_time_zone("UTC").alias("ts_local"))
    # Zone rules depend only on the wall time: resolve each distinct value once. Only a batch that
    # holds a repeated (autumn) hour needs the order-dependent reading.
    distinct = frame.select(pl.col("local").unique().drop_nulls())
    resolved = distinct.with_columns(
        pl.col("local").dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").alias("e"),
        pl.col("local").dt.replace_time_zone(tz, ambiguous="latest", non_existent="null").alias("l"),
    )
    if resolved.filter(pl.col("e") != pl.col("l")).height:
        return frame.with_columns(localize(pl.col("local"), tz).alias("ts_local"))
    mapping = resolved.select("local", pl.col("e").dt.convert_time_zone("UTC").alias("ts_local"))
    return frame.join(mapping, on="local", how="left", maintain_order="left")


def _offset_seconds(off: pl.Expr) -> pl.Expr:
    """`Z`, `+01:00`, `+0100`, ` [+0100]` to seconds east of UTC; null when out of range."""
    digits = off.str.replace_all(r"[^0-9]", "")
    hours = digits.str.slice(0, 2).cast(pl.Int64, strict=False)
    minutes = digits.str.slice(2, 2).cast(pl.Int64, strict=False)
    sign = pl.when(off.str.contains("-", literal=True)).then(-1).otherwise(1)
    seconds = sign * (hours * 3600 + minutes * 60)
    valid = (hours <= 18) & (minutes <= 59)
    return (
        pl.when(off.str.to_uppercase() == "Z").then(pl.lit(0, dtype=pl.Int64))
        .when(valid).then(seconds)
        .otherwise(pl.lit(None, dtype=pl.Int64))
    )


def localize(wall: pl.Expr, tz: str) -> pl.Expr:
    """Naive local wall times in `tz` to UTC, in row order.

    Times in the repeated hour when clocks go back are ambiguous. Within a batch we read them as
    the first pass until the log's clock has visibly gone backwards inside that hour on that day,
    and as the second pass from then on, so a log written across the change stays in order.
    Steps back of a minute or less are the usual jitter between processes writing one log, not
    the change. Times inside the skipped hour do not exist and become null.
    """
    earliest = wall.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    latest = wall.dt.replace_time_zone(tz, ambiguous="latest", non_existent="null")
    ambiguous = earliest.is_not_null() & (earliest != latest)
    day = wall.dt.date()
    previous_max = wall.shift(1).cum_max().over(day)
    went_back = (ambiguous & (previous_max - wall > FOLD_JITTER)).fill_null(False)
    second_pass = went_back.cast(pl.Int32).cum_sum().over(day) > 0
    chosen = pl.when(ambiguous & second_pass).then(latest).otherwise(earliest)
    return chosen.dt.convert_time_zone("UTC")


def line_series(lines: Sequence[object]) -> tuple[pl.Series, list[tuple[int, str]]]:
    """Lines as a String series; non-text entries become null and are reported as rejects.

    Lone surrogates (which polars cannot hold) are written as backslash escapes, the same
    convention sources use for undecodable bytes.
    """
    try:
        return pl.Series("line", lines, dtype=pl.String, strict=True), []
    except (TypeError, ValueError, UnicodeError, pl.exceptions.PolarsError):
        pass
    clean: list[str | None] = []
    rejected: list[tuple[int, str]] = []
    for row, line in enumerate(lines):
        if not isinstance(line, str):
            clean.append(None)
            rejected.append((row, "line is not text"))
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        clean.append(line)
    return pl.Series("line", clean, dtype=pl.String), rejected
