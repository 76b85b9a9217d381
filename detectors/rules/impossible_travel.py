"""Impossible travel: one API key or account used from two countries too far apart for the time between."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Self

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Pushdown, placed_credentials
from detectors.features import KeySpace, Timeline, as_mask, entity_codes, micros
from detectors.history import (
    Habits,
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
from pipeline.geo import Geo, centroids, default_geo, distance_km
from pipeline.schema import Alert, EntityKind, Outcome, Severity

_US_PER_HOUR = 3_600_000_000
_SECOND_US = 1_000_000
# Two requests a second apart from two continents give absurd speeds; past this the score says no more.
_MAX_SCORE = 100.0


@dataclass
class ImpossibleTravel(Detector):
    """Fires when an API key (or, for events without one, an account) is used from one country and
    then from another faster than `max_kmh` allows, over at least `min_km`.

    What fires: the credential's accepted events (any outcome but `auth_failed`) in time order; each
    change of country between two consecutive events is a move. Its distance comes from the City
    database's coordinates when one is configured and knows both addresses, else from the two
    countries' centres (pipeline.geo.COUNTRY_CENTROIDS); where a country has no centre, a change of
    country within `fallback_gap` counts as impossible. A move fires when it is fast enough, when
    both countries show at least `confirm_events` events within `confirm_window` of it (one
    misplaced address is how offline geo databases disagree, not travel), and when the pair of
    countries is new for the credential: absent from the history learned by `fit`, or first seen
    after the credential had been in the frame for `min_history`. A deployment that serves from two
    regions switches between them all day; that pair is in its history and stays quiet. Fast moves
    less than `window` apart make one alert. Severity HIGH.

    Why it matters: a key used from Frankfurt and, eight minutes later, from Singapore is in two
    hands. Someone else has the credential, while its owner is still using it (MITRE T1078, valid
    accounts).

    Triage: `from_country`/`to_country`, `km`, `minutes` and `ips` of both sides. If one side is
    the customer's usual address and the other a hosting provider or residential proxy abroad, the
    credential leaked: revoke or reset it, then look at what the far side sent. If both are the
    customer's (a new region, a VPN, a failover), resolve it: once the pair is in the history it
    stays quiet. Domestic moves are not covered (country granularity).

    Tuning: `max_kmh` (1,000: faster than an airliner), `min_km` (1,000: neighbouring countries'
    centres are closer, and country geo is too coarse below that), `confirm_events` (2) and
    `confirm_window` (1 h), `fallback_gap` (30 min), `window` (1 h), `min_history` (12 h). Score is
    the first move's speed / `max_kmh` (at most 100).
    """

    name: ClassVar[str] = "impossible_travel"
    severity: ClassVar[Severity] = Severity.HIGH
    lookback: ClassVar[timedelta] = timedelta(days=2)
    mitre: ClassVar[str] = "T1078"

    max_kmh: float = 1_000.0
    min_km: float = 1_000.0
    confirm_events: int = 2
    confirm_window: timedelta = timedelta(hours=1)
    fallback_gap: timedelta = timedelta(minutes=30)
    window: timedelta = timedelta(hours=1)
    min_history: timedelta = timedelta(hours=12)
    geo: Geo | None = field(default=None, repr=False, compare=False)

    routes_: Habits | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_kmh", "min_km"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
            setattr(self, name, float(value))
        self.confirm_events = positive_int(self.confirm_events, "confirm_events")
        self.confirm_window = as_timedelta(self.confirm_window, "confirm_window")
        self.fallback_gap = as_timedelta(self.fallback_gap, "fallback_gap")
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        self.min_history = as_timedelta(self.min_history, "min_history")
        if self.min_history + self.window > self.lookback:
            raise ValueError(f"min_history: with the window it must fit in the lookback ({human(self.lookback)})")
        if self.geo is not None and not isinstance(self.geo, Geo):
            raise ValueError("geo: set by the detect job from geo_city_mmdb/geo_asn_mmdb, not here")

    # ---- learning --------------------------------------------------------------------------------

    def fit(self, history: pd.DataFrame) -> Self:
        """Learn which pairs of countries each key and account moves between."""
        trail = self._trail(history, micros(history["ts"]))
        moves = trail.moves()
        # One entity per trail event; a route on the events that arrived in another country.
        entity = qualified(trail.labels, trail.kinds)[trail.codes] if len(trail.codes) else np.array([], dtype=object)
        route = np.full(len(trail.rows), None, dtype=object)
        route[moves.arrive] = moves.route_labels(trail.countries)
        self.routes_ = Habits.learn(entity, route)
        return self

    # ---- detection -------------------------------------------------------------------------------

    def pushdown(self) -> Pushdown:
        """A move needs two places: a credential needs two addresses with a known country among its
        accepted events."""
        return placed_credentials(self.geo or default_geo(), need_known=2)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty:
            return []
        trail = self._trail(events, times)
        moves = trail.moves()
        if len(moves) == 0:
            return []

        # Fast enough?
        gap_us = trail.times[moves.arrive] - trail.times[moves.depart]
        km = trail.km(moves)
        hours = np.maximum(gap_us, _SECOND_US) / _US_PER_HOUR
        speed = km / hours
        measured = np.isfinite(km)
        fast = np.where(
            measured,
            (km >= self.min_km) & (speed >= self.max_kmh),
            gap_us <= usec(self.fallback_gap),
        )
        # Both countries seen often enough around the move?
        confirmed = trail.confirmed(moves, self.confirm_events, usec(self.confirm_window))
        # A route the credential does not take routinely?
        route_codes, route_labels = pd.factorize(moves.route_labels(trail.countries))
        codes = trail.codes[moves.arrive]
        seen = first_sightings(codes, route_codes.astype(np.int64), trail.times[moves.arrive])
        first_seen = entity_first_seen(trail.valid_codes, trail.all_times, len(trail.labels))
        names = qualified(trail.labels, trail.kinds)
        fitted_entity, fitted_route = fitted_flags(self.routes_, names, seen, np.asarray(route_labels, dtype=object))
        news = novel(seen, first_seen, fitted_entity, fitted_route, usec(self.min_history))
        n_routes = len(route_labels) + 1
        new_pairs = seen.codes[news].astype(np.int64) * n_routes + seen.items[news]
        is_new = np.isin(codes.astype(np.int64) * n_routes + route_codes, new_pairs)

        hot = np.flatnonzero(fast & confirmed & is_new)
        if len(hot) == 0:
            return []
        score = np.where(measured, speed / self.max_kmh, usec(self.fallback_gap) / np.maximum(gap_us, _SECOND_US))

        # Episodes: hot moves of one credential less than `window` apart (moves are in credential,
        # time order, as the trail is).
        at = trail.times[moves.arrive[hot]]
        owner = codes[hot]
        new_episode = np.r_[True, (owner[1:] != owner[:-1]) | (at[1:] - at[:-1] >= usec(self.window))]
        bounds = np.r_[np.flatnonzero(new_episode), len(hot)]
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)
        ips = events["source_ip"].to_numpy(dtype=object, na_value=None)
        alerts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            mine = hot[lo:hi]
            # The first move tells the story (where the credential was, where it turned up); when
            # both sides stay active, later moves go back and forth seconds apart.
            first = best = mine[0]
            code = int(codes[first])
            depart_rows = trail.rows[moves.depart[mine]]
            arrive_rows = trail.rows[moves.arrive[mine]]
            involved = np.unique(np.concatenate([depart_rows, arrive_rows]))
            a, b = trail.countries[trail.country_codes[moves.depart[best]]], trail.countries[
                trail.country_codes[moves.arrive[best]]]
            minutes = gap_us[best] / 60e6
            entity, kind = str(trail.labels[code]), trail.kinds[code]
            evidence = {
                "from_country": str(a),
                "to_country": str(b),
                "from_ip": str(ips[trail.rows[moves.depart[best]]]),
                "to_ip": str(ips[trail.rows[moves.arrive[best]]]),
                "departed_at": iso(trail.times[moves.depart[best]]),
                "arrived_at": iso(trail.times[moves.arrive[best]]),
                "minutes": round(float(minutes), 2),
                "km": round(float(km[best])) if measured[best] else None,
                "speed_kmh": round(float(speed[best])) if measured[best] else None,
                "distance_from": "cities" if trail.precise_both(moves, best) else (
                    "country centres" if measured[best] else "none: country without a known centre"),
                "max_kmh": self.max_kmh,
                "min_km": self.min_km,
                "moves": len(mine),
                "fastest_kmh": round(float(np.nanmax(np.where(measured[mine], speed[mine], np.nan))))
                if measured[mine].any() else None,
                "countries": sorted({str(trail.countries[trail.country_codes[i]])
                                     for i in np.concatenate([moves.depart[mine], moves.arrive[mine]])}),
                "ips": list(dict.fromkeys(str(ips[r]) for r in np.concatenate([depart_rows, arrive_rows]))),
                "first_seen": iso(trail.times[moves.depart[first]]),
                "last_seen": iso(trail.times[moves.arrive[mine[-1]]]),
                "fitted": bool(fitted_entity[code]),
                "sample_event_ids": [e for e in event_ids[involved[:20]] if e is not None],
            }
            noun = "Key" if kind is EntityKind.API_KEY else "Account"
            how_far = f"{evidence['km']:,} km, {evidence['speed_kmh']:,} km/h" if measured[best] else "distance unknown"
            title = (
                f"{noun} {entity}: used from {a} then {b} {_minutes(minutes)} later ({how_far})"
            )
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=self.severity,
                    entity_kind=kind,
                    entity=entity,
                    window_start=bucket_floor(trail.times[moves.depart[first]]),
                    window_end=bucket_ceil(trail.times[moves.arrive[mine[-1]]]),
                    score=float(min(score[best], _MAX_SCORE)),
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, str(a.entity_kind), a.entity))

    def _trail(self, events: pd.DataFrame, times: np.ndarray) -> _Trail:
        """Accepted events with a credential and a known country, in (credential, time) order."""
        codes, labels, kinds = credentials(events)
        valid_codes = np.where(as_mask(events["outcome"].eq(Outcome.AUTH_FAILED)), -1, codes)
        ip_codes, ips = entity_codes(events["source_ip"])
        geo = self.geo or default_geo()
        addresses = pd.Series(ips, dtype="string")
        country_of_ip, countries = pd.factorize(
            geo.countries(addresses).to_numpy(dtype=object, na_value=None), use_na_sentinel=True
        )
        country_codes = np.append(country_of_ip.astype(np.int64), -1)[ip_codes]
        keep = (valid_codes >= 0) & (country_codes >= 0)
        space = KeySpace.covering(times, len(labels), 0)
        timeline = Timeline.build(valid_codes, times, keep, space)
        rows = timeline.rows
        places = geo.locations(addresses) if geo.has_cities else None
        lat = lon = precise = None
        if places is not None:
            ip_rows = ip_codes[rows]
            lat = places["lat"].to_numpy(dtype=float, na_value=np.nan)[ip_rows]
            lon = places["lon"].to_numpy(dtype=float, na_value=np.nan)[ip_rows]
            precise = places["precise"].to_numpy(dtype=bool)[ip_rows]
        return _Trail(
            rows=rows,
            codes=timeline.codes,
            times=timeline.times,
            country_codes=country_codes[rows],
            countries=np.asarray(countries, dtype=object),
            labels=labels,
            kinds=kinds,
            valid_codes=valid_codes,
            all_times=times,
            lat=lat,
            lon=lon,
            precise=precise,
        )


@dataclass(frozen=True)
class _Moves:
    """Country changes between consecutive events of one credential (positions in the trail)."""

    depart: np.ndarray
    arrive: np.ndarray
    low: np.ndarray  # the two country codes, ordered: a route is the same both ways
    high: np.ndarray

    def __len__(self) -> int:
        return len(self.arrive)

    def route_labels(self, countries: np.ndarray) -> np.ndarray:
        return np.array([f"{countries[a]}-{countries[b]}" for a, b in zip(self.low, self.high, strict=True)],
                        dtype=object)


@dataclass(frozen=True)
class _Trail:
    rows: np.ndarray  # frame positions, sorted by (credential, time)
    codes: np.ndarray
    times: np.ndarray
    country_codes: np.ndarray
    countries: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray
    valid_codes: np.ndarray  # credential per frame row, -1 for failed logins
    all_times: np.ndarray  # per frame row
    lat: np.ndarray | None
    lon: np.ndarray | None
    precise: np.ndarray | None

    def moves(self) -> _Moves:
        change = (self.codes[1:] == self.codes[:-1]) & (self.country_codes[1:] != self.country_codes[:-1])
        arrive = np.flatnonzero(change) + 1
        depart = arrive - 1
        a, b = self.country_codes[depart], self.country_codes[arrive]
        return _Moves(depart, arrive, np.minimum(a, b), np.maximum(a, b))

    def km(self, moves: _Moves) -> np.ndarray:
        """Distance of each move: cities where both ends have them, else country centres (NaN when
        a country has no centre)."""
        lat, lon = centroids(pd.Series(self.countries[self.country_codes], dtype="string"))
        km = distance_km(lat[moves.depart], lon[moves.depart], lat[moves.arrive], lon[moves.arrive])
        if self.precise is not None:
            both = self.precise[moves.depart] & self.precise[moves.arrive]
            exact = distance_km(self.lat[moves.depart], self.lon[moves.depart],
                                self.lat[moves.arrive], self.lon[moves.arrive])
            km = np.where(both, exact, km)
        return km

    def precise_both(self, moves: _Moves, i: int) -> bool:
        return self.precise is not None and bool(self.precise[moves.depart[i]] and self.precise[moves.arrive[i]])

    def confirmed(self, moves: _Moves, need: int, around_us: int) -> np.ndarray:
        """Whether both countries of each move have `need` events of the credential within
        [departure - around, arrival + around]."""
        n_countries = len(self.countries) + 1
        pair_codes, pairs = pd.factorize(self.codes.astype(np.int64) * n_countries + self.country_codes)
        space = KeySpace.covering(self.times, len(pairs), around_us)
        keys = np.sort(space.pack(pair_codes.astype(np.int64), self.times))
        lookup = pd.Index(pairs)
        start, end = self.times[moves.depart] - around_us, self.times[moves.arrive] + around_us

        def count(country: np.ndarray) -> np.ndarray:
            code = lookup.get_indexer(self.codes[moves.arrive].astype(np.int64) * n_countries + country)
            lo = space.pack(code, start)
            hi = space.pack(code, end)
            return np.searchsorted(keys, hi, "right") - np.searchsorted(keys, lo, "left")

        return (count(self.country_codes[moves.depart]) >= need) & (count(self.country_codes[moves.arrive]) >= need)


def _minutes(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    if minutes < 120:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"
