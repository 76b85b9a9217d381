"""Credentials in URLs: a key in a query string is copied into proxy logs, browser history and referers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Clause, Measure, Pushdown, Rows
from detectors.features import as_mask, counts_per_episode, entity_codes, episode_members, spread_sample
from detectors.rules import (
    as_timedelta,
    bucket_ceil,
    bucket_floor,
    check_episode_gap,
    confirmed_episodes,
    flag_mask,
    iso,
    known_from,
    plural,
    positive_int,
    up_to_now,
)
from pipeline.schema import Alert, EntityKind, Flag, Severity


@dataclass
class SecretInUrl(Detector):
    """Fires when requests carry a credential in the URL (the parser flagged `secret_in_url` and
    stored the path with the value replaced by REDACTED).

    What fires: flagged events, per API key when the request also named one, else per source IP
    (a key in the query string is usually the only credential of the request, and the parser
    never keeps its value). One alert per key or IP per episode: flagged requests less than
    `episode_gap` apart are one episode, so a script that keeps doing it gives one alert that
    later runs update, and a new one only after a quiet `episode_gap`. Severity MEDIUM.

    Why it matters: the service stores only the redacted path, but every other hop did not: the
    full URL with the key sits in the customer's and any proxy's access logs, in browser history
    and bookmarks, and in Referer headers sent to other sites (MITRE T1552, unsecured
    credentials). Whoever reads any of those can send mail as the customer.

    Triage: rotate the key, then tell the customer to send it in the `Authorization` or
    `X-Api-Key` header instead. For an IP alert, `keys_used_from_ip` lists the keys the same IP
    sent properly in headers during the lookback, which usually names the leaked key, and
    `accounts` the account when the request named one; `user_agents` and `top_paths` (redacted)
    show which tool builds the URLs. A browser user agent means someone pasted the URL.

    Tuning: `min_requests` (default 1: one request is already a leak) and `episode_gap`
    (default 6 h, at most 12 h). Score: flagged requests in the episode / `min_requests`.
    """

    name: ClassVar[str] = "secret_in_url"
    severity: ClassVar[Severity] = Severity.MEDIUM
    lookback: ClassVar[timedelta] = timedelta(hours=36)
    mitre: ClassVar[str] = "T1552"

    min_requests: int = 1
    episode_gap: timedelta = timedelta(hours=6)

    def __post_init__(self) -> None:
        self.min_requests = positive_int(self.min_requests, "min_requests")
        self.episode_gap = as_timedelta(self.episode_gap, "episode_gap")
        check_episode_gap(self.episode_gap, self.lookback)

    def pushdown(self) -> Pushdown:
        """Flagged requests, and every request of an IP that sent one (the keys it used)."""
        flagged = Rows(all_of=(Clause("flags", "contains", Flag.SECRET_IN_URL.value),))
        return Pushdown(by="source_ip", measures={"flagged": Measure(flagged)}, rows=(flagged,),
                        pick=lambda table: set(table.loc[table["flagged"] >= 1, "source_ip"]))

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty:
            return []
        flagged = np.flatnonzero(flag_mask(events["flags"], Flag.SECRET_IN_URL.value))
        if len(flagged) < self.min_requests:
            return []
        known_us = known_from(times, now, self.lookback)
        everything = events
        # Flagged requests are few: everything but the key lookup works on those rows only.
        events, times = events.iloc[flagged], times[flagged]
        key_codes, keys = entity_codes(events["api_key_id"])
        ip_codes, ips = entity_codes(events["source_ip"])
        # Per key when the request named one, else per IP; IPs are numbered after the keys.
        codes = np.where(key_codes >= 0, key_codes, np.where(ip_codes >= 0, len(keys) + ip_codes, -1))
        labels = np.concatenate([keys, ips])
        timeline, found = confirmed_episodes(codes, times, codes >= 0, self.episode_gap, known_us)
        if found.empty:
            return []
        found = found[(found["last"] - found["first"] + 1) >= self.min_requests].reset_index(drop=True)
        if found.empty:
            return []

        episode, positions = episode_members(found)
        rows = timeline.rows[positions]
        n = len(found)
        by_ip = counts_per_episode(episode, events["source_ip"].iloc[rows], n)
        paths = counts_per_episode(episode, events["path"].iloc[rows], n, top=10)
        agents = counts_per_episode(episode, events["user_agent"].iloc[rows], n, top=5)
        accounts = counts_per_episode(episode, events["account"].iloc[rows], n)
        outcomes = counts_per_episode(episode, events["outcome"].iloc[rows], n)
        episode_codes = found["code"].to_numpy()
        keys_from_ip = self._keys_by_ip(everything, ips[episode_codes[episode_codes >= len(keys)] - len(keys)])
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        alerts = []
        for i, ep in enumerate(found.to_dict("records")):
            code, first, last = ep["code"], ep["first"], ep["last"]
            is_key = code < len(keys)
            entity = str(labels[code])
            count = last - first + 1
            evidence = {
                "requests": count,
                "first_seen": iso(timeline.times[first]),
                "last_seen": iso(timeline.times[last]),
                "ips": by_ip[i],
                "top_paths": paths[i],
                "user_agents": agents[i],
                "accounts": accounts[i],
                "outcomes": outcomes[i],
                "episode_gap_seconds": int(self.episode_gap.total_seconds()),
                "sample_event_ids": [e for e in event_ids[timeline.rows[spread_sample(first, last)]] if e is not None],
            }
            if not is_key:
                evidence["keys_used_from_ip"] = keys_from_ip.get(entity, {})
            what = "API key" if is_key else "IP"
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=self.severity,
                    entity_kind=EntityKind.API_KEY if is_key else EntityKind.IP,
                    entity=entity,
                    window_start=bucket_floor(timeline.times[first]),
                    window_end=bucket_ceil(timeline.times[last]),
                    score=count / self.min_requests,
                    title=f"{what} {entity}: a credential in the URL of {plural(count, 'request')}",
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, str(a.entity_kind), a.entity))

    @staticmethod
    def _keys_by_ip(events: pd.DataFrame, wanted_ips: np.ndarray) -> dict[str, dict[str, int]]:
        """For the IPs of IP episodes: the keys each sent (in headers) anywhere in the frame, with counts."""
        if len(wanted_ips) == 0:
            return {}
        rows = np.flatnonzero(as_mask(events["source_ip"].isin(wanted_ips)) & as_mask(events["api_key_id"].notna()))
        ip_codes, present = entity_codes(events["source_ip"].iloc[rows])
        per_ip = counts_per_episode(ip_codes, events["api_key_id"].iloc[rows], len(present), top=10)
        return {str(ip): counts for ip, counts in zip(present, per_ip, strict=True)}
