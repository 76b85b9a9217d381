"""Credential stuffing: one source IP failing with many different accounts or API keys."""

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


@dataclass
class CredentialStuffing(Detector):
    """Fires when one source IP fails with `min_distinct` different accounts or API keys within any
    `window`, and at least `min_failure_ratio` of its login attempts in that window failed.

    What fires: attempts are events that name a credential (an API key fingerprint, else an account).
    Per source IP and sliding window, the rule counts the distinct credentials that failed
    (`auth_failed`) and the share of attempts that failed; both must reach their limits. One alert per
    IP per episode (windows over the limits less than `window` apart). Severity HIGH, CRITICAL when
    any account or key logged in from the IP after the episode began: with stuffing, those successes
    are the hits, the leaked pairs that work.

    Why it matters: lists of leaked user names and passwords (or scraped API keys) are replayed
    against the service hoping some still work (MITRE T1110.004). Each credential is tried once or
    twice, so per-account failure counts stay low and brute-force rules stay quiet.

    Triage: `accounts` and `api_keys` list every credential tried, with counts; `succeeded` lists the
    ones that worked: rotate those keys or reset those passwords first, then block the IP. Many
    distinct accounts with a low failure ratio is usually a relay or integration platform sending for
    its customers, which the ratio keeps quiet; if one still fires, check `attempts` against
    `failures` and the user agents.

    Tuning: `min_distinct` and `window` (default 10 in 30 min: a shared office IP rarely sees ten
    people fail within half an hour), `min_failure_ratio` (default 0.5). Raise `min_distinct` for IPs
    in front of many users. Score is the peak distinct count / min_distinct.
    """

    name: ClassVar[str] = "credential_stuffing"
    severity: ClassVar[Severity] = Severity.HIGH
    lookback: ClassVar[timedelta] = timedelta(hours=26)
    mitre: ClassVar[str] = "T1110.004"

    min_distinct: int = 10
    window: timedelta = timedelta(minutes=30)
    min_failure_ratio: float = 0.5

    def __post_init__(self) -> None:
        self.min_distinct = positive_int(self.min_distinct, "min_distinct")
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        check_confirmable(self.window, self.lookback)
        ratio = self.min_failure_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"min_failure_ratio: expected a number in (0, 1], got {ratio!r}")
        self.min_failure_ratio = float(ratio)

    def pushdown(self) -> Pushdown:
        """An IP needs `min_distinct` failed logins in a window (distinct credentials are fewer)."""
        failed = Rows(all_of=(Clause("outcome", "eq", Outcome.AUTH_FAILED.value),))
        return busy_ips(failed, self.window, self.min_distinct)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        known_us = known_from(times, now, self.lookback)  # before any filtering of the frame
        if events.empty:
            return []
        account_codes, _ = entity_codes(events["account"])
        key_codes, keys = entity_codes(events["api_key_id"])
        # One credential code per event: the key when there is one (it is what was tried), else the
        # account; accounts are numbered after the keys so the two never collide.
        credential = np.where(
            key_codes >= 0, key_codes, np.where(account_codes >= 0, len(keys) + account_codes, -1)
        )
        named = credential >= 0
        failed = named & as_mask(events["outcome"].eq(Outcome.AUTH_FAILED))
        if failed.sum() < self.min_distinct:
            return []

        window_us = usec(self.window)
        ip_codes, ips = entity_codes(events["source_ip"])
        space = KeySpace.covering(times, len(ips), window_us)
        failures = Timeline.build(ip_codes, times, failed, space)
        attempts = Timeline.build(ip_codes, times, named, space)
        distinct = failures.trailing_distinct(credential[failures.rows], window_us)
        ratio = failures.trailing_count(window_us) / attempts.trailing_count(window_us, at=failures.keys)
        hot = (distinct >= self.min_distinct) & (ratio >= self.min_failure_ratio)
        found = episodes(failures, distinct, hot, window_us, known_us)
        if found.empty:
            return []

        episode, positions = episode_members(found)
        rows = failures.rows[positions]
        n = len(found)
        accounts = counts_per_episode(episode, events["account"].iloc[rows], n)
        api_keys = counts_per_episode(episode, events["api_key_id"].iloc[rows], n)
        tried_codes = credential[rows]
        tried = (
            pd.DataFrame({"credential": tried_codes, "is_key": tried_codes < len(keys)})
            .groupby(episode)
            .agg(distinct=("credential", "nunique"), keys=("is_key", "sum"))
        )
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        # The hits: logins that worked from the IP after the episode began (before its next episode).
        logged_in = named & as_mask(events["outcome"].eq(Outcome.OK))
        hits, owner = follow_ups(failures, found, ip_codes, times, logged_in)
        hit_accounts = counts_per_episode(owner, events["account"].iloc[hits], n)
        hit_keys = counts_per_episode(owner, events["api_key_id"].iloc[hits], n)
        n_hits = (
            pd.Series(credential[hits]).groupby(owner).nunique().reindex(range(n), fill_value=0).to_numpy()
        )

        alerts = []
        for i, ep in enumerate(found.to_dict("records")):
            code, first, last, peak = ep["code"], ep["first"], ep["last"], ep["peak"]
            ip = str(ips[code])
            start_us, end_us = failures.times[first], failures.times[last]
            # Attempts from the first to the last failure of the episode: searchsorted on packed keys.
            lo = np.searchsorted(attempts.keys, failures.keys[first], "left")
            hi = np.searchsorted(attempts.keys, failures.keys[last], "right")
            n_attempts = int(hi - lo)
            evidence = {
                "peak_distinct": peak,
                "peak_at": iso(failures.times[ep["peak_pos"]]),
                "min_distinct": self.min_distinct,
                "min_failure_ratio": self.min_failure_ratio,
                "window_seconds": int(self.window.total_seconds()),
                "failures": last - first + 1,
                "attempts": n_attempts,
                "failure_ratio": round((last - first + 1) / n_attempts, 4),
                "distinct_tried": int(tried["distinct"].iat[i]),
                "first_seen": iso(start_us),
                "last_seen": iso(end_us),
                "accounts": accounts[i],
                "api_keys": api_keys[i],
                "succeeded": {"accounts": hit_accounts[i], "api_keys": hit_keys[i]},
                "sample_event_ids": [
                    e for e in event_ids[failures.rows[spread_sample(first, last)]] if e is not None
                ],
            }
            what = _what(int(tried["keys"].iat[i]), last - first + 1)
            title = (
                f"IP {ip}: {peak:,} {what} failed in {human(self.window)} "
                f"(threshold {self.min_distinct:,})"
            )
            if n_hits[i]:
                title += f", {n_hits[i]:,} logged in"
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=Severity.CRITICAL if n_hits[i] else self.severity,
                    entity_kind=EntityKind.IP,
                    entity=ip,
                    window_start=bucket_floor(start_us),
                    window_end=bucket_ceil(end_us),
                    score=peak / self.min_distinct,
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, a.entity))


def _what(key_failures: int, failures: int) -> str:
    """What the credentials were, for the title: each failure counts as its key when it had one."""
    if key_failures == failures:
        return "API keys"
    return "accounts" if key_failures == 0 else "accounts and API keys"
