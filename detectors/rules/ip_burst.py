"""Request floods: one source IP (or one /24, /64 network) sending far more requests than a client does."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Clause, Measure, Pushdown, Rows, busy
from detectors.features import (
    BUCKET_US,
    KeySpace,
    as_mask,
    Timeline,
    counts_per_episode,
    entity_codes,
    episode_members,
    episodes,
    spread_sample,
    subnets,
)
from detectors.rules import (
    as_timedelta,
    bucket_ceil,
    bucket_floor,
    check_confirmable,
    check_lookback,
    human,
    iso,
    known_from,
    positive_int,
    up_to_now,
    usec,
)
from pipeline.schema import Alert, EntityKind, Outcome, Severity


ADAPTIVE_HORIZON = timedelta(hours=1)


@dataclass
class IpBurst(Detector):
    """Fires when one source IP sends `threshold` requests or more within any `window`.

    What fires: every sliding window (not fixed clock buckets) is checked, so a burst that straddles
    minute edges still counts in full. One alert per IP per burst episode: windows over the threshold
    less than `window` apart are one episode, from the first request of the first window over the
    threshold to the last request that kept it there. The same test runs per network (/24 for IPv4,
    /64 for IPv6) with `subnet_threshold`, and reports a network only when at least `subnet_min_ips`
    of its addresses took part: that is a flood spread out to stay under the per-IP limit.

    Why it matters: a mail API client that suddenly sends thousands of requests a minute is either a
    leaked key being drained by a spammer, a broken retry loop, or someone probing or exhausting the
    service (MITRE T1499, endpoint/application denial of service).

    Triage: look at `top_paths` and `outcomes`. Mostly `ok` on the send endpoint: check which keys and
    accounts the IP used and whether the recipients look like spam; mostly `auth_failed`: see the
    brute-force and stuffing alerts for the same IP; mostly `client_error` (404s on many paths): a
    scanner. `sample_event_ids` point back to the raw lines. A known customer's batch job: raise its
    limit rather than the global one, or silence the alert by entity.

    Tuning: `threshold` and `window` (default 600 in 5 min, i.e. 2 requests a second sustained);
    `subnet_threshold` (default 1,200, twice the per-IP threshold) and `subnet_min_ips`; the network
    sizes `ipv4_prefix` and `ipv6_prefix`. Severity is HIGH; score is peak / threshold.

    Adaptive threshold (off by default): with `adaptive_factor` k > 0, an IP's threshold becomes
    max(threshold, k x its own usual rate), the usual rate being the median requests per minute of
    that IP over the `adaptive_span` (default 30 min) before the minute judged, scaled to `window`.
    A steady heavy client (a customer's mail server, a monitoring probe) then stays quiet while a
    jump to k times its own rate still fires. Only whole minutes the run fully sees count; an IP
    silent in them has a usual rate of 0, so floods from new IPs fire exactly as without it. A flood
    that lasts longer than half the span becomes its own baseline and ends the episode early (the
    alert stays). Networks keep the fixed `subnet_threshold`. Evidence then has `usual_per_window`.

    Customers' own sends (on by default): requests accepted (`ok`) with an API key do not count,
    unless `count_keyed_ok` is true. A big customer's scheduled campaign sends thousands of calls a
    minute from its usual server with its own key; a fixed per-IP limit cannot tell that from a
    flood, but the key's own baseline can: `volume_spike` judges it, `key_sprawl` catches the key
    drained from elsewhere. What still counts is what a flood is made of: refused keys and
    passwords, rate-limited calls, 404s, anonymous requests.
    """

    name: ClassVar[str] = "ip_burst"
    severity: ClassVar[Severity] = Severity.HIGH
    lookback: ClassVar[timedelta] = timedelta(hours=25)
    mitre: ClassVar[str] = "T1499"

    threshold: int = 600
    window: timedelta = timedelta(minutes=5)
    subnet_threshold: int = 1_200
    subnet_min_ips: int = 3
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    adaptive_factor: float = 0.0
    adaptive_span: timedelta = timedelta(minutes=30)
    count_keyed_ok: bool = False

    def __post_init__(self) -> None:
        self.threshold = positive_int(self.threshold, "threshold")
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        check_confirmable(self.window, self.lookback)
        self.subnet_threshold = positive_int(self.subnet_threshold, "subnet_threshold")
        self.subnet_min_ips = positive_int(self.subnet_min_ips, "subnet_min_ips")
        self.ipv4_prefix = positive_int(self.ipv4_prefix, "ipv4_prefix")
        self.ipv6_prefix = positive_int(self.ipv6_prefix, "ipv6_prefix")
        if self.ipv4_prefix > 32 or self.ipv6_prefix > 128:
            raise ValueError("ipv4_prefix must be at most 32 and ipv6_prefix at most 128")
        factor = self.adaptive_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
            raise ValueError(f"adaptive_factor: expected a number >= 0 (0 turns it off), got {factor!r}")
        self.adaptive_factor = float(factor)
        self.adaptive_span = as_timedelta(self.adaptive_span, "adaptive_span")
        if self.adaptive_span.total_seconds() % 60 or self.adaptive_span > ADAPTIVE_HORIZON:
            raise ValueError(f"adaptive_span: whole minutes up to {human(ADAPTIVE_HORIZON)}, got {self.adaptive_span}")
        if not isinstance(self.count_keyed_ok, bool):
            raise ValueError(f"count_keyed_ok: expected true or false, got {self.count_keyed_ok!r}")

    def pushdown(self) -> Pushdown:
        """An IP, or a subnet, needs `threshold` (`subnet_threshold`) counted requests in a window;
        every IP of a busy subnet is a candidate, as the subnet's alert is about all of them."""
        counted = Rows() if self.count_keyed_ok else Rows(
            none_of=(Clause("outcome", "eq", Outcome.OK.value), Clause("api_key_id", "notnull")))

        def pick(table: pd.DataFrame) -> set:
            def network(ips: np.ndarray) -> np.ndarray:
                return np.asarray(subnets(ips, self.ipv4_prefix, self.ipv6_prefix), dtype=object)

            return busy(table, "source_ip", "requests", self.threshold) | busy(
                table, "source_ip", "requests", self.subnet_threshold, group=network)

        return Pushdown(by="source_ip", bucket=self.window, measures={"requests": Measure(counted)}, pick=pick)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty:
            return []
        confirm_us = known_from(times, now, self.lookback)  # what the whole frame is known to hold
        if not self.count_keyed_ok:
            # A key's accepted sends are the key's business (see the docstring), not the IP's.
            keyed_ok = as_mask(events["outcome"].eq(Outcome.OK) & events["api_key_id"].notna())
            if keyed_ok.any():
                keep = np.flatnonzero(~keyed_ok)
                events, times = events.iloc[keep], times[keep]
                if events.empty:
                    return []
        ip_codes, ips = entity_codes(events["source_ip"])
        # The adaptive baseline trusts the last hour of the frame, as it did when that was the
        # lookback (the longer lookback is there to confirm episode starts, not to widen baselines).
        known_us = known_from(times, now, ADAPTIVE_HORIZON) if self.adaptive_factor else None
        alerts = self._bursts(events, times, ip_codes, ips, EntityKind.IP, self.threshold, confirm_us, known_us)

        network_of_ip = subnets(ips, self.ipv4_prefix, self.ipv6_prefix)
        net_code_of_ip, networks = pd.factorize(network_of_ip, use_na_sentinel=True)
        lookup = np.append(net_code_of_ip.astype(np.int64), -1)  # index -1 (unknown IP) -> -1
        net_codes = lookup[ip_codes]
        alerts += self._bursts(
            events, times, net_codes, np.asarray(networks, dtype=object), EntityKind.SUBNET,
            self.subnet_threshold, confirm_us,
        )
        return sorted(alerts, key=lambda a: (a.window_start, str(a.entity_kind), a.entity))

    def _bursts(
        self,
        events: pd.DataFrame,
        times: np.ndarray,
        codes: np.ndarray,
        labels: np.ndarray,
        kind: EntityKind,
        threshold: int,
        confirm_us: int,
        known_us: int | None = None,
    ) -> list[Alert]:
        window_us = usec(self.window)
        timeline = Timeline.build(codes, times, None, KeySpace.covering(times, len(labels), window_us))
        if len(timeline) == 0:
            return []
        counts = timeline.trailing_count(window_us)
        limits = usual = None
        if known_us is not None and (counts >= threshold).any():
            usual = self._usual_per_window(timeline, counts >= threshold, known_us)
            limits = np.maximum(threshold, np.ceil(self.adaptive_factor * usual)).astype(np.int64)
        found = episodes(timeline, counts, counts >= (threshold if limits is None else limits), window_us, confirm_us)
        if found.empty:
            return []
        episode, positions = episode_members(found)
        rows = timeline.rows[positions]
        top_paths = counts_per_episode(episode, events["path"].iloc[rows], len(found), top=10)
        outcomes = counts_per_episode(episode, events["outcome"].iloc[rows], len(found))
        members = (
            counts_per_episode(episode, events["source_ip"].iloc[rows], len(found))
            if kind is EntityKind.SUBNET
            else None
        )
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        alerts = []
        episode_threshold = threshold
        for i, ep in enumerate(found.to_dict("records")):
            code, first, last, peak = ep["code"], ep["first"], ep["last"], ep["peak"]
            if members is not None and len(members[i]) < self.subnet_min_ips:
                continue  # one busy address: its own IP alert already says it
            if limits is not None:
                episode_threshold = int(limits[ep["peak_pos"]])
            entity = str(labels[code])
            sample = timeline.rows[spread_sample(first, last)]
            evidence = {
                "peak_count": peak,
                "peak_at": iso(timeline.times[ep["peak_pos"]]),
                "threshold": episode_threshold,
                "window_seconds": int(self.window.total_seconds()),
                "total_requests": last - first + 1,
                "first_seen": iso(timeline.times[first]),
                "last_seen": iso(timeline.times[last]),
                "top_paths": top_paths[i],
                "outcomes": outcomes[i],
                "sample_event_ids": [e for e in event_ids[sample] if e is not None],
            }
            if usual is not None:
                evidence["usual_per_window"] = round(float(usual[ep["peak_pos"]]), 1)
            if members is not None:
                evidence["member_count"] = len(members[i])
                evidence["member_ips"] = members[i]
                title = (
                    f"Subnet {entity}: {peak:,} requests in {human(self.window)} from "
                    f"{len(members[i]):,} IPs (threshold {threshold:,})"
                )
            else:
                title = (
                    f"IP {entity}: {peak:,} requests in {human(self.window)} (threshold {episode_threshold:,})"
                )
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=self.severity,
                    entity_kind=kind,
                    entity=entity,
                    window_start=bucket_floor(timeline.times[first]),
                    window_end=bucket_ceil(timeline.times[last]),
                    score=peak / episode_threshold,
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return alerts

    def _usual_per_window(self, timeline: Timeline, busy: np.ndarray, known_us: int) -> np.ndarray:
        """Each event's IP's usual requests per `window`: the median per-minute count over the
        `adaptive_span` before the event's minute, times the window in minutes (0 where unknown).

        Only IPs with an event over the fixed threshold matter (the adaptive one is never lower),
        so the minute grid holds those IPs only. Minutes before the first fully known one are left
        out: an IP's rate there is unknown, not zero.
        """
        usual = np.zeros(len(timeline))
        busy_codes = np.unique(timeline.codes[busy])
        mine = np.isin(timeline.codes, busy_codes)
        first_minute = -(-known_us // BUCKET_US)
        minutes = timeline.times[mine] // BUCKET_US - first_minute  # < 0: before the known minutes
        rows = np.searchsorted(busy_codes, timeline.codes[mine])
        width = int(minutes.max()) + 1 if len(minutes) and minutes.max() >= 0 else 1
        counted = minutes >= 0
        grid = np.bincount(rows[counted] * width + minutes[counted], minlength=len(busy_codes) * width)
        grid = grid.reshape(len(busy_codes), width)
        # Judge only the busy events; the others stay under the fixed threshold anyway.
        wanted = np.flatnonzero(mine)[busy[mine]]
        row = np.searchsorted(busy_codes, timeline.codes[wanted])
        minute = timeline.times[wanted] // BUCKET_US - first_minute
        span = int(self.adaptive_span.total_seconds() // 60)
        columns = minute[:, None] + np.arange(-span, 0)[None, :]
        known = columns >= 0
        values = np.where(known, grid[row[:, None], np.where(known, columns, 0)], np.nan)
        has_history = known.any(axis=1)
        if has_history.any():
            rate = np.nanmedian(values[has_history], axis=1)
            usual[wanted[has_history]] = rate * (usec(self.window) / BUCKET_US)
        return usual
