"""Routes: which alerts go to which chat, read from settings, with secrets taken from the environment."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from pipeline.schema import ConfigError, Severity

Platform = Literal["slack", "teams", "feishu", "lark", "dingtalk", "wecom", "discord", "generic"]

# Alert fields a route may group by; "..." (Alertmanager's spelling) sends every alert on its own.
GROUP_FIELDS = ("detector", "severity", "entity_kind", "entity", "mitre")
EACH_ALERT = "..."
SIGNED_KINDS = ("feishu", "dingtalk", "generic")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "90s", "5m", "4h", "1d"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use seconds or e.g. 30s, 5m, 4h, 1d)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


class Route(BaseModel):
    """One destination and the alerts it wants. `url` and `secret` are filled from the environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    platform: Platform
    # Name of the environment variable holding the webhook URL (the URL itself is a credential).
    url_env: str
    # Name of the environment variable holding the signing key (Feishu, DingTalk, generic).
    secret_env: str | None = None
    min_severity: Severity = Severity.MEDIUM
    detectors: tuple[str, ...] = ()
    exclude_detectors: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ("detector",)
    # After a message for a group, new alerts of that group wait this long (Alertmanager's default).
    group_interval: float = 300.0
    # A still-open alert is sent again after this long; 0 never repeats.
    repeat_interval: float = 4 * 3600.0
    # Alerts whose window ended longer ago are not sent (a replay of last month stays out of chat).
    max_alert_age: float = 86400.0
    # An undelivered notification is marked failed after this long of retrying.
    give_up_after: float = 86400.0
    timeout: float = 10.0
    enabled: bool = True
    url: SecretStr = Field(default=SecretStr(""), exclude=True)
    secret: SecretStr | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("url_env", "secret_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @field_validator("min_severity", mode="before")
    @classmethod
    def _severity(cls, value: Any) -> Severity:
        return Severity.parse(value)

    @field_validator("group_interval", "repeat_interval", "max_alert_age", "give_up_after", "timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("group_by")
    @classmethod
    def _group_by(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if EACH_ALERT in value:
            if len(value) > 1:
                raise ValueError(f"{EACH_ALERT!r} cannot be combined with other fields")
            return value
        unknown = [v for v in value if v not in GROUP_FIELDS]
        if unknown:
            raise ValueError(f"cannot group by {unknown}; choose from {list(GROUP_FIELDS)} or ['...']")
        return value

    @property
    def kind(self) -> str:
        """The payload format: Lark is Feishu's international edition and speaks the same format."""
        return "feishu" if self.platform == "lark" else self.platform

    @property
    def destination(self) -> str:
        """Rate-limit key of the webhook: a hash, so neither logs nor tables ever hold the URL."""
        return hashlib.sha256(self.url.get_secret_value().encode()).hexdigest()[:16]

    def secret_values(self) -> list[str]:
        """Every credential of this route, for scrubbing error texts."""
        values = [self.url.get_secret_value()]
        if self.secret is not None:
            values.append(self.secret.get_secret_value())
        return [v for v in values if v]

    def matches(self, detector: str, severity: int | Severity) -> bool:
        if not self.enabled or Severity.parse(int(severity)) < self.min_severity:
            return False
        if self.detectors and detector not in self.detectors:
            return False
        return detector not in self.exclude_detectors

    def group_key(self, alert: Mapping[str, Any]) -> str:
        """Alerts with the same key share one message; the key is stored, so it stays short."""
        if self.group_by == (EACH_ALERT,):
            return f"alert={alert['alert_id']}"
        parts = []
        for field in self.group_by:
            value = alert.get(field)
            parts.append(f"{field}={int(value) if field == 'severity' else value}")
        key = "|".join(parts) or "all"
        if len(key) > 200:
            # Entities can be long (IPv6 ranges, user names); a hash keeps the column bounded.
            key = key[:150] + "#" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return key


def load_routes(settings_routes: list[dict[str, Any]], environ: Mapping[str, str] | None = None) -> list[Route]:
    """Routes from `Settings.routes`, each URL and signing key read from the named environment variable.

    Errors name the route and the variable, never a value.
    """
    env = os.environ if environ is None else environ
    routes: list[Route] = []
    seen: set[str] = set()
    for index, raw in enumerate(settings_routes):
        label = raw.get("name") if isinstance(raw, Mapping) and raw.get("name") else f"#{index + 1}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"route {label}: expected a table of settings")
        if "url" in raw or "secret" in raw:
            raise ConfigError(
                f"route {label!r}: put the webhook URL and secret in environment variables and name them "
                "with url_env / secret_env, never in the configuration file"
            )
        try:
            route = Route(**raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "route"
            raise ConfigError(f"route {label!r}: {where}: {first['msg']}") from None
        except ConfigError as exc:
            raise ConfigError(f"route {label!r}: {exc}") from None
        if route.name in seen:
            raise ConfigError(f"route {route.name!r} is defined twice")
        seen.add(route.name)
        routes.append(_resolve(route, env))
    return routes


def _resolve(route: Route, env: Mapping[str, str]) -> Route:
    url = env.get(route.url_env, "").strip()
    if not url:
        raise ConfigError(f"route {route.name!r}: environment variable {route.url_env} is not set")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"route {route.name!r}: {route.url_env} does not hold an http(s) URL")
    secret: SecretStr | None = None
    if route.secret_env and route.kind not in SIGNED_KINDS:
        # Slack, Teams, WeCom and Discord webhooks have no signing: the URL is the only credential.
        raise ConfigError(f"route {route.name!r}: secret_env is only used by feishu, lark, dingtalk and generic")
    if route.secret_env:
        value = env.get(route.secret_env, "").strip()
        if not value:
            raise ConfigError(f"route {route.name!r}: environment variable {route.secret_env} is not set")
        if route.kind == "generic":
            from pipeline.notify.signing import whsec_key

            try:
                whsec_key(value)
            except ConfigError as exc:
                raise ConfigError(f"route {route.name!r}: {route.secret_env}: {exc}") from None
        secret = SecretStr(value)
    return route.model_copy(update={"url": SecretStr(url), "secret": secret})
