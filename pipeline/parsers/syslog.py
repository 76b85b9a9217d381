"""Syslog-family line prefixes (RFC 3164/5424, ISO, journald, TAI64N, Exim) to UTC times and headers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
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

ISO_PREFIX = rf"(?s)^(?:<[0-9]{{1,3}}>)?{_DATE}[T ]{_CLOCK}{_FRAC}{_OFFSET} +(?P<rest>.*)$"
BSD_PREFIX = (
    rf"(?s)^(?:<[0-9]{{1,3}}>)?(?P<mon>{_MONTH_ALT}) {{1,2}}(?P<day>[0-9]{{1,2}}) "
    rf"{_CLOCK}(?:\.(?P<frac>[0-9]{{1,9}}))? +(?P<rest>.*)$"
)
# daemontools/multilog: `@` + 16 hex digits of TAI64 seconds + 8 hex digits of nanoseconds.
TAI64N_PREFIX = r"(?s)^@(?P<sec>[0-9a-fA-F]{16})(?P<nano>[0-9a-fA-F]{8}) +(?P<rest>.*)$"
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


@dataclass(frozen=True)
class Clock:
    """How to read times that carry neither year nor offset (resolved once per parser)."""

    tz: str
    reference_year: int
    reference_month: int

    @classmethod
    def from_context(cls, tz: str, reference_time: datetime) -> Clock:
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"unknown time zone {tz!r}: {exc}") from None
        if reference_time.tzinfo is None:
            reference_time = reference_time.replace(tzinfo=timezone.utc)
        local = reference_time.astimezone(zone)
        return cls(tz=tz, reference_year=local.year, reference_month=local.month)


def split_lines(lines: pl.Series, clock: Clock) -> pl.DataFrame:
    """One row per line: `ts` (UTC or null), `ts_error`, `host`, `program`, `pid`, `label`,
    `message` and `rest` (the text after the timestamp, header included).

    `ts_error` says why `ts` is null. Lines without a leading timestamp but with an Exim
    timestamp right after their header (journald's `host exim[pid]: 2021-07-17 23:20:49 ...`)
    take that one.
    """
    frame = pl.DataFrame({"line": lines.cast(pl.String)})
    line = pl.col("line")
    s5424 = line.str.extract_groups(RFC5424)
    frame = frame.with_columns(s5424.alias("s5424"))
    f = pl.col("s5424").struct
    # An RFC 5424 line is rewritten into `STAMP HOST APP[PROCID]: MSG` so one ISO path handles it.
    app = pl.when(f.field("app") == "-").then(pl.lit("")).otherwise(f.field("app"))
    pid = pl.when(f.field("procid") == "-").then(pl.lit("")).otherwise("[" + f.field("procid") + "]")
    rewritten = pl.concat_str(
        [f.field("stamp"), pl.lit(" "), f.field("host"), pl.lit(" "), app, pid, pl.lit(": "),
         f.field("msg").fill_null("")]
    )
    frame = frame.with_columns(
        pl.when(f.field("stamp").is_not_null()).then(rewritten).otherwise(line).alias("norm"),
        f.field("stamp").is_not_null().alias("is_5424"),
    ).drop("s5424")

    norm = pl.col("norm")
    frame = frame.with_columns(
        norm.str.extract_groups(TAI64N_PREFIX).alias("tai"),
        norm.str.extract_groups(ISO_PREFIX).alias("iso"),
        norm.str.extract_groups(BSD_PREFIX).alias("bsd"),
    )
    tai, iso, bsd = (pl.col(c).struct for c in ("tai", "iso", "bsd"))

    # Where no timestamp leads, look for one right after a syslog header (journald exports).
    frame = frame.with_columns(
        pl.when(tai.field("rest").is_null() & iso.field("rest").is_null() & bsd.field("rest").is_null())
        .then(norm.str.extract_groups(HEADER).struct.field("message"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .str.extract_groups(ISO_PREFIX)
        .alias("emb")
    )
    emb = pl.col("emb").struct

    # RFC 5424 requires an offset; a 5424 stamp without one is treated as unreadable.
    iso_ok = iso.field("rest").is_not_null() & (~pl.col("is_5424") | iso.field("off").is_not_null())
    kind = (
        pl.when(tai.field("rest").is_not_null()).then(pl.lit("tai"))
        .when(iso_ok).then(pl.lit("iso"))
        .when(bsd.field("rest").is_not_null()).then(pl.lit("bsd"))
        .when(emb.field("rest").is_not_null()).then(pl.lit("emb"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    frame = frame.with_columns(kind.alias("kind"))
    k = pl.col("kind")

    def pick(field: str) -> pl.Expr:
        return (
            pl.when(k == "iso").then(iso.field(field))
            .when(k == "emb").then(emb.field(field))
            .otherwise(pl.lit(None, dtype=pl.String))
        )

    # ISO-style stamps (leading or embedded): naive wall time plus optional offset.
    frame = frame.with_columns(
        pick("date").alias("i_date"),
        pick("clock").alias("i_clock"),
        pl.when(k.is_in(["iso", "emb"])).then(pick("frac"))
        .when(k == "bsd").then(bsd.field("frac"))
        .otherwise(pl.lit(None, dtype=pl.String)).alias("frac"),
        pick("off").alias("off"),
        pl.when(k == "tai").then(tai.field("rest"))
        .when(k == "iso").then(iso.field("rest"))
        .when(k == "bsd").then(bsd.field("rest"))
        .when(k == "emb").then(norm)
        .otherwise(norm).alias("rest"),
    )

    # RFC 3164 stamps have no year: the line lies within the 12 months up to the reference, so
    # a month after the reference month belongs to the previous year (a log across New Year).
    month = bsd.field("mon").replace_strict(MONTHS, default=None, return_dtype=pl.Int32)
    year = (
        pl.when(month > clock.reference_month)
        .then(pl.lit(clock.reference_year - 1))
        .otherwise(pl.lit(clock.reference_year))
    )
    bsd_text = pl.concat_str(
        [year.cast(pl.String), pl.lit("-"), month.cast(pl.String).str.zfill(2), pl.lit("-"),
         bsd.field("day").str.zfill(2), pl.lit(" "), bsd.field("clock")]
    )
    iso_text = pl.concat_str([pl.col("i_date"), pl.lit(" "), pl.col("i_clock")])
    wall_text = pl.when(k == "bsd").then(bsd_text).otherwise(iso_text)
    micros = pl.col("frac").str.slice(0, 6).str.pad_end(6, "0").cast(pl.Int64, strict=False).fill_null(0)
    frame = frame.with_columns(
        (
            wall_text.str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S", strict=False)
            + pl.duration(microseconds=micros)
        ).alias("wall"),
        _offset_seconds(pl.col("off")).alias("off_s"),
    )

    # TAI64N labels.
    sec = tai.field("sec").str.to_integer(base=16, strict=False) - TAI64_EPOCH
    nano = tai.field("nano").str.to_integer(base=16, strict=False)
    tai_ok = sec.is_between(0, _MAX_EPOCH_SECONDS) & (nano < 1_000_000_000)
    tai_ts = pl.when(tai_ok).then(
        pl.from_epoch(sec * 1_000_000 + nano // 1000, time_unit="us").dt.replace_time_zone("UTC")
    )

    with_offset = pl.col("wall") - pl.duration(seconds=pl.col("off_s"))
    frame = frame.with_columns(
        pl.when(k == "tai").then(tai_ts)
        .when(pl.col("off").is_not_null() & pl.col("off_s").is_not_null())
        .then(with_offset.dt.replace_time_zone("UTC"))
        .otherwise(pl.lit(None, dtype=UTC_DTYPE))
        .alias("ts_fixed")
    )
    local_rows = k.is_in(["bsd", "iso", "emb"]) & pl.col("off").is_null()
    frame = frame.with_columns(
        pl.when(local_rows).then(pl.col("wall")).otherwise(pl.lit(None, dtype=pl.Datetime("us"))).alias("local")
    )
    frame = frame.with_columns(localize(pl.col("local"), clock.tz).alias("ts_local"))
    frame = frame.with_columns(pl.coalesce("ts_fixed", "ts_local").alias("ts"))

    frame = frame.with_columns(
        pl.when(pl.col("ts").is_not_null()).then(pl.lit(None, dtype=pl.String))
        .when(k.is_null()).then(pl.lit("no recognised timestamp"))
        .when(k == "tai").then(pl.lit("TAI64N label out of range"))
        .when(pl.col("wall").is_null()).then(pl.lit("invalid date or time in timestamp"))
        .when(pl.col("off").is_not_null()).then(pl.lit("invalid UTC offset in timestamp"))
        .otherwise(pl.lit(f"local time does not exist in {clock.tz} (daylight-saving gap)"))
        .alias("ts_error")
    )

    header = pl.col("rest").str.extract_groups(HEADER)
    frame = frame.with_columns(header.alias("hdr"))
    h = pl.col("hdr").struct
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
    Times inside the skipped hour do not exist and become null.
    """
    earliest = wall.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    latest = wall.dt.replace_time_zone(tz, ambiguous="latest", non_existent="null")
    ambiguous = earliest.is_not_null() & (earliest != latest)
    day = wall.dt.date()
    previous_max = wall.shift(1).cum_max().over(day)
    went_back = (ambiguous & (previous_max > wall)).fill_null(False)
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
