"""The detector contract every rule and model follows (see DESIGN.md section 4)."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Self

import pandas as pd

from pipeline.schema import Alert, ConfigError, Severity

if TYPE_CHECKING:
    from detectors.pushdown import Pushdown

# Set by the detect job while a detector runs on part of its frame (the rows of candidate
# entities): the time (µs) of the first event the whole frame would have held. What a detector
# assumes its frame covers (detectors.rules.known_from) must not depend on which rows were left out.
FRAME_START_US: ContextVar[int | None] = ContextVar("frame_start_us", default=None)


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

    def pushdown(self) -> Pushdown | None:
        """A necessary condition for any alert, for the database to evaluate (detectors.pushdown),
        so the job loads only the rows that could matter. None (the default): the whole frame."""
        return None

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
