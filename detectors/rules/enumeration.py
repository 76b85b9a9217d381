"""Path enumeration: one source IP asking for many different paths that do not exist (wordlist scanning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Clause, Pushdown, Rows, busy_ips
from detectors.features import (
    KeySpace,
    Timeline,
    as_mask,
    counts_per_episode,
    entity_codes,
    episode_members,
    episodes,
    spread_sample,
)
from detectors.rules import (
    as_timedelta,
    bucket_ceil,
    bucket_floor,
    check_confirmable,
    check_lookback,
    known_from,
    human,
    iso,
    positive_int,
    up_to_now,
    usec,
)
from pipeline.schema import Alert, EntityKind, Outcome, Severity


def _statuses(value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"statuses: expected a list of HTTP status codes, got {value!r}")
    codes = tuple(value)
    if not codes or any(isinstance(c, bool) or not isinstance(c, int) or not 400 <= c <= 499 for c in codes):
        raise ValueError(f"statuses: expected HTTP 4xx codes such as [404, 405], got {value!r}")
    return codes


@dataclass
class Enumeration(Detector):
    """Fires when one source IP gets "not found" for `min_distinct` different paths or more within
    any `window`.

    What fires: HTTP events whose status is one of `statuses` (404, 405, 410 by default), counted
    per source IP as distinct normalised paths (ids in paths are already folded into `{id}`, so
    looking up many missing messages is one path) over sliding windows. One alert per IP per
    episode: windows over the threshold less than `window` apart are one episode. A client that
    asks for the same missing path again and again stays quiet however often it asks.

    Why it matters: a scanner walking a wordlist (`/.env`, `/backup.zip`, `/admin/`...) looks for
    forgotten files, admin consoles and undocumented endpoints (MITRE T1595.003, wordlist
    scanning). It is reconnaissance: harmless unless something answers, so the alert lists what did.

    Triage: `answered` lists paths that the same IP got a 2xx for while scanning: those need a look
    first (an exposed `.git/config` or backup is an incident of its own). `top_paths` and
    `user_agents` show the wordlist and the tool (gobuster, ffuf, nuclei). Block the IP at the edge
    if it keeps going. A customer's broken integration calling a wrong base URL shows few distinct
    paths with an SDK user agent; a link checker or crawler shows site paths with its bot name.

    Tuning: `min_distinct` and `window` (default 50 distinct paths in 10 min: people and SDKs never
    get that many different 404s), `statuses` (add 403 to count forbidden probes too). Severity
    MEDIUM; score is the peak distinct count / min_distinct.
    """

    name: ClassVar[str] = "enumeration"
    severity: ClassVar[Severity] = Severity.MEDIUM
    lookback: ClassVar[timedelta] = timedelta(hours=25)
    mitre: ClassVar[str] = "T1595.003"

    min_distinct: int = 50
    window: timedelta = timedelta(minutes=10)
    statuses: tuple[int, ...] = field(default=(404, 405, 410))

    def __post_init__(self) -> None:
        self.min_distinct = positive_int(self.min_distinct, "min_distinct")
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        check_confirmable(self.window, self.lookback)
        self.statuses = _statuses(self.statuses)

    def pushdown(self) -> Pushdown:
        """An IP needs `min_distinct` misses (distinct paths are fewer) in a window."""
        missed = Rows(all_of=(Clause("status", "in", tuple(self.statuses)), Clause("path", "notnull")))
        return busy_ips(missed, self.window, self.min_distinct)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        known_us = known_from(times, now, self.lookback)  # before any filtering of the frame
        if events.empty:
            return []
        missing = np.flatnonzero(as_mask(events["status"].isin(self.statuses)) & as_mask(events["path"].notna()))
        if len(missing) < self.min_distinct:
            return []
        everything, all_times = events, times
        # Misses are a small share of traffic: the windows are counted on those rows only.
        events, times = events.iloc[missing], times[missing]
        window_us = usec(self.window)
        ip_codes, ips = entity_codes(events["source_ip"])
        path_codes, _ = entity_codes(events["path"])
        space = KeySpace.covering(times, len(ips), window_us)
        misses = Timeline.build(ip_codes, times, None, space)
        distinct = misses.trailing_distinct(path_codes[misses.rows], window_us)
        found = episodes(misses, distinct, distinct >= self.min_distinct, window_us, known_us)
        if found.empty:
            return []

        episode, positions = episode_members(found)
        rows = misses.rows[positions]
        n = len(found)
        top_paths = counts_per_episode(episode, events["path"].iloc[rows], n, top=20)
        statuses = counts_per_episode(episode, events["status"].iloc[rows], n)
        methods = counts_per_episode(episode, events["method"].iloc[rows], n)
        agents = counts_per_episode(episode, events["user_agent"].iloc[rows], n, top=5)
        distinct_paths = pd.Series(path_codes[rows]).groupby(episode).nunique().to_numpy()
        answered = self._answered(everything, all_times, ips[found["code"].to_numpy()], misses, found)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        alerts = []
        for i, ep in enumerate(found.to_dict("records")):
            code, first, last, peak = ep["code"], ep["first"], ep["last"], ep["peak"]
            ip = str(ips[code])
            evidence = {
                "peak_distinct": peak,
                "peak_at": iso(misses.times[ep["peak_pos"]]),
                "min_distinct": self.min_distinct,
                "window_seconds": int(self.window.total_seconds()),
                "distinct_paths": int(distinct_paths[i]),
                "not_found": last - first + 1,
                "first_seen": iso(misses.times[first]),
                "last_seen": iso(misses.times[last]),
                "top_paths": top_paths[i],
                "statuses": statuses[i],
                "methods": methods[i],
                "user_agents": agents[i],
                "answered": answered[i],
                "sample_event_ids": [e for e in event_ids[misses.rows[spread_sample(first, last)]] if e is not None],
            }
            title = (
                f"IP {ip}: {peak:,} different missing paths in {human(self.window)} "
                f"(threshold {self.min_distinct:,})"
            )
            if answered[i]:
                title += f", {len(answered[i]):,} answered"
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=self.severity,
                    entity_kind=EntityKind.IP,
                    entity=ip,
                    window_start=bucket_floor(misses.times[first]),
                    window_end=bucket_ceil(misses.times[last]),
                    score=peak / self.min_distinct,
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, a.entity))

    @staticmethod
    def _answered(
        events: pd.DataFrame, times: np.ndarray, episode_ips: np.ndarray, misses: Timeline, found: pd.DataFrame
    ) -> list[dict[str, int]]:
        """Per episode, the paths its IP got a success for between its first and last miss (top 10)."""
        ok = as_mask(events["outcome"].eq(Outcome.OK))
        rows = np.flatnonzero(as_mask(events["source_ip"].isin(episode_ips)) & ok)
        # The same entity codes and key space as the misses, so packed keys compare directly.
        lookup = {ip: code for code, ip in zip(found["code"].to_numpy(), episode_ips, strict=True)}
        codes = events["source_ip"].iloc[rows].map(lookup).to_numpy(dtype=np.int64)
        start, end = int(misses.space.origin), int(misses.times.max()) if len(misses) else 0
        inside = (times[rows] >= start) & (times[rows] <= end)  # successes outside the misses' span cannot count
        hits = Timeline.build(codes[inside], times[rows][inside], None, misses.space)
        lo = np.searchsorted(hits.keys, misses.keys[found["first"].to_numpy()], "left")
        hi = np.searchsorted(hits.keys, misses.keys[found["last"].to_numpy()], "right")
        lengths = hi - lo
        owner = np.repeat(np.arange(len(found)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.repeat(lo, lengths) + offsets
        return counts_per_episode(owner, events["path"].iloc[rows[inside][hits.rows[positions]]], len(found), top=10)
