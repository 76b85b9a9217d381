"""Request and response models of the API (the OpenAPI schema at /docs is generated from these)."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.schema import Severity


class EventOut(BaseModel):
    event_id: str
    ts: datetime
    source_ip: str | None = None
    service: str | None = None
    scheme: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    outcome: str | None = None
    api_key_id: str | None = None
    account: str | None = None
    user_agent: str | None = None
    bytes: int | None = None
    duration_ms: float | None = None
    recipients: int | None = None
    flags: str | None = None
    origin: str | None = None


class EventPage(BaseModel):
    items: list[EventOut]
    limit: int = Field(description="Rows asked for, after the hard cap.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end.")


class AlertOut(BaseModel):
    alert_id: str
    detector: str
    severity: str
    severity_level: int
    entity_kind: str
    entity: str
    window_start: datetime
    window_end: datetime
    score: float
    title: str
    evidence: dict[str, Any]
    mitre: str | None = None
    status: str
    created_at: datetime
    updated_at: datetime
    silenced_by: str | None = Field(None, description="Id of an active silence that matches this alert.")

    @classmethod
    def from_row(cls, row: dict[str, Any], silenced_by: str | None = None) -> AlertOut:
        return cls(
            **{k: v for k, v in row.items() if k != "severity"},
            severity=str(Severity(row["severity"])),
            severity_level=int(row["severity"]),
            silenced_by=silenced_by,
        )


class AlertPage(BaseModel):
    items: list[AlertOut]
    total: int
    limit: int
    offset: int


class AlertDetail(AlertOut):
    events: list[EventOut]


class TopEntry(BaseModel):
    value: str
    requests: int
    failures: int = Field(description="Requests whose outcome is not ok.")
    auth_failures: int


class StatsOut(BaseModel):
    since: datetime | None
    until: datetime | None
    requests: int
    failures: int
    auth_failures: int
    by_outcome: dict[str, int]
    top_ips: list[TopEntry]
    top_keys: list[TopEntry]


class SilenceIn(BaseModel):
    # A misspelt field (ends_at, matchers) is a 422 naming it, not silently a different silence.
    model_config = ConfigDict(extra="forbid")

    detector: str | None = Field(None, max_length=64)
    entity: str | None = Field(None, max_length=512)
    cidr: str | None = Field(None, max_length=64, description="Matches alerts about addresses or subnets inside it.")
    comment: str = Field(..., min_length=1, max_length=2000)
    expires_at: datetime | None = None
    duration_minutes: int | None = Field(None, ge=1, le=366 * 24 * 60)

    @field_validator("detector")
    @classmethod
    def _known_detector(cls, value: str | None) -> str | None:
        """A misspelt detector would mute nothing while looking in place; the config refuses it too."""
        if not value:
            return value
        from detectors.registry import DETECTORS  # lazily: it imports the models (scikit-learn)

        if value not in DETECTORS:
            raise ValueError(f"unknown detector {value!r} (known: {', '.join(sorted(DETECTORS))})")
        return value

    @field_validator("cidr")
    @classmethod
    def _valid_cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not a CIDR (e.g. 203.0.113.0/24)") from None

    @model_validator(mode="after")
    def _needs_matcher_and_expiry(self) -> SilenceIn:
        if not (self.detector or self.entity or self.cidr):
            raise ValueError("a silence needs at least one matcher: detector, entity or cidr")
        if (self.expires_at is None) == (self.duration_minutes is None):
            raise ValueError("give exactly one of expires_at or duration_minutes")
        return self


class SilencePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str | None = Field(None, min_length=1, max_length=2000)
    expires_at: datetime | None = None


class SilenceOut(BaseModel):
    silence_id: str
    detector: str | None
    entity: str | None
    cidr: str | None
    comment: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    active: bool


class IngestBody(BaseModel):
    """JSON form of POST /ingest (text/plain bodies carry format and batch_id in the query)."""

    format: str | None = None
    batch_id: str | None = None
    lines: list[str]


class IngestOut(BaseModel):
    batch_id: str = Field(description="The client's batch id, or sha256:<hash of the lines> when none was sent.")
    format: str = Field(description="The parser used (the sniffed one for format=auto).")
    lines: int
    stored: int
    duplicates: int
    quarantined: int
    reasons: dict[str, int]


class HealthOut(BaseModel):
    status: str
    store: str
    version: str
    # Background work of this process that stopped (a follower of `mailwarden run`); empty when all runs.
    problems: list[str] = []


class AuditOut(BaseModel):
    audit_id: int
    ts: datetime
    client_ip: str
    key_id: str | None
    key_name: str | None
    method: str
    path: str
    status: int
    outcome: str
    detail: str | None
    duration_ms: float | None
    user_agent: str | None
