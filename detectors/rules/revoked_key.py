"""Revoked keys: a revoked or expired API key still presented, and worse, still accepted."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import SKIP, Clause, Pushdown, Rows
from detectors.features import (
    KeySpace,
    Timeline,
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
    iso,
    plural,
    up_to_now,
    usec,
)
from pipeline.schema import Alert, EntityKind, Outcome, Severity

_ALWAYS = np.iinfo(np.int64).min
_NOT_LISTED = np.iinfo(np.int64).max


@dataclass
class RevokedKey(Detector):
    """Fires when an API key on the revocation list is presented after it was revoked (or expired).

    What fires: every event whose `api_key_id` is in `revoked` at or after the key's revocation
    time. The list comes from the store (`mailwarden keys revoke KEY_OR_ID`) and the file named by
    `revoked_keys_file`, filled in by the detect job; `revoked` in the config adds fingerprints by
    hand. Events before a key's revocation are its ordinary life and stay quiet, so a replay of last
    month does not flag what was legitimate then. One alert per key per episode (uses less than
    `window` apart). Severity HIGH; CRITICAL when any of those requests succeeded (`ok`): the
    service did not actually stop the key.

    Why it matters: a revoked key presented again is either a forgotten integration of the customer
    (harmless, but it fails and they will call) or someone holding a copy of a key that was revoked
    because it leaked (MITRE T1078, valid accounts). Accepted requests mean the revocation never
    reached the gateway: the key is live in an attacker's hands.

    Triage: `ips` and `user_agents`: the customer's own servers and SDK agent point to a forgotten
    deployment (tell the customer); unknown hosting providers or tools point to an attacker (keep
    the key revoked, check the account for other keys in use from the same `ips`). CRITICAL: fix the
    revocation at the gateway first, then review `outcomes` and what the `ok` requests sent.

    Tuning: `window` (1 h) only groups uses into alerts. Keep the revocation list current; expired
    keys go in with their expiry time (`mailwarden keys revoke KEY --at TIME`). Score is the number of
    uses (accepted ones count ten times), at least 1.
    """

    name: ClassVar[str] = "revoked_key"
    severity: ClassVar[Severity] = Severity.HIGH
    lookback: ClassVar[timedelta] = timedelta(hours=26)
    mitre: ClassVar[str] = "T1078"

    # Key fingerprints, or fingerprint -> the time from which presenting it is a finding (None:
    # always). Filled from the revocation list by the detect job (detectors.registry.DetectorContext).
    revoked: Mapping[str, datetime | None] | frozenset[str] = field(default_factory=frozenset)
    window: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        self.revoked = normalise_revoked(self.revoked)
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        check_confirmable(self.window, self.lookback)

    def pushdown(self) -> Pushdown:
        """Only the rows of revoked keys are read; nothing to do without a revocation list."""
        if not self.revoked:
            return SKIP
        return Pushdown(rows=(Rows(all_of=(Clause("api_key_id", "in", tuple(sorted(self.revoked))),)),))

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        known_us = known_from(times, now, self.lookback)  # before any filtering of the frame
        if events.empty or not self.revoked:
            return []
        key_codes, keys = entity_codes(events["api_key_id"])
        # Per distinct key: from when presenting it is a finding; keys not listed never are.
        since_us = _since_us(self.revoked)
        since_of_key = np.array([since_us.get(k, _NOT_LISTED) for k in keys], dtype=np.int64)
        since = np.append(since_of_key, _NOT_LISTED)[key_codes]
        used = (key_codes >= 0) & (since != _NOT_LISTED) & (times >= since)
        if not used.any():
            return []

        window_us = usec(self.window)
        timeline = Timeline.build(key_codes, times, used, KeySpace.covering(times, len(keys), window_us))
        counts = timeline.trailing_count(window_us)
        found = episodes(timeline, counts, np.ones(len(timeline), dtype=bool), window_us, known_us)
        episode, positions = episode_members(found)
        rows = timeline.rows[positions]
        n = len(found)
        outcomes = counts_per_episode(episode, events["outcome"].iloc[rows], n)
        ips = counts_per_episode(episode, events["source_ip"].iloc[rows], n)
        agents = counts_per_episode(episode, events["user_agent"].iloc[rows], n, top=10)
        accounts = counts_per_episode(episode, events["account"].iloc[rows], n)
        paths = counts_per_episode(episode, events["path"].iloc[rows], n, top=10)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        alerts = []
        for i, ep in enumerate(found.to_dict("records")):
            code, first, last = ep["code"], ep["first"], ep["last"]
            key = str(keys[code])
            uses = last - first + 1
            accepted = outcomes[i].get(str(Outcome.OK), 0)
            revoked_at = self.revoked[key]
            evidence = {
                "uses": uses,
                "accepted": accepted,
                "revoked_since": revoked_at.isoformat() if revoked_at is not None else None,
                "outcomes": outcomes[i],
                "ip_count": len(ips[i]),
                "ips": sorted(ips[i]),
                "requests_per_ip": ips[i],
                "user_agents": agents[i],
                "accounts": accounts[i],
                "top_paths": paths[i],
                "first_seen": iso(timeline.times[first]),
                "last_seen": iso(timeline.times[last]),
                "sample_event_ids": [
                    e for e in event_ids[timeline.rows[spread_sample(first, last)]] if e is not None
                ],
            }
            title = f"Key {key}: revoked key presented {plural(uses, 'time')} from {plural(len(ips[i]), 'IP')}"
            if accepted:
                title += f", accepted {plural(accepted, 'time')}"
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=Severity.CRITICAL if accepted else self.severity,
                    entity_kind=EntityKind.API_KEY,
                    entity=key,
                    window_start=bucket_floor(timeline.times[first]),
                    window_end=bucket_ceil(timeline.times[last]),
                    score=float(uses - accepted + 10 * accepted),
                    title=f"{title} (revoked {human_since(revoked_at)})",
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, a.entity))


def normalise_revoked(value: Any) -> dict[str, datetime | None]:
    """The revocation list as {fingerprint: revoked-since (UTC) or None}, from a mapping or a list."""
    if isinstance(value, str):
        raise ValueError("revoked: expected a list of key fingerprints, got a single string")
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, Iterable):
        items = ((fp, None) for fp in value)
    else:
        raise ValueError(f"revoked: expected a list of key fingerprints, got {value!r}")
    out: dict[str, datetime | None] = {}
    for fp, since in items:
        if not isinstance(fp, str) or not fp:
            raise ValueError(f"revoked: key fingerprints are strings, got {fp!r}")
        if since is not None:
            stamp = pd.Timestamp(since)
            if stamp.tzinfo is None:
                raise ValueError(f"revoked: time for {fp} must be timezone-aware, got {since!r}")
            since = stamp.tz_convert("UTC").to_pydatetime()
        # Listed twice (store and file): the earlier revocation wins.
        if fp in out and out[fp] is not None and since is not None:
            since = min(out[fp], since)
        elif fp in out:
            since = None
        out[fp] = since
    return out


def _since_us(revoked: Mapping[str, datetime | None]) -> dict[str, int]:
    return {
        fp: _ALWAYS if since is None else usec(pd.Timestamp(since) - pd.Timestamp(0, tz="UTC"))
        for fp, since in revoked.items()
    }


def human_since(revoked_at: datetime | None) -> str:
    return "at an unknown time" if revoked_at is None else revoked_at.strftime("%Y-%m-%d %H:%M UTC")
