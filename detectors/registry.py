"""DETECTORS: the one list of what runs, and how configuration turns it into detector instances."""

from __future__ import annotations

from typing import Any

from detectors.base import Detector
from detectors.rules.auth_bruteforce import AuthBruteforce
from detectors.rules.credential_stuffing import CredentialStuffing
from detectors.rules.ip_burst import IpBurst
from pipeline.schema import ConfigError

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls
    for cls in (
        IpBurst,
        AuthBruteforce,
        CredentialStuffing,
    )
}


def build_detectors(params_by_name: dict[str, Any] | None) -> list[Detector]:
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
            built.append(cls.from_params(params))
    return built
