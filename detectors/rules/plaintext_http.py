"""Credentials sent over plain HTTP: an API key or login that crossed the network readable by anyone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Clause, Pushdown, Rows
from detectors.features import Timeline, counts_per_episode, entity_codes, episode_members, spread_sample
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
from pipeline.schema import Alert, EntityKind, Flag, Outcome, Severity


@dataclass
class PlaintextHttp(Detector):
    """Fires when API calls that carry credentials (an API key, or an account name) arrive over
    plain HTTP, and, at LOW severity, when an IP sends TLS handshakes to the plain-HTTP port.

    What fires: events with scheme `http` that name an API key (`api_key_id`) or, without a key, an
    account. One alert per key (else per account) per episode: such requests less than
    `episode_gap` apart are one episode, so a misconfigured integration that keeps calling gives one
    alert, updated by later runs, and a new one only after a quiet `episode_gap`. Requests without
    credentials (browsers following the port-80 redirect to HTTPS) and HTTPS calls never count.
    Severity HIGH; MEDIUM when every request of the episode was refused as `auth_failed` (the key
    sent in clear did not work). Second finding: events flagged `tls_on_plain_port` (a TLS
    ClientHello sent to the plain-HTTP port), per source IP, when an episode has at least
    `tls_min_events` of them; severity LOW.

    Why it matters: a key or password sent over HTTP can be read by every network between the
    client and the service (shared Wi-Fi, a compromised router, a transparent proxy): MITRE T1040,
    network sniffing, needs nothing more. A valid key seen in clear must be treated as leaked.
    TLS handshakes on the plain port come from clients configured with `https://host:80` (their
    calls all fail, which the customer may not have noticed) or from scanners fingerprinting TLS.

    Triage: `ips` and `user_agents` show which of the customer's servers and which SDK or script
    made the calls, `top_paths` what it called; `outcomes` whether the key worked. Rotate the key
    (HIGH), then ask the customer to fix the base URL to `https://`. Consider refusing
    credentialed requests on port 80 at the edge instead of redirecting them. For a TLS finding:
    an IP of a customer (see other alerts or the key usage of that IP) means a wrong port in its
    configuration; an unknown hosting IP is a scanner and can be ignored.

    Tuning: `episode_gap` (default 6 h; at most 12 h), `min_requests` (default 1: one request in
    clear already exposes the key), `tls_on_plain_port` (default true) and `tls_min_events`
    (default 3, so a single probe stays quiet). Score: requests in the episode / `min_requests`.
    """

    name: ClassVar[str] = "plaintext_http"
    severity: ClassVar[Severity] = Severity.HIGH
    lookback: ClassVar[timedelta] = timedelta(hours=36)
    mitre: ClassVar[str] = "T1040"

    episode_gap: timedelta = timedelta(hours=6)
    min_requests: int = 1
    tls_on_plain_port: bool = True
    tls_min_events: int = 3

    def __post_init__(self) -> None:
        self.episode_gap = as_timedelta(self.episode_gap, "episode_gap")
        check_episode_gap(self.episode_gap, self.lookback)
        self.min_requests = positive_int(self.min_requests, "min_requests")
        if not isinstance(self.tls_on_plain_port, bool):
            raise ValueError(f"tls_on_plain_port: expected true or false, got {self.tls_on_plain_port!r}")
        self.tls_min_events = positive_int(self.tls_min_events, "tls_min_events")

    def pushdown(self) -> Pushdown:
        """Only plain-HTTP requests and TLS-on-plain-port events are read, whoever sent them."""
        plain = Rows(all_of=(Clause("scheme", "ieq", "http"),))
        tls = Rows(all_of=(Clause("flags", "contains", Flag.TLS_ON_PLAIN_PORT.value),))
        return Pushdown(rows=(plain, tls) if self.tls_on_plain_port else (plain,))

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty:
            return []
        known_us = known_from(times, now, self.lookback)
        alerts = self._credentials_in_clear(events, times, known_us)
        if self.tls_on_plain_port:
            alerts += self._tls_on_plain_port(events, times, known_us)
        return sorted(alerts, key=lambda a: (a.window_start, str(a.entity_kind), a.entity))

    def _credentials_in_clear(self, events: pd.DataFrame, times: np.ndarray, known_us: int) -> list[Alert]:
        codes, schemes = pd.factorize(events["scheme"], use_na_sentinel=True)
        is_http = np.append(np.char.lower(np.asarray(schemes, dtype=str)) == "http", False)  # -1: no scheme
        plain = np.flatnonzero(is_http[codes])
        if len(plain) == 0:
            return []
        # Few requests are plain HTTP: everything below works on those rows only.
        events, times = events.iloc[plain], times[plain]
        key_codes, keys = entity_codes(events["api_key_id"])
        account_codes, accounts = entity_codes(events["account"])
        # The key is the credential when there is one; else the account (basic auth, a login form).
        # Accounts are numbered after the keys so the two never collide.
        codes = np.where(key_codes >= 0, key_codes, np.where(account_codes >= 0, len(keys) + account_codes, -1))
        labels = np.concatenate([keys, accounts])
        timeline, found = confirmed_episodes(codes, times, codes >= 0, self.episode_gap, known_us)
        sizes = (found["last"] - found["first"] + 1).to_numpy() if not found.empty else np.zeros(0, np.int64)
        found = found[sizes >= self.min_requests].reset_index(drop=True)
        if found.empty:
            return []

        episode, positions = episode_members(found)
        rows = timeline.rows[positions]
        n = len(found)
        column = {name: events[name].iloc[rows] for name in ("source_ip", "path", "outcome", "user_agent", "account")}
        ips = counts_per_episode(episode, column["source_ip"], n)
        paths = counts_per_episode(episode, column["path"], n, top=10)
        outcomes = counts_per_episode(episode, column["outcome"], n)
        agents = counts_per_episode(episode, column["user_agent"], n, top=5)
        by_account = counts_per_episode(episode, column["account"], n)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        alerts = []
        for i, ep in enumerate(found.to_dict("records")):
            code, first, last = ep["code"], ep["first"], ep["last"]
            is_key = code < len(keys)
            entity = str(labels[code])
            count = last - first + 1
            refused = outcomes[i].get(Outcome.AUTH_FAILED.value, 0) == count
            evidence = {
                "requests": count,
                "first_seen": iso(timeline.times[first]),
                "last_seen": iso(timeline.times[last]),
                "ips": ips[i],
                "top_paths": paths[i],
                "outcomes": outcomes[i],
                "user_agents": agents[i],
                "accounts": by_account[i],
                "episode_gap_seconds": int(self.episode_gap.total_seconds()),
                "sample_event_ids": [e for e in event_ids[timeline.rows[spread_sample(first, last)]] if e is not None],
            }
            what = "API key" if is_key else "Account"
            title = (
                f"{what} {entity}: {plural(count, 'request')} over plain HTTP from "
                f"{plural(len(ips[i]), 'IP')}"
            )
            if refused:
                title += " (all refused)"
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=Severity.MEDIUM if refused else self.severity,
                    entity_kind=EntityKind.API_KEY if is_key else EntityKind.ACCOUNT,
                    entity=entity,
                    window_start=bucket_floor(timeline.times[first]),
                    window_end=bucket_ceil(timeline.times[last]),
                    score=count / self.min_requests,
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return alerts

    def _tls_on_plain_port(self, events: pd.DataFrame, times: np.ndarray, known_us: int) -> list[Alert]:
        tls = np.flatnonzero(flag_mask(events["flags"], Flag.TLS_ON_PLAIN_PORT.value))
        if len(tls) < self.tls_min_events:
            return []
        events, times = events.iloc[tls], times[tls]
        ip_codes, ips = entity_codes(events["source_ip"])
        timeline, found = confirmed_episodes(ip_codes, times, ip_codes >= 0, self.episode_gap, known_us)
        if found.empty:
            return []
        found = found[(found["last"] - found["first"] + 1) >= self.tls_min_events].reset_index(drop=True)
        return [self._tls_alert(events, timeline, ep, str(ips[ep["code"]])) for ep in found.to_dict("records")]

    def _tls_alert(self, events: pd.DataFrame, timeline: Timeline, ep: dict, ip: str) -> Alert:
        first, last = ep["first"], ep["last"]
        count = last - first + 1
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)
        return Alert(
            detector=self.name,
            severity=Severity.LOW,
            entity_kind=EntityKind.IP,
            entity=ip,
            window_start=bucket_floor(timeline.times[first]),
            window_end=bucket_ceil(timeline.times[last]),
            score=count / self.tls_min_events,
            title=f"IP {ip}: {plural(count, 'TLS handshake')} sent to the plain-HTTP port",
            evidence={
                "tls_handshakes": count,
                "first_seen": iso(timeline.times[first]),
                "last_seen": iso(timeline.times[last]),
                "tls_min_events": self.tls_min_events,
                "episode_gap_seconds": int(self.episode_gap.total_seconds()),
                "sample_event_ids": [e for e in event_ids[timeline.rows[spread_sample(first, last)]] if e is not None],
            },
            mitre=None,
        )
