"""The vocabulary every stage shares: event columns, outcomes, severities, alerts and errors."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any


class Outcome(enum.StrEnum):
    """What a request or login attempt came to; parsers set it, detectors read it."""

    OK = "ok"
    AUTH_FAILED = "auth_failed"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    CLIENT_ERROR = "client_error"
    SERVER_ERROR = "server_error"


class Service(enum.StrEnum):
    API = "api"
    SMTP = "smtp"
    IMAP = "imap"
    POP3 = "pop3"
    WEB = "web"


class Severity(enum.IntEnum):
    """Ordered, so `severity >= Severity.HIGH` reads naturally."""

    INFO = 10
    LOW = 20
    MEDIUM = 30
    HIGH = 40
    CRITICAL = 50

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | Severity) -> Severity:
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ConfigError(f"unknown severity {value!r} (expected one of: {names})") from None


class EntityKind(enum.StrEnum):
    IP = "ip"
    SUBNET = "subnet"
    API_KEY = "api_key"
    ACCOUNT = "account"


class AlertStatus(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    SILENCED = "silenced"


class Flag(enum.StrEnum):
    """Facts about one line worth a finding by themselves; stored `|`-joined in `flags`."""

    SECRET_IN_URL = "secret_in_url"
    TLS_ON_PLAIN_PORT = "tls_on_plain_port"
    BINARY_REQUEST = "binary_request"
    EMPTY_REQUEST = "empty_request"
    PASSWORD_LOGGED = "password_logged"


# Event columns in store order, with their polars dtype names. `event_id` and `origin` are
# set by the ingest job (they describe where a line was read); parsers fill the rest.
EVENT_COLUMNS: dict[str, str] = {
    "event_id": "str",
    "ts": "datetime",
    "source_ip": "str",
    "service": "str",
    "scheme": "str",
    "method": "str",
    "path": "str",
    "status": "int",
    "outcome": "str",
    "api_key_id": "str",
    "account": "str",
    "user_agent": "str",
    "bytes": "int",
    "duration_ms": "float",
    "recipients": "int",
    "flags": "str",
    "origin": "str",
}

PARSED_COLUMNS = [c for c in EVENT_COLUMNS if c not in ("event_id", "origin")]


def polars_schema() -> dict[str, Any]:
    """Polars dtypes of the event columns (imported lazily: parsers and store use polars)."""
    import polars as pl

    mapping = {
        "str": pl.String,
        "datetime": pl.Datetime("us", "UTC"),
        "int": pl.Int64,
        "float": pl.Float64,
    }
    return {name: mapping[kind] for name, kind in EVENT_COLUMNS.items()}


def pandas_dtypes() -> dict[str, str]:
    """Pandas dtypes for frames handed to detectors."""
    mapping = {
        "str": "string",
        "datetime": "datetime64[us, UTC]",
        "int": "Int64",
        "float": "Float64",
    }
    return {name: mapping[kind] for name, kind in EVENT_COLUMNS.items()}


def event_ids(source_key: str, offsets: list[int]) -> list[str]:
    """Where a line was read is its identity (source content key + byte offset), not its text:
    identical lines that are distinct requests stay distinct, re-reads collide. 40 chars."""
    prefix = source_key[:24]
    return [f"{prefix}{offset:016d}" for offset in offsets]


def event_id_expr(source_key: str, offsets: Any) -> Any:
    """`event_ids` as a polars expression over an offsets column (same strings, vectorised)."""
    import polars as pl

    return pl.lit(source_key[:24]) + offsets.cast(pl.String).str.zfill(16)


def alert_id_for(detector: str, entity_kind: str, entity: str, window_start: datetime) -> str:
    """Stable id: the same detector, entity and window always give the same alert."""
    key = f"{detector}|{entity_kind}|{entity}|{window_start.astimezone(timezone.utc).isoformat()}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class Alert:
    """One finding about one entity over one window, with the evidence to triage it."""

    detector: str
    severity: Severity
    entity_kind: EntityKind
    entity: str
    window_start: datetime
    window_end: datetime
    score: float
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    mitre: str | None = None
    status: AlertStatus = AlertStatus.OPEN

    @property
    def alert_id(self) -> str:
        return alert_id_for(self.detector, str(self.entity_kind), self.entity, self.window_start)

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["alert_id"] = self.alert_id
        row["severity"] = int(self.severity)
        row["entity_kind"] = str(self.entity_kind)
        row["status"] = str(self.status)
        row["evidence"] = json.dumps(self.evidence, default=str, sort_keys=True)
        return row


class MailwardenError(Exception):
    """Base of every error the CLI reports in one line."""


class ConfigError(MailwardenError):
    pass


class StoreError(MailwardenError):
    pass


class ParseError(MailwardenError):
    def __init__(self, source: str, line_no: int, reason: str):
        super().__init__(f"{source}:{line_no}: {reason}")
        self.source, self.line_no, self.reason = source, line_no, reason


class NotifyError(MailwardenError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable
