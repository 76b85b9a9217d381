"""One Settings class: defaults, then mailwarden.toml, then MAILWARDEN_* environment variables."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import zoneinfo
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.schema import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE_ENV = "MAILWARDEN_CONFIG"


class SourceConfig(BaseModel):
    """One group of log files the service follows: `[[sources]] paths = [...]; format = "combined"`."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str]
    format: str = "auto"


class ScheduleConfig(BaseModel):
    """How often the service runs each job (`[schedule]`)."""

    model_config = ConfigDict(extra="forbid")

    detect_seconds: float = Field(60.0, gt=0)
    notify_seconds: float = Field(5.0, gt=0)
    train_hours: float = Field(24.0, gt=0)
    # How far back the first detect run looks when the store has no watermark yet.
    initial_lookback_hours: float = Field(24.0, gt=0)
    # Partition upkeep and retention (pipeline.partitions.maintain).
    maintenance_seconds: float = Field(3600.0, gt=0)


class AllowlistConfig(BaseModel):
    """Traffic no detector alerts on (`[allowlist]`); detectors.allowlist applies it.

    `keys` takes fingerprints (as shown in alerts) or raw keys, fingerprinted at start-up.
    """

    model_config = ConfigDict(extra="forbid")

    cidrs: list[str] = Field(default_factory=list)
    keys: list[SecretStr] = Field(default_factory=list)
    accounts: list[str] = Field(default_factory=list)


class Settings(BaseSettings):
    """Settings of one mailwarden installation. Every field can be set in the TOML file or env."""

    model_config = SettingsConfigDict(
        env_prefix="MAILWARDEN_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file="mailwarden.toml",
    )

    database_url: str = "sqlite:///./mailwarden.db"
    # A read replica (or pooler) for API queries and detector window reads; None: database_url.
    read_database_url: str | None = None
    # Events older than this many days are removed (PostgreSQL: whole daily partitions); None: kept.
    retention_days: int | None = Field(None, gt=0)
    # Daily partitions created ahead of today on PostgreSQL.
    partition_days_ahead: int = Field(7, ge=1, le=366)
    # Where generated state (the pepper file) lives when nothing else is configured.
    data_dir: Path = Path(".mailwarden")
    # HMAC key for API-key fingerprints and address hashes. Generated into data_dir if unset.
    pepper: SecretStr | None = None
    # Proxies (CIDRs) whose X-Forwarded-For header is believed.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Time zone of syslog timestamps without an offset.
    timezone: str = "UTC"
    # nginx log_format string used by the `combined` parser (None: combined/common).
    log_format: str | None = None
    # JSON mapping: built-in name (`mailapi`, `apigateway`, `traefik`) or {column: field}.
    json_mapping: str | dict[str, Any] | None = None
    # Lines per parse/store batch.
    batch_lines: int = 50_000
    # How detect reads events: true, only the rows of candidate entities the database picks (memory
    # bounded by the suspicious traffic); false, whole frames of raw events. Unset: true on
    # PostgreSQL, false on SQLite (where the per-step aggregates cost more than one full read).
    detect_bounded: bool | None = None
    # Per-detector parameters: [detectors.ip_burst] threshold = 600
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Chat routes ([[routes]] tables); parsed by pipeline.notify.load_routes. URLs and signing keys
    # are never here, only the names of the environment variables holding them.
    routes: list[dict[str, Any]] = Field(default_factory=list)
    # Log files the service (`mailwarden run`) follows.
    sources: list[SourceConfig] = Field(default_factory=list)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    # Networks, API keys and accounts every detector leaves out; per detector: allow_cidrs etc.
    allowlist: AllowlistConfig = Field(default_factory=AllowlistConfig)

    # Checked on load, not when the parser that needs them first runs (which for `mailwarden run`
    # can be hours later, in a follower thread). ConfigError passes through pydantic unwrapped.
    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"timezone: unknown time zone {value!r} (an IANA name such as 'UTC' or 'Europe/Berlin')") from None
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for n, cidr in enumerate(value, start=1):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies: entry {n}, {cidr!r}, is not an address or network (CIDR)") from None
        return value

    @field_validator("json_mapping")
    @classmethod
    def _mapping(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        from pipeline.parsers.jsonl import resolve_mapping

        resolve_mapping(value)  # a built-in name or a complete {column: field path} table
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get(CONFIG_FILE_ENV, "mailwarden.toml")
        toml = TomlConfigSettingsSource(settings_cls, toml_file=toml_path)
        return (init_settings, env_settings, toml)

    def resolved_pepper(self) -> bytes:
        """The pepper, generating and saving one on first use (with a warning) if none is set."""
        if self.pepper is not None and self.pepper.get_secret_value():
            return self.pepper.get_secret_value().encode()
        path = self.data_dir / "pepper"
        if path.exists():
            return path.read_text().strip().encode()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        log.warning(
            "MAILWARDEN_PEPPER is not set: generated one into %s. Keep it: key fingerprints "
            "change if it is lost.",
            path,
        )
        return value.encode()


def load_settings(**overrides: Any) -> Settings:
    """Settings with a one-line ConfigError instead of pydantic's multi-line report."""
    named = os.environ.get(CONFIG_FILE_ENV)
    candidate = Path(named).expanduser() if named else None
    if candidate is not None and (
        not candidate.exists() or candidate.is_dir() or not os.access(candidate, os.R_OK)
    ):
        # A typo in the path would otherwise run silently on the defaults; /dev/null
        # (an empty configuration, used by tests and scripts) stays allowed.
        raise ConfigError(f"{CONFIG_FILE_ENV} names {named!r}, which is not a readable file")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read configuration: {exc}") from None
