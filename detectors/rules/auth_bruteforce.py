"""Password guessing: many failed logins from one source IP in a short time, and whether one got in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

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
    follow_ups,
    group_positions,
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

_SUCCESS_SAMPLE = 20


@dataclass
class AuthBruteforce(Detector):
    """Fires when one source IP fails to authenticate `threshold` times or more within any `window`.

    What fires: events with outcome `auth_failed` (a rejected API key, HTTP 401, a failed SMTP AUTH),
    counted per source IP over sliding windows. One alert per IP per episode: windows over the
    threshold less than `window` apart are one episode. Severity HIGH, or CRITICAL when the IP then
    logged in: an `ok` event from the same IP after the episode's first failure, for an account or
    key it had failed with (or, when the failures named no account or key, as SMTP AUTH failures
    often do not, on the same service and path).

    Why it matters: guessing passwords or keys for an account (MITRE T1110.001). A success after the
    guessing means the attacker probably holds a working credential and can send mail as the
    customer.

    Triage: `accounts` and `api_keys` show what was tried and how often. One account tried many
    times is guessing; many accounts a few times each is stuffing or spraying (see
    credential_stuffing). CRITICAL: treat the account or key in `successes` as compromised, rotate it,
    check what it sent since `successes[0].at`, and block the IP. A customer's misconfigured client
    retrying a revoked key gives the same picture with one key and a steady rhythm: contact them.

    Tuning: `threshold` and `window` (default 20 in 10 min: far above a person mistyping, far below
    a guessing tool). Lower the threshold for SMTP AUTH on small installations; raise it for IPs that
    front many users (carrier NAT, corporate proxies). Score is peak / threshold.
    """

    name: ClassVar[str] = "auth_bruteforce"
    severity: ClassVar[Severity] = Severity.HIGH
    lookback: ClassVar[timedelta] = timedelta(hours=25)
    mitre: ClassVar[str] = "T1110.001"

    threshold: int = 20
    window: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        self.threshold = positive_int(self.threshold, "threshold")
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        check_confirmable(self.window, self.lookback)

    def pushdown(self) -> Pushdown:
        """An IP needs `threshold` failed logins in a window."""
        return busy_ips(Rows(all_of=(Clause("outcome", "eq", Outcome.AUTH_FAILED.value),)), self.window, self.threshold)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        known_us = known_from(times, now, self.lookback)  # before any filtering of the frame
        if events.empty:
            return []
        failed = as_mask(events["outcome"].eq(Outcome.AUTH_FAILED))
        if not failed.any():
            return []
        window_us = usec(self.window)
        ip_codes, ips = entity_codes(events["source_ip"])
        space = KeySpace.covering(times, len(ips), window_us)
        failures = Timeline.build(ip_codes, times, failed, space)
        counts = failures.trailing_count(window_us)
        found = episodes(failures, counts, counts >= self.threshold, window_us, known_us)
        if found.empty:
            return []

        episode, positions = episode_members(found)
        rows = failures.rows[positions]
        n = len(found)
        accounts = counts_per_episode(episode, events["account"].iloc[rows], n)
        api_keys = counts_per_episode(episode, events["api_key_id"].iloc[rows], n)
        services = counts_per_episode(episode, events["service"].iloc[rows], n)
        paths = counts_per_episode(episode, events["path"].iloc[rows], n)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        logins = self._logins(events, times, ip_codes, failures, found, episode, rows)

        alerts = []
        for i, ep in enumerate(found.to_dict("records")):
            code, first, last, peak = ep["code"], ep["first"], ep["last"], ep["peak"]
            ip = str(ips[code])
            got_in = events.iloc[logins[i][:_SUCCESS_SAMPLE]]
            followed = len(logins[i]) > 0
            evidence = {
                "peak_failures": peak,
                "peak_at": iso(failures.times[ep["peak_pos"]]),
                "threshold": self.threshold,
                "window_seconds": int(self.window.total_seconds()),
                "total_failures": last - first + 1,
                "first_seen": iso(failures.times[first]),
                "last_seen": iso(failures.times[last]),
                "accounts": accounts[i],
                "api_keys": api_keys[i],
                "services": services[i],
                "top_paths": dict(list(paths[i].items())[:10]),
                "followed_by_success": followed,
                "success_count": len(logins[i]),
                "successes": [
                    {
                        "at": iso(us),
                        "account": _plain(account),
                        "api_key_id": _plain(key),
                        "event_id": _plain(event_id),
                    }
                    for us, account, key, event_id in zip(
                        times[logins[i][:_SUCCESS_SAMPLE]],
                        got_in["account"],
                        got_in["api_key_id"],
                        got_in["event_id"],
                        strict=True,
                    )
                ],
                "sample_event_ids": [
                    e for e in event_ids[failures.rows[spread_sample(first, last)]] if e is not None
                ],
            }
            title = f"IP {ip}: {peak:,} failed logins in {human(self.window)} (threshold {self.threshold:,})"
            if followed:
                title += ", followed by a successful login"
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=Severity.CRITICAL if followed else self.severity,
                    entity_kind=EntityKind.IP,
                    entity=ip,
                    window_start=bucket_floor(failures.times[first]),
                    window_end=bucket_ceil(failures.times[last]),
                    score=peak / self.threshold,
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, a.entity))

    @staticmethod
    def _logins(
        events: pd.DataFrame,
        times: np.ndarray,
        ip_codes: np.ndarray,
        failures: Timeline,
        found: pd.DataFrame,
        episode: np.ndarray,
        rows: np.ndarray,
    ) -> list[np.ndarray]:
        """For each episode, frame positions of the successful logins that followed it, in time order.

        A success follows an episode when it comes from the same IP after the episode's first failure
        (and before the IP's next episode) and logs in to something the failures aimed at: an account
        or key that failed, or, when the failures named none, the same service and path.
        """
        ok, owner = follow_ups(failures, found, ip_codes, times, as_mask(events["outcome"].eq(Outcome.OK)))
        n_episodes, n_failed = len(found), len(rows)
        both = np.concatenate([rows, ok])
        width = len(both) + 2

        def pairs(ep: np.ndarray, values: np.ndarray) -> np.ndarray:
            # (episode, value code) as one int: membership tests become np.isin on integers.
            return ep.astype(np.int64) * width + values + 1

        named = np.zeros(n_episodes, dtype=bool)
        match = np.zeros(len(ok), dtype=bool)
        plain = np.ones(len(ok), dtype=bool)
        for column in ("account", "api_key_id", "service", "path"):
            # Codes over failures and successes together, so equal values get equal codes.
            codes, _ = entity_codes(events[column].iloc[both])
            tried, used = codes[:n_failed], codes[n_failed:]
            known = tried >= 0
            hit = (used >= 0) & np.isin(pairs(owner, used), pairs(episode[known], tried[known]))
            if column in ("account", "api_key_id"):
                named[episode[known]] = True
                match |= hit
            else:
                constrained = np.zeros(n_episodes, dtype=bool)
                constrained[episode[known]] = True
                plain &= ~constrained[owner] | hit
        match |= plain & ~named[owner]
        return group_positions(owner[match], ok[match], times[ok[match]], n_episodes)


def _plain(value: object) -> str | None:
    return None if pd.isna(value) else str(value)
