"""The parser contract: a batch of lines in, a frame of events and a list of rejects out."""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

import polars as pl

from pipeline.schema import PARSED_COLUMNS, Outcome, polars_schema

# Event times are kept only within these years (the last excluded). A log line dated 0001 or 9999
# is a broken clock or a forged line, and one of them would stretch every range computed over the
# store (days to step through, buckets to draw) across millennia.
MIN_YEAR, MAX_YEAR = 1970, 2200


@dataclass
class ParseContext:
    """Everything a parser may need besides the lines; parsers never read config or clocks."""

    pepper: bytes = b"mailwarden-test-pepper"
    # Client addresses of proxies whose X-Forwarded-For we believe (CIDRs).
    trusted_proxies: Sequence[str] = ()
    # Time zone of syslog timestamps that carry no offset.
    timezone: str = "UTC"
    # Syslog lines have no year; lines are assumed to lie in the 12 months before this instant
    # (the file's modification time when reading files).
    reference_time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # nginx `log_format` string for the combined parser (None: combined/common).
    log_format: str | None = None
    # JSON parser: a built-in mapping name or an explicit {event column: json field path} dict.
    json_mapping: str | dict[str, Any] | None = None

    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.trusted_proxies]


@dataclass
class ParsedBatch:
    """`events` has the PARSED_COLUMNS plus `row` (index of the line in the batch).

    Invariant: every row index 0..n-1 is in exactly one of `events["row"]` or `rejected`.
    """

    events: pl.DataFrame
    rejected: list[tuple[int, str]]

    @classmethod
    def empty(cls) -> ParsedBatch:
        return cls(events=empty_events(), rejected=[])


class Parser(ABC):
    """One log format. Instances are made per source, so a parser may compile its config once."""

    name: ClassVar[str]

    def __init__(self, ctx: ParseContext):
        self.ctx = ctx

    @abstractmethod
    def parse(self, lines: Sequence[str]) -> ParsedBatch:
        """Parse many lines at once (vectorised), falling back per line only where needed."""

    @classmethod
    def sniff(cls, lines: Sequence[str]) -> float:
        """Share (0..1) of these sample lines this format recognises; used by `auto`."""
        return 0.0


def event_frame_schema() -> dict[str, Any]:
    full = polars_schema()
    schema = {c: full[c] for c in PARSED_COLUMNS}
    schema["row"] = pl.Int64
    return schema


def empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema=event_frame_schema())


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Add missing event columns as nulls, cast to the declared dtypes, order the columns."""
    schema = event_frame_schema()
    exprs = []
    for name, dtype in schema.items():
        if name in frame.columns:
            exprs.append(pl.col(name).cast(dtype, strict=False))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    return frame.select(exprs)


def outcome_from_http_status(status: pl.Expr) -> pl.Expr:
    """HTTP status code to Outcome: the one place codes become vocabulary."""
    return (
        pl.when(status.is_null())
        .then(pl.lit(Outcome.CLIENT_ERROR.value))
        .when(status.is_in([401, 407]))
        .then(pl.lit(Outcome.AUTH_FAILED.value))
        .when(status == 403)
        .then(pl.lit(Outcome.FORBIDDEN.value))
        .when(status == 429)
        .then(pl.lit(Outcome.RATE_LIMITED.value))
        .when(status >= 500)
        .then(pl.lit(Outcome.SERVER_ERROR.value))
        .when(status >= 400)
        .then(pl.lit(Outcome.CLIENT_ERROR.value))
        .otherwise(pl.lit(Outcome.OK.value))
    )


def scalar_outcome(status: int | None) -> str:
    frame = pl.DataFrame({"s": [status]}, schema={"s": pl.Int64})
    return frame.select(outcome_from_http_status(pl.col("s")).alias("o"))["o"][0]


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
