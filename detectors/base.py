"""The detector contract every rule and model follows (see DESIGN.md section 4)."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from datetime import datetime, timedelta
from typing import Any, ClassVar, Self

import pandas as pd

from pipeline.schema import Alert, ConfigError, Severity


class Detector(ABC):
    """Subclasses are dataclasses: their fields are the tunable parameters.

    `detect` never reads a clock or a database: it is given the events of
    [now - lookback, now] and `now`, so replaying old logs gives the alerts a live run would have.
    """

    name: ClassVar[str]
    severity: ClassVar[Severity]
    lookback: ClassVar[timedelta]

    def fit(self, history: pd.DataFrame) -> Self:
        """Rules learn nothing; models override this. Learned state ends in `_`."""
        return self

    @abstractmethod
    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        """Alerts for the events given; must not mutate `events`."""

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> Self:
        """Build from `[detectors.<name>]`; an unknown parameter is a ConfigError naming it."""
        params = dict(params or {})
        params.pop("enabled", None)
        known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"detectors.{cls.name}: unknown parameter(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"detectors.{cls.name}: {exc}") from None
