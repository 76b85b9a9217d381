"""New country: an API key or account used from a country its history does not know, more than once."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Self

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Pushdown, placed_credentials
from detectors.features import KeySpace, Timeline, as_mask, entity_codes, episodes, spread_sample
from detectors.history import (
    Habits,
    Sightings,
    credentials,
    entity_first_seen,
    first_sightings,
    fitted_flags,
    novel,
    qualified,
)
from detectors.rules import (
    as_timedelta,
    bucket_ceil,
    bucket_floor,
    check_lookback,
    human,
    iso,
    positive_int,
    up_to_now,
    usec,
)
from pipeline.geo import Geo, default_geo
from pipeline.schema import Alert, EntityKind, Outcome, Severity


@dataclass
class NewCountry(Detector):
    """Fires when an API key (or, for events without one, an account) makes `min_events` requests or
    logins within `window` from a country its history does not know.

    What fires: each event's country comes from its source address (offline geo, see pipeline.geo).
    Only events where the credential was accepted count (any outcome but `auth_failed`): failed
    guesses say where an attacker is, not where the credential is used, and other rules judge them.
    A country is new for a credential when the history learned by `fit` lacks the pair, or, without
    one, when the credential had been in the frame for `min_history` before the country first showed
    up (a credential busy from the first minute of the frame was there before it; one that first
    appears later has no habits to break and is not judged: key_sprawl watches brand-new keys). One
    stray event is not enough: offline geo databases disagree on about one address in twenty, so the
    new country must show up `min_events` times within `window`. One alert per credential per
    episode, listing every new country. Severity MEDIUM, HIGH when `min_high_countries` or more new
    countries show up in one episode.

    Why it matters: customers send from where their servers are; a key or mailbox suddenly used from
    another country is the cheapest sign of a stolen credential (MITRE T1078, valid accounts), often
    hours before volume-based rules notice anything.

    Triage: compare `new_countries` with `usual_countries`, look at `ips` (hosting provider or
    residential?) and `outcomes`. A customer that opened a new office or moved servers to another
    region shows one new country with ordinary traffic: note it and resolve; an unknown country with
    spam-sized `recipients` or failed logins next to successes is a leak: revoke and reset.

    Tuning: `min_events` (2) and `window` (6 h), `min_history` (12 h), `min_high_countries` (3).
    Fit on a few weeks of history so occasional countries (travelling staff, a DR site) are known.
    Score is the peak number of events from a new country in one window / `min_events`.
    """

    name: ClassVar[str] = "new_country"
    severity: ClassVar[Severity] = Severity.MEDIUM
    lookback: ClassVar[timedelta] = timedelta(days=2)
    mitre: ClassVar[str] = "T1078"

    min_events: int = 2
    window: timedelta = timedelta(hours=6)
    min_history: timedelta = timedelta(hours=12)
    min_high_countries: int = 3
    geo: Geo | None = field(default=None, repr=False, compare=False)

    countries_: Habits | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.min_events = positive_int(self.min_events, "min_events")
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        self.min_history = as_timedelta(self.min_history, "min_history")
        if self.min_history + self.window > self.lookback:
            raise ValueError(f"min_history: with the window it must fit in the lookback ({human(self.lookback)})")
        self.min_high_countries = positive_int(self.min_high_countries, "min_high_countries")
        if self.geo is not None and not isinstance(self.geo, Geo):
            raise ValueError("geo: set by the detect job from geo_city_mmdb/geo_asn_mmdb, not here")

    def fit(self, history: pd.DataFrame) -> Self:
        """Learn the countries each key and account was used from."""
        codes, labels, kinds, country_codes, countries = self._codes(history)
        names = np.append(qualified(labels, kinds), None)[codes]
        self.countries_ = Habits.learn(names, np.append(countries, None)[country_codes])
        return self

    def pushdown(self) -> Pushdown | None:
        """Unfitted, a credential needs two addresses among its accepted events, one of them with a
        known country (a country first seen on the credential's first event is not new for it). A
        fitted history makes one address enough: not pushed down."""
        if self.countries_ is not None:
            return None
        return placed_credentials(self.geo or default_geo(), need_known=1)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty:
            return []
        codes, labels, kinds, country_codes, countries = self._codes(events)
        seen = first_sightings(codes, country_codes, times)
        if len(seen) == 0:
            return []
        window_us, history_us = usec(self.window), usec(self.min_history)
        first_seen = entity_first_seen(codes, times, len(labels))
        fitted_entity, fitted_pair = fitted_flags(self.countries_, qualified(labels, kinds), seen, countries)
        news = novel(seen, first_seen, fitted_entity, fitted_pair, history_us)
        if not news.any():
            return []

        # Every event of a (credential, new country) pair, counted per pair in the window.
        n_countries = len(countries) + 1
        wanted = seen.codes[news].astype(np.int64) * n_countries + seen.items[news]
        pair = codes.astype(np.int64) * n_countries + country_codes
        in_news = (codes >= 0) & (country_codes >= 0) & np.isin(pair, wanted)
        pair_codes = np.full(len(times), -1, dtype=np.int64)
        pair_codes[in_news] = pd.factorize(pair[in_news])[0]
        n_pairs = int(pair_codes.max()) + 1
        per_pair = Timeline.build(pair_codes, times, None, KeySpace.covering(times, n_pairs, window_us))
        count = np.zeros(len(times), dtype=np.int64)
        count[per_pair.rows] = per_pair.trailing_count(window_us)

        space = KeySpace.covering(times, len(labels), window_us)
        timeline = Timeline.build(codes, times, in_news, space)
        value = count[timeline.rows]
        found = episodes(timeline, value, value >= self.min_events, window_us)
        if found.empty:
            return []

        ips = events["source_ip"].to_numpy(dtype=object, na_value=None)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)
        alerts = []
        for ep in found.to_dict("records"):
            code, first, last, peak = ep["code"], ep["first"], ep["last"], ep["peak"]
            rows = timeline.rows[first : last + 1]
            per_country = pd.Series(countries[country_codes[rows]]).value_counts()
            new = sorted(per_country.index.astype(str))
            usual = _usual(seen, ~news, code, countries)
            entity, kind = str(labels[code]), kinds[code]
            evidence = {
                "new_countries": new,
                "events_per_country": {str(k): int(v) for k, v in sorted(per_country.items())},
                "usual_countries": usual,
                "peak_events": int(peak),
                "min_events": self.min_events,
                "window_seconds": int(self.window.total_seconds()),
                "ips": list(dict.fromkeys(str(ip) for ip in ips[rows] if ip is not None)),
                "outcomes": _counts(events["outcome"].iloc[rows]),
                "services": _counts(events["service"].iloc[rows]),
                "recipients": int(events["recipients"].iloc[rows].fillna(0).sum()),
                "first_seen": iso(timeline.times[first]),
                "last_seen": iso(timeline.times[last]),
                "fitted": bool(fitted_entity[code]),
                "sample_event_ids": [e for e in event_ids[rows[spread_sample(0, len(rows) - 1)]] if e is not None],
            }
            noun = "Key" if kind is EntityKind.API_KEY else "Account"
            title = (
                f"{noun} {entity}: {len(rows):,} events from {', '.join(new)}, new for it "
                f"(usual: {', '.join(usual) or 'none known'})"
            )
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=Severity.HIGH if len(new) >= self.min_high_countries else self.severity,
                    entity_kind=kind,
                    entity=entity,
                    window_start=bucket_floor(timeline.times[first]),
                    window_end=bucket_ceil(timeline.times[last]),
                    score=peak / self.min_events,
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, str(a.entity_kind), a.entity))

    def _codes(self, events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Credential codes, labels and kinds, and country codes per row with their labels.

        Failed logins get no credential: where a password is tried says nothing about where the
        account is used (brute-force, stuffing and spraying rules watch those), and it must not
        teach the history either.
        """
        codes, labels, kinds = credentials(events)
        codes = np.where(as_mask(events["outcome"].eq(Outcome.AUTH_FAILED)), -1, codes)
        ip_codes, ips = entity_codes(events["source_ip"])
        of_ip = (self.geo or default_geo()).countries(pd.Series(ips, dtype="string"))
        country_of_ip, countries = pd.factorize(of_ip.to_numpy(dtype=object, na_value=None), use_na_sentinel=True)
        country_codes = np.append(country_of_ip.astype(np.int64), -1)[ip_codes]
        return codes, labels, kinds, country_codes, np.asarray(countries, dtype=object)


def _usual(seen: Sightings, known: np.ndarray, code: int, labels: np.ndarray) -> list[str]:
    lo, hi = np.searchsorted(seen.codes, [code, code + 1], "left")
    return sorted({str(labels[i]) for i in seen.items[lo:hi][known[lo:hi]]})


def _counts(values: pd.Series) -> dict[str, int]:
    counts = values.dropna().astype(str).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}

