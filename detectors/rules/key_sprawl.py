"""Key sprawl: an API key suddenly used from many networks or countries it never used before."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Self

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Measure, Pushdown
from detectors.features import (
    KeySpace,
    Timeline,
    counts_per_episode,
    entity_codes,
    episodes,
    micros,
    spread_sample,
    subnets,
)
from detectors.history import (
    Habits,
    Sightings,
    entity_first_seen,
    first_sightings,
    fitted_flags,
    novel,
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
from pipeline.schema import Alert, EntityKind, Severity


@dataclass
class KeySprawl(Detector):
    """Fires when an API key is used, within `window` (default 1 h), from many networks (/24 for
    IPv4, /64 for IPv6) or countries that its history does not know.

    What fires: for each key, the first use from each network and each country is a sighting. A
    sighting is new when the key's history lacks it: the history learned by `fit`, or, without one,
    the key's first `min_history` in the frame (a key already busy when the frame starts was there
    before it). A key first seen later than `min_history` after the frame starts is brand new, and
    everything it does is new. The rule fires when the new networks in a window reach
    `min_new_networks` and `ratio` times the most networks the key used in one window of its
    history, or when the new countries reach `min_new_countries`. One alert per key per episode
    (windows over the limit less than `window` apart). Severity HIGH.

    Why it matters: a key that leaks (a public repository, a compromised CI, a customer's breached
    server) gets used by whoever holds it, typically from dozens of rented or hijacked machines in
    several countries at once, to send spam that is billed to and blamed on the customer (MITRE
    T1078, valid accounts).

    Triage: `new_countries`, `new_networks` and `ips` show where the key turned up, `usual_countries`
    and `usual_networks` what it normally does; `outcomes` and `recipients` what was done with it.
    New networks in many countries with big recipient counts is a leaked key: revoke it (`mailwarden
    keys revoke`), contact the customer, review what it sent. A handful of new networks in the
    customer's own country is usually a deployment (new servers, a cloud region move): the default
    limits keep those quiet. Key rotations start quiet too: a new key with a few addresses stays
    below `min_new_networks`.

    Tuning: `window` (1 h), `min_new_networks` (5), `ratio` (3: a key that normally spans 40
    networks an hour needs 120 new ones), `min_new_countries` (3), `min_history` (12 h),
    `ipv4_prefix`/`ipv6_prefix` (24/64). Fit on a week or more of history so that keys used from
    many places (mobile apps, serverless functions) are judged against their own spread. Score is
    the peak count over its limit (networks or countries, whichever is higher).
    """

    name: ClassVar[str] = "key_sprawl"
    severity: ClassVar[Severity] = Severity.HIGH
    lookback: ClassVar[timedelta] = timedelta(days=2)
    mitre: ClassVar[str] = "T1078"

    window: timedelta = timedelta(hours=1)
    min_new_networks: int = 5
    ratio: float = 3.0
    min_new_countries: int = 3
    min_history: timedelta = timedelta(hours=12)
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    geo: Geo | None = field(default=None, repr=False, compare=False)

    networks_: Habits | None = field(default=None, init=False, repr=False, compare=False)
    countries_: Habits | None = field(default=None, init=False, repr=False, compare=False)
    usual_networks_: pd.Series | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        self.min_history = as_timedelta(self.min_history, "min_history")
        if self.min_history + self.window > self.lookback:
            raise ValueError(f"min_history: with the window it must fit in the lookback ({human(self.lookback)})")
        self.min_new_networks = positive_int(self.min_new_networks, "min_new_networks")
        self.min_new_countries = positive_int(self.min_new_countries, "min_new_countries")
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
            raise ValueError(f"ratio: expected a number >= 0, got {ratio!r}")
        self.ratio = float(ratio)
        self.ipv4_prefix = positive_int(self.ipv4_prefix, "ipv4_prefix")
        self.ipv6_prefix = positive_int(self.ipv6_prefix, "ipv6_prefix")
        if self.ipv4_prefix > 32 or self.ipv6_prefix > 128:
            raise ValueError("ipv4_prefix must be at most 32 and ipv6_prefix at most 128")
        if self.geo is not None and not isinstance(self.geo, Geo):
            raise ValueError("geo: set by the detect job from geo_city_mmdb/geo_asn_mmdb, not here")

    # ---- learning --------------------------------------------------------------------------------

    def fit(self, history: pd.DataFrame) -> Self:
        """Learn each key's networks and countries, and the most networks it used in one window."""
        view = self._view(history)
        keys = view.keys[view.key_codes].astype(object)
        keys[view.key_codes < 0] = None
        self.networks_ = Habits.learn(keys, _labels(view.nets, view.net_codes))
        self.countries_ = Habits.learn(keys, _labels(view.countries, view.country_codes))
        usual = _peak_networks(view.key_codes, view.net_codes, view.times, usec(self.window),
                               np.ones(len(view.times), dtype=bool))
        self.usual_networks_ = pd.Series(usual.to_numpy(), index=view.keys[usual.index.to_numpy()])
        return self

    # ---- detection -------------------------------------------------------------------------------

    def pushdown(self) -> Pushdown:
        """A key needs, within one window, as many first sightings of a network or country as the
        limit (at least min_new_networks or min_new_countries); each is the first sighting of some
        address of the key, so the key needs that many addresses first seen within a window."""
        need = min(self.min_new_networks, self.min_new_countries)
        window = int(self.window.total_seconds())

        def pick(table: pd.DataFrame) -> set:
            # Seconds are floored: first sightings less than a window apart are at most window + 1 s
            # apart here, so `<= window` keeps every key that could qualify.
            first = table.sort_values(["api_key_id", "first"])
            keys = first["api_key_id"].to_numpy(dtype=object)
            times = first["first"].to_numpy()
            if len(times) < need:
                return set()
            ahead = np.arange(need - 1, len(times))
            close = (keys[ahead] == keys[ahead - need + 1]) & (times[ahead] - times[ahead - need + 1] <= window)
            return set(keys[ahead[close]])

        return Pushdown(local=True, by="api_key_id", per="source_ip", measures={"first": Measure(first=True)}, pick=pick)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty or events["api_key_id"].isna().all():
            return []
        view = self._view(events, times)
        window_us = usec(self.window)
        history_us = usec(self.min_history)
        frame_start = usec(pd.Timestamp(now) - pd.Timestamp(0, tz="UTC") - self.lookback)
        first_seen = entity_first_seen(view.key_codes, view.times, len(view.keys))

        net_seen = first_sightings(view.key_codes, view.net_codes, view.times)
        country_seen = first_sightings(view.key_codes, view.country_codes, view.times)
        fitted_key, fitted_net = fitted_flags(self.networks_, view.keys, net_seen, view.nets)
        _, fitted_country = fitted_flags(self.countries_, view.keys, country_seen, view.countries)
        newcomers = frame_start + history_us
        new_net = novel(net_seen, first_seen, fitted_key, fitted_net, history_us, newcomers)
        new_country = novel(country_seen, first_seen, fitted_key, fitted_country, history_us, newcomers)
        if not new_net.any() and not new_country.any():
            return []

        # All new sightings of both kinds on one timeline per key; each kind counted in the window.
        codes = np.concatenate([net_seen.codes[new_net], country_seen.codes[new_country]])
        at = np.concatenate([net_seen.first[new_net], country_seen.first[new_country]])
        is_net = np.r_[np.ones(int(new_net.sum()), dtype=bool), np.zeros(int(new_country.sum()), dtype=bool)]
        space = KeySpace.covering(view.times, len(view.keys), window_us)
        sightings = Timeline.build(codes, at, None, space)
        n_nets = Timeline.build(codes, at, is_net, space).trailing_count(window_us, at=sightings.keys)
        n_countries = Timeline.build(codes, at, ~is_net, space).trailing_count(window_us, at=sightings.keys)

        usual = self._usual(view, first_seen, fitted_key, history_us, newcomers, window_us)
        limit = np.maximum(self.min_new_networks, np.ceil(self.ratio * usual)).astype(np.int64)
        net_score = n_nets / limit[sightings.codes]
        country_score = n_countries / self.min_new_countries
        hot = (net_score >= 1) | (country_score >= 1)
        found = episodes(sightings, n_nets, hot, window_us)
        if found.empty:
            return []

        items = np.concatenate([net_seen.items[new_net], country_seen.items[new_country]])[sightings.rows]
        kinds = is_net[sightings.rows]
        uses = self._uses(view, net_seen, new_net, space)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)
        alerts = []
        for ep in found.to_dict("records"):
            code, first, last = ep["code"], ep["first"], ep["last"]
            key = str(view.keys[code])
            span = slice(first, last + 1)
            new_nets = sorted({str(view.nets[i]) for i in items[span][kinds[span]]})
            new_countries = sorted({str(view.countries[i]) for i in items[span][~kinds[span]]})
            start_us, end_us = int(sightings.times[first]), int(sightings.times[last])
            lo = np.searchsorted(uses.keys, space.pack(np.array([code]), np.array([start_us]))[0], "left")
            hi = np.searchsorted(uses.keys, space.pack(np.array([code]), np.array([end_us]))[0], "right")
            rows = uses.rows[lo:hi]
            used = events.iloc[rows]
            ips = list(dict.fromkeys(used["source_ip"].dropna().astype(str)))
            peak_nets = int(n_nets[first : last + 1].max())
            peak_countries = int(n_countries[first : last + 1].max())
            score = float(max(net_score[first : last + 1].max(), country_score[first : last + 1].max()))
            usual_countries = _known_items(country_seen, ~new_country, code, view.countries)
            evidence = {
                "new_networks": new_nets,
                "new_countries": new_countries,
                "peak_new_networks": peak_nets,
                "peak_new_countries": peak_countries,
                "usual_networks": int(usual[code]),
                "network_limit": int(limit[code]),
                "min_new_countries": self.min_new_countries,
                "usual_countries": usual_countries,
                "window_seconds": int(self.window.total_seconds()),
                "ip_count": len(ips),
                "ips": ips,
                "requests_from_new_networks": len(rows),
                "outcomes": counts_per_episode(np.zeros(len(rows), dtype=np.int64), used["outcome"], 1)[0],
                "recipients": int(used["recipients"].fillna(0).sum()),
                "accounts": counts_per_episode(np.zeros(len(rows), dtype=np.int64), used["account"], 1)[0],
                "first_seen": iso(start_us),
                "last_seen": iso(end_us),
                "fitted": bool(fitted_key[code]),
                "sample_event_ids": [e for e in event_ids[rows[spread_sample(0, len(rows) - 1)]] if e is not None]
                if len(rows) else [],
            }
            where = f"{len(new_nets):,} new networks"
            if new_countries:
                where += f" in {len(new_countries):,} new countries ({', '.join(new_countries[:6])})"
            title = (
                f"Key {key}: used from {where} within {human(self.window)} "
                f"(usual {int(usual[code]):,} networks, {', '.join(usual_countries) or 'no known country'})"
            )
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=self.severity,
                    entity_kind=EntityKind.API_KEY,
                    entity=key,
                    window_start=bucket_floor(start_us),
                    window_end=bucket_ceil(end_us),
                    score=score,
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, a.entity))

    # ---- helpers ---------------------------------------------------------------------------------

    def _view(self, events: pd.DataFrame, times: np.ndarray | None = None) -> _View:
        """Codes per row: key, network and country (geo looked up once per distinct address)."""
        key_codes, keys = entity_codes(events["api_key_id"])
        ip_codes, ips = entity_codes(events["source_ip"])
        net_of_ip, nets = pd.factorize(subnets(ips, self.ipv4_prefix, self.ipv6_prefix), use_na_sentinel=True)
        country_of_ip, countries = pd.factorize(
            (self.geo or default_geo()).countries(pd.Series(ips, dtype="string")).to_numpy(dtype=object, na_value=None),
            use_na_sentinel=True,
        )
        # Index -1 (a row without an address) maps to -1 (unknown network, unknown country).
        net_codes = np.append(net_of_ip.astype(np.int64), -1)[ip_codes]
        country_codes = np.append(country_of_ip.astype(np.int64), -1)[ip_codes]
        return _View(
            times=micros(events["ts"]) if times is None else times,
            key_codes=key_codes,
            keys=keys,
            net_codes=net_codes,
            nets=np.asarray(nets, dtype=object),
            country_codes=country_codes,
            countries=np.asarray(countries, dtype=object),
        )

    def _usual(
        self,
        view: _View,
        first_seen: np.ndarray,
        fitted_key: np.ndarray,
        history_us: int,
        newcomers: int,
        window_us: int,
    ) -> np.ndarray:
        """Per key: the most distinct networks it used in one window of its history (fitted, and the
        part of the frame that counts as history)."""
        usual = np.zeros(len(view.keys), dtype=np.float64)
        if self.usual_networks_ is not None and len(view.keys):
            usual = self.usual_networks_.reindex(view.keys).fillna(0).to_numpy(dtype=np.float64)
        known = view.key_codes >= 0
        old = first_seen < newcomers  # brand-new keys have no history to measure
        in_history = known & old[np.maximum(view.key_codes, 0)] & (
            view.times < first_seen[np.maximum(view.key_codes, 0)] + history_us
        )
        peaks = _peak_networks(view.key_codes, view.net_codes, view.times, window_us, in_history)
        usual[peaks.index.to_numpy()] = np.maximum(usual[peaks.index.to_numpy()], peaks.to_numpy())
        return usual

    @staticmethod
    def _uses(view: _View, net_seen: Sightings, new_net: np.ndarray, space: KeySpace) -> Timeline:
        """The key's events from networks that were news: the requests an alert is about."""
        n_items = len(view.nets) + 1
        wanted = net_seen.codes[new_net].astype(np.int64) * n_items + net_seen.items[new_net]
        pair = view.key_codes.astype(np.int64) * n_items + view.net_codes
        mask = (view.key_codes >= 0) & (view.net_codes >= 0) & np.isin(pair, wanted)
        return Timeline.build(view.key_codes, view.times, mask, space)


@dataclass(frozen=True)
class _View:
    times: np.ndarray
    key_codes: np.ndarray
    keys: np.ndarray
    net_codes: np.ndarray
    nets: np.ndarray
    country_codes: np.ndarray
    countries: np.ndarray


def _labels(labels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Label per row from codes; -1 (unknown) becomes None."""
    return np.append(np.asarray(labels, dtype=object), None)[codes]


def _peak_networks(
    key_codes: np.ndarray, net_codes: np.ndarray, times: np.ndarray, window_us: int, mask: np.ndarray
) -> pd.Series:
    """Most distinct networks per key in one window-long bucket (epoch-aligned), indexed by key code."""
    keep = mask & (key_codes >= 0) & (net_codes >= 0)
    if not keep.any():
        return pd.Series(dtype=np.float64)
    frame = pd.DataFrame({"key": key_codes[keep], "bucket": times[keep] // window_us, "net": net_codes[keep]})
    return frame.drop_duplicates().groupby(["key", "bucket"]).size().groupby(level="key").max().astype(np.float64)


def _known_items(seen: Sightings, known: np.ndarray, code: int, labels: np.ndarray) -> list[str]:
    """Labels of the items an entity already had (sightings are sorted by entity code)."""
    lo, hi = np.searchsorted(seen.codes, [code, code + 1], "left")
    return sorted({str(labels[i]) for i in seen.items[lo:hi][known[lo:hi]]})
