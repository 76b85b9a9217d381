"""DETECTORS: the one list of what runs, and how configuration turns it into detector instances."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from detectors.allowlist import ALLOW_PARAMS, Allowlist, allowlist_from_config
from detectors.base import Detector
from detectors.models.iforest_ip import IforestIp
from detectors.models.iforest_key import IforestKey
from detectors.rules.auth_bruteforce import AuthBruteforce
from detectors.rules.credential_stuffing import CredentialStuffing
from detectors.rules.enumeration import Enumeration
from detectors.rules.impossible_travel import ImpossibleTravel
from detectors.rules.ip_burst import IpBurst
from detectors.rules.key_sprawl import KeySprawl
from detectors.rules.new_country import NewCountry
from detectors.rules.password_spraying import PasswordSpraying
from detectors.rules.plaintext_http import PlaintextHttp
from detectors.rules.revoked_key import RevokedKey
from detectors.rules.secret_in_url import SecretInUrl
from detectors.rules.volume_spike import VolumeSpike
from pipeline.geo import Geo
from pipeline.schema import Alert, ConfigError

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls
    for cls in (
        IpBurst,
        AuthBruteforce,
        CredentialStuffing,
        PlaintextHttp,
        VolumeSpike,
        Enumeration,
        SecretInUrl,
        PasswordSpraying,
        KeySprawl,
        NewCountry,
        ImpossibleTravel,
        RevokedKey,
        IforestIp,
        IforestKey,
    )
}


@dataclass(frozen=True)
class DetectorContext:
    """What the detect job knows that pure detectors may not fetch: geo lookups, the revocation list.

    Built by the job from settings and store (pipeline.geo.Geo.from_settings,
    pipeline.jobs.load_revoked); detectors with a field of the same name get it.
    """

    geo: Geo | None = None
    # API-key fingerprint -> from when presenting it is a finding (None: always).
    revoked: Mapping[str, datetime | None] = field(default_factory=dict)


def with_context(detector: Detector, context: DetectorContext | None) -> Detector:
    """The detector with the job's context in its `geo` and `revoked` fields (a configured
    `revoked` list is kept and joined with the job's)."""
    if context is None or not dataclasses.is_dataclass(detector):
        return detector
    names = {f.name for f in dataclasses.fields(detector)}
    changes: dict[str, Any] = {}
    if "geo" in names and context.geo is not None:
        changes["geo"] = context.geo
    if "revoked" in names and context.revoked:
        changes["revoked"] = {**dict(context.revoked), **getattr(detector, "revoked")}
    return dataclasses.replace(detector, **changes) if changes else detector


def build_detectors(
    params_by_name: dict[str, Any] | None, context: DetectorContext | None = None
) -> list[Detector]:
    """One instance per registered detector, from the `[detectors.<name>]` tables of the config.

    A detector without a table runs with its defaults; `enabled = false` leaves it out. An unknown
    detector name or parameter is a ConfigError naming it, so a typo fails at start-up instead of
    silently running the default.
    """
    params_by_name = dict(params_by_name or {})
    unknown = sorted(set(params_by_name) - set(DETECTORS))
    if unknown:
        raise ConfigError(
            f"unknown detector(s) {', '.join(unknown)} in [detectors] "
            f"(known: {', '.join(sorted(DETECTORS))})"
        )
    built = []
    for name, cls in DETECTORS.items():
        params = params_by_name.get(name, {})
        if not isinstance(params, dict):
            raise ConfigError(f"detectors.{name}: expected a table of parameters, got {params!r}")
        enabled = params.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"detectors.{name}.enabled: expected true or false, got {enabled!r}")
        if enabled:
            # allow_* entries are the allowlist's (build_allowlists), not detector parameters.
            own = {key: value for key, value in params.items() if key not in ALLOW_PARAMS}
            built.append(with_context(cls.from_params(own), context))
    return built


def build_allowlists(
    allowlist: Mapping[str, Any] | Any | None, params_by_name: dict[str, Any] | None, pepper: bytes | None
) -> dict[str, Allowlist]:
    """The allowlist each registered detector applies: the global `[allowlist]` (a table or the
    settings model) joined with the detector's own `allow_cidrs`, `allow_keys`, `allow_accounts`.

    Raw keys are fingerprinted with `pepper`. A malformed entry is a ConfigError naming it.
    """
    shared = allowlist_from_config(allowlist, pepper)
    result = {}
    for name in DETECTORS:
        params = (params_by_name or {}).get(name) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"detectors.{name}: expected a table of parameters, got {params!r}")
        entries = {kind: params.get(param, ()) for param, kind in ALLOW_PARAMS.items()}
        own = Allowlist.build(pepper=pepper, where=f"detectors.{name}", prefix="allow_", **entries)
        result[name] = shared.union(own)
    return result


def detect_allowed(
    detector: Detector, events: pd.DataFrame, now: datetime, allowlist: Allowlist | None
) -> list[Alert]:
    """`detector.detect` without the allowlisted traffic: those events never count towards any
    threshold or baseline, and no alert names an allowlisted entity."""
    if allowlist is None or allowlist.empty:
        return detector.detect(events, now)
    return allowlist.drop_alerts(detector.detect(allowlist.drop_events(events), now))
