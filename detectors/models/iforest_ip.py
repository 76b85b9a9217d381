"""Isolation forest per source IP and 10-minute window: traffic unlike any the service usually sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from detectors.features import Windows, ip_windows
from detectors.models import IsolationForestDetector, counts
from detectors.rules import usec
from pipeline.schema import EntityKind, Severity


@dataclass
class IforestIp(IsolationForestDetector):
    """Fires when one source IP's traffic in a `bucket` (10 min) is rarer than almost anything the
    model trained on: its anomaly score reaches the threshold and it sent `min_requests` or more.

    What fires: each (IP, bucket) row has requests, failure ratio (`auth_failed` share), error ratio
    (other 4xx), distinct paths, keys, accounts and user agents, recipients, bytes, the hour, whether
    the IP was seen in the `history` (6 h) before, and volume against its own history. An isolation
    forest scores the row; rows isolated in few random splits are rare. Trained by `mailwarden train`
    (baseline of past days without the windows already alerted on), or, untrained, on the `training`
    (24 h) before each `block` (3 h) of the input. One alert per IP per episode (hot buckets less than
    three buckets apart); the title names the features that stand out against the IP's own history
    (or, for a new IP, against the population), e.g. "distinct_keys 8 (typical 0)".

    Why it matters: floods, scanners walking paths, brute force from one host and bots using many
    keys all make an IP's window unlike a customer's, often before a fixed-threshold rule is tuned
    for them, and whatever the exact shape of the next one.

    Triage: read `standing_out` against `features` and `usual`/`typical`; `top_paths`, `outcomes`
    and `api_keys` say what the IP did. Many failures: a brute-force or stuffing source, block it.
    Many 404s on odd paths: a scanner. Big volume of `ok` from a known customer address: a campaign
    or a leaked key being drained: check the key alerts of `iforest_key` for the same window.

    Tuning: `quantile` (0.999) and `margin` (0.02) set the threshold above the training scores:
    raise the margin for fewer alerts (on generated traffic 0.01 let a busy dashboard session
    through; 0.02 and 0.03 kept every IP alert true and still caught the flood). `min_hot_buckets` (1) reports an episode only once it has
    that many hot buckets. Untrained, the model is quiet unless `self_fit` is true. `min_requests` (10) keeps single stray requests quiet.
    `bucket`, `history`, `training`, `block` as above (their sum must fit the 36 h lookback).
    Run `mailwarden train` daily so the model learns from days, not hours. Score is the peak anomaly
    score over the threshold. Severity MEDIUM: a model says "unusual", not "malicious".
    """

    name: ClassVar[str] = "iforest_ip"
    severity: ClassVar[Severity] = Severity.MEDIUM
    features: ClassVar[tuple[str, ...]] = (
        "requests", "failure_ratio", "error_ratio", "distinct_paths", "distinct_keys",
        "distinct_accounts", "distinct_user_agents", "recipients", "bytes", "hour", "first_seen",
        "volume_vs_usual",
    )

    entity_column: ClassVar[str] = "source_ip"

    min_requests: int = 10
    margin: float = 0.02

    def windows(self, events: pd.DataFrame, times: np.ndarray) -> Windows:
        return ip_windows(events, times, usec(self.bucket), usec(self.history))

    def entity(self, label: str) -> tuple[EntityKind, str]:
        return EntityKind.IP, label

    def what(self, kind: EntityKind, entity: str) -> str:
        return f"IP {entity}"

    def extra_evidence(self, members: pd.DataFrame) -> dict[str, Any]:
        return {
            "top_paths": counts(members["path"], top=10),
            "outcomes": counts(members["outcome"]),
            "api_keys": counts(members["api_key_id"], top=10),
            "accounts": counts(members["account"], top=10),
            "user_agents": counts(members["user_agent"], top=5),
        }
