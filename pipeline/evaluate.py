"""Scores alerts against the generator's labels: precision, recall, F1, time to detect, false alerts a day.

Pure: frames in, a plain dict out (the CLI in pipeline/evaluate_cli.py loads and prints).

Matching. An alert matches a label when its window, widened by `slack` on both sides, overlaps the
label's [first_ts, last_ts], and its entity is the label's:
- an `ip` alert: its address is one of the label's `ips` (multi-IP attacks list every address);
- a `subnet` alert: its network holds one of the label's `ips`;
- an `api_key` alert: the fingerprint (with the store's pepper) of the label's raw key, for an
  `api_key` label, or of a raw key named in its params (`api_key`, `old_key`);
- an `account` alert: the label's entity for an `account` label, or an account the params name as
  the victim (`account`, `smtp_username`, `targets`, `compromised`).
An alert matching at least one attack label is true; any other alert is false, including one that
matches only a benign `legit_*` label (the look-alikes exist to catch those).

Metrics.
- overall: precision = true alerts / alerts; recall = attack labels matched by any alert / attack
  labels; F1 their harmonic mean; false alerts per day over `days`.
- by_kind (attack kinds): recall = labels of the kind matched / labels of the kind. Precision asks
  "when I act on the detectors that catch this kind, how much is noise": alerts matching a label of
  the kind, over those plus the false alerts of every detector that matched the kind at least once
  (alerts matching other attacks count for neither). No detector caught it: precision is null.
- by_detector: precision = its true alerts / its alerts; recall = attack labels it matched / all
  attack labels (what share of the attacks it covers alone; `kinds` lists which).
- time to detect, per matched label: start of the earliest matching alert's window minus the
  label's first_ts, floored at 0. Alert windows start at the first event of the episode, so this is
  a lower bound: a live run also waits for its next tick and for the detector's window to fill.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.privacy import fingerprint
from pipeline.schema import MailwardenError

BENIGN_PREFIX = "legit_"
DEFAULT_SLACK = timedelta(minutes=30)
LABEL_COLUMNS = ("attack_kind", "entity_kind", "entity", "first_ts", "last_ts", "ips", "file", "params")
ALERT_COLUMNS = ("alert_id", "detector", "entity_kind", "entity", "window_start", "window_end")
# Param names that name, besides the label's entity, the raw keys and accounts an attack is about.
_KEY_PARAMS = ("api_key", "old_key")
_ACCOUNT_PARAMS = ("account", "smtp_username", "targets", "compromised")


def load_labels(path: str | Path) -> pd.DataFrame:
    """labels.csv as a frame with UTC `first_ts`/`last_ts`; a missing column is a clear error."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise MailwardenError(f"labels file {path} not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MailwardenError(f"labels file {path} is not a CSV: {exc}") from None
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise MailwardenError(f"labels file {path} lacks column(s) {', '.join(missing)}")
    for column in ("first_ts", "last_ts"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame


def evaluate(
    alerts: pd.DataFrame,
    labels: pd.DataFrame,
    pepper: bytes,
    days: float | None = None,
    slack: timedelta = DEFAULT_SLACK,
) -> dict[str, Any]:
    """Metrics of `alerts` (columns ALERT_COLUMNS) against `labels` (as load_labels returns).

    `days` is the length of the evaluated period for false alerts per day; default: from the
    earliest label start to the latest label end.
    """
    missing = [c for c in ALERT_COLUMNS if c not in alerts.columns]
    if missing:
        raise ValueError(f"alerts frame lacks column(s) {', '.join(missing)}")
    labels = labels.reset_index(drop=True)
    alerts = alerts.reset_index(drop=True)
    attack = ~labels["attack_kind"].str.startswith(BENIGN_PREFIX)
    if days is None:
        span = (labels["last_ts"].max() - labels["first_ts"].min()) if len(labels) else pd.Timedelta(0)
        days = max(span / pd.Timedelta(days=1), 1e-9) if len(labels) else 1.0

    matches = _match(alerts, labels, pepper, slack)  # list of label indexes per alert
    true_alert = np.array([any(attack[j] for j in m) for m in matches], dtype=bool)
    detectors = sorted(alerts["detector"].unique()) if len(alerts) else []

    # Per label: which alerts matched it, first detection.
    matched_by: list[list[int]] = [[] for _ in range(len(labels))]
    for i, found in enumerate(matches):
        for j in found:
            matched_by[j].append(i)
    label_rows = []
    for j, label in labels.iterrows():
        hits = matched_by[j]
        first = min((alerts["window_start"].iat[i] for i in hits), default=None)
        delay = None if first is None else max(0.0, (first - label["first_ts"]).total_seconds())
        label_rows.append(
            {
                "attack_kind": label["attack_kind"],
                "entity_kind": label["entity_kind"],
                "entity": _shown_entity(label, pepper),
                "first_ts": label["first_ts"].isoformat(),
                "last_ts": label["last_ts"].isoformat(),
                "detected": bool(hits),
                "detectors": sorted({alerts["detector"].iat[i] for i in hits}),
                "alerts": len(hits),
                "time_to_detect_seconds": delay,
            }
        )

    n_attacks = int(attack.sum())
    detected = sum(1 for j, row in enumerate(label_rows) if attack[j] and row["detected"])
    overall = _prf(int(true_alert.sum()), len(alerts), detected, n_attacks)
    overall.update(
        alerts=len(alerts),
        true_alerts=int(true_alert.sum()),
        false_alerts=int((~true_alert).sum()),
        false_alerts_per_day=round(float((~true_alert).sum()) / days, 3),
        attacks=n_attacks,
        detected=detected,
        days=round(days, 3),
    )

    by_detector: dict[str, dict[str, Any]] = {}
    for name in detectors:
        mine = np.flatnonzero(alerts["detector"].to_numpy() == name)
        caught = {j for i in mine for j in matches[i] if attack[j]}
        entry = _prf(int(true_alert[mine].sum()), len(mine), len(caught), n_attacks)
        entry.update(
            alerts=len(mine),
            true_alerts=int(true_alert[mine].sum()),
            false_alerts=int((~true_alert[mine]).sum()),
            false_alerts_per_day=round(float((~true_alert[mine]).sum()) / days, 3),
            kinds=sorted({labels["attack_kind"].iat[j] for j in caught}),
        )
        by_detector[name] = entry

    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted(labels.loc[attack, "attack_kind"].unique()):
        of_kind = set(np.flatnonzero((labels["attack_kind"] == kind).to_numpy()))
        hits = sorted({i for j in of_kind for i in matched_by[j]})
        catching = sorted({alerts["detector"].iat[i] for i in hits})
        false_of_catching = sum(
            by_detector[d]["false_alerts"] for d in catching
        )
        found = [label_rows[j] for j in sorted(of_kind) if label_rows[j]["detected"]]
        delays = [r["time_to_detect_seconds"] for r in found]
        entry = _prf(len(hits), len(hits) + false_of_catching, len(found), len(of_kind))
        if not hits:
            entry["precision"] = None
        entry.update(
            labels=len(of_kind),
            detected=len(found),
            alerts=len(hits),
            false_alerts_of_detectors=false_of_catching,
            detectors=catching,
            median_time_to_detect_seconds=float(np.median(delays)) if delays else None,
            max_time_to_detect_seconds=float(max(delays)) if delays else None,
        )
        by_kind[kind] = entry

    benign: dict[str, dict[str, Any]] = {}
    for kind in sorted(labels.loc[~attack, "attack_kind"].unique()):
        of_kind = np.flatnonzero((labels["attack_kind"] == kind).to_numpy())
        hits = sorted({i for j in of_kind for i in matched_by[j]})
        benign[kind] = {
            "labels": len(of_kind),
            "alerted": sum(1 for j in of_kind if matched_by[j]),
            "alerts": len(hits),
            "detectors": sorted({alerts["detector"].iat[i] for i in hits}),
        }

    return {
        "overall": overall,
        "by_kind": by_kind,
        "by_detector": by_detector,
        "benign": benign,
        "labels": label_rows,
        "slack_seconds": int(slack.total_seconds()),
    }


def _prf(true_alerts: int, alerts: int, detected: int, labels: int) -> dict[str, Any]:
    precision = true_alerts / alerts if alerts else None
    recall = detected / labels if labels else None
    if precision and recall:
        f1 = 2 * precision * recall / (precision + recall)
    else:
        f1 = 0.0
    return {
        "precision": None if precision is None else round(precision, 4),
        "recall": None if recall is None else round(recall, 4),
        "f1": round(f1, 4),
    }


def _shown_entity(label: pd.Series, pepper: bytes) -> str:
    # Raw keys never leave the evaluation: a report shows the fingerprint the alerts carry.
    if label["entity_kind"] == "api_key":
        return fingerprint(label["entity"], pepper)
    return label["entity"]


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def _label_entities(labels: pd.DataFrame, pepper: bytes) -> list[dict[str, set]]:
    """Per label, the entities an alert may name: IPs, API key fingerprints, accounts."""
    out = []
    for label in labels.itertuples(index=False):
        params = _params(label.params)
        ips = set(label.ips.split()) if label.ips else set()
        keys: set[str] = set()
        accounts: set[str] = set()
        if label.entity_kind == "ip":
            ips.add(label.entity)
        elif label.entity_kind == "api_key":
            keys.add(fingerprint(label.entity, pepper))
        elif label.entity_kind == "account":
            accounts.add(label.entity)
        for name in _KEY_PARAMS:
            keys.update(fingerprint(k, pepper) for k in _as_list(params.get(name)))
        for name in _ACCOUNT_PARAMS:
            accounts.update(_as_list(params.get(name)))
        out.append({"ip": ips, "api_key": keys, "account": accounts})
    return out


def _match(alerts: pd.DataFrame, labels: pd.DataFrame, pepper: bytes, slack: timedelta) -> list[list[int]]:
    """For each alert, the indexes of the labels it matches."""
    entities = _label_entities(labels, pepper)
    starts = labels["first_ts"] - pd.Timedelta(slack)
    ends = labels["last_ts"] + pd.Timedelta(slack)
    label_ips = [
        [ip for ip in (_ip(v) for v in e["ip"]) if ip is not None] for e in entities
    ]
    result: list[list[int]] = []
    for alert in alerts.itertuples(index=False):
        begin, end = pd.Timestamp(alert.window_start), pd.Timestamp(alert.window_end)
        overlapping = np.flatnonzero(((starts <= end) & (ends >= begin)).to_numpy())
        kind = str(alert.entity_kind)
        found = []
        for j in overlapping:
            if kind == "subnet":
                network = _network(alert.entity)
                ok = network is not None and any(ip in network for ip in label_ips[j] if ip.version == network.version)
            else:
                ok = alert.entity in entities[j].get(kind, set())
            if ok:
                found.append(int(j))
        result.append(found)
    return result


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def alerts_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Alert rows (store dicts or Alert.to_row()) as the frame `evaluate` reads, UTC windows."""
    frame = pd.DataFrame(list(rows), columns=list(ALERT_COLUMNS))
    for column in ("window_start", "window_end"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    frame["entity_kind"] = frame["entity_kind"].astype(str)
    return frame
