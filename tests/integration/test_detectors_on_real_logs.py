"""Detectors on a real log: the Honeynet Project's 2004 Red Hat honeypot, attacked by 82.82.97.119."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from detectors.features import conform_events
from detectors.rules.auth_bruteforce import AuthBruteforce
from detectors.rules.credential_stuffing import CredentialStuffing
from detectors.rules.ip_burst import IpBurst
from pipeline.schema import EntityKind, Outcome

LOG = "honeynet-redhat-2004/access_log.24"


def _parse(lines: list[str]) -> pd.DataFrame:
    try:
        from pipeline.parsers.base import ParseContext
        from pipeline.parsers.combined import CombinedParser
    except ImportError:  # the parser is not there yet: just enough of the combined format for this test
        pattern = re.compile(r'^(\S+) \S+ \S+ \[([^\]]+)\] "(?:\S+ (\S+)[^"]*|[^"]*)" (\d{3})')
        records = []
        for row, line in enumerate(lines):
            m = pattern.match(line)
            if m:
                status = int(m[4])
                records.append({"row": row, "source_ip": m[1], "path": m[3], "status": status,
                                "ts": datetime.strptime(m[2], "%d/%b/%Y:%H:%M:%S %z"),
                                "outcome": Outcome.OK.value if status < 400 else Outcome.CLIENT_ERROR.value})
        frame = pd.DataFrame.from_records(records)
    else:
        frame = CombinedParser(ParseContext()).parse(lines).events.to_pandas()
    frame["event_id"] = [f"{LOG}:{row}" for row in frame["row"]]
    return conform_events(frame.drop(columns="row"))


@pytest.fixture(scope="module")
def honeypot(shared_data: Path) -> pd.DataFrame:
    text = (shared_data / LOG).read_bytes().decode("utf-8", "backslashreplace")
    return _parse(text.splitlines())


def _peak(times: list[pd.Timestamp], window: pd.Timedelta) -> int:
    """Most requests in any (t - window, t]: a plain two-pointer walk, independent of the detector."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_ip_burst_flags_the_webdav_flood_and_no_ordinary_client(honeypot: pd.DataFrame) -> None:
    detector = IpBurst()
    now = honeypot["ts"].max().to_pydatetime()
    alerts = detector.detect(honeypot, now)

    per_ip = Counter(honeypot["source_ip"])
    times_by_ip: dict[str, list[pd.Timestamp]] = defaultdict(list)
    for ip, ts in zip(honeypot["source_ip"], honeypot["ts"], strict=True):
        times_by_ip[ip].append(ts)
    window = pd.Timedelta(detector.window)
    expected = {
        ip for ip, n in per_ip.items()
        if n >= detector.threshold and _peak(times_by_ip[ip], window) >= detector.threshold
    }

    ip_alerts = {a.entity: a for a in alerts if a.entity_kind is EntityKind.IP}
    assert "82.82.97.119" in expected
    assert set(ip_alerts) == expected
    assert not any(per_ip[ip] < 100 for ip in ip_alerts), "an ordinary client was flagged"

    flood = ip_alerts["82.82.97.119"]
    evidence = flood.evidence
    attacker = sorted(times_by_ip["82.82.97.119"])
    assert evidence["peak_count"] == _peak(attacker, window)
    assert flood.score == evidence["peak_count"] / detector.threshold
    first, last = pd.Timestamp(evidence["first_seen"]), pd.Timestamp(evidence["last_seen"])
    assert evidence["total_requests"] == sum(first <= t <= last for t in attacker)
    assert flood.window_start <= first.to_pydatetime() < last.to_pydatetime() <= flood.window_end
    # Its requests were almost all WebDAV probes that 404ed: the evidence has to say so.
    in_episode = honeypot[honeypot["source_ip"].eq("82.82.97.119") & honeypot["ts"].between(first, last)]
    outcomes = Counter(in_episode["outcome"])
    assert evidence["outcomes"] == dict(sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0])))
    assert len(evidence["sample_event_ids"]) == 20

    # A network alert needs subnet_threshold requests from at least subnet_min_ips of its addresses.
    requests_per_net: Counter[str] = Counter()
    ips_per_net: dict[str, set[str]] = defaultdict(set)
    for ip, n in per_ip.items():
        net = ip.rsplit(".", 1)[0] + ".0/24"
        requests_per_net[net] += n
        ips_per_net[net].add(ip)
    possible = {
        net for net, n in requests_per_net.items()
        if n >= detector.subnet_threshold and len(ips_per_net[net]) >= detector.subnet_min_ips
    }
    subnet_alerts = {a.entity for a in alerts if a.entity_kind is EntityKind.SUBNET}
    assert subnet_alerts <= possible
    assert "82.82.97.0/24" not in subnet_alerts  # the attacker is alone there: its IP alert says it all


def test_login_rules_stay_quiet_on_a_log_without_logins(honeypot: pd.DataFrame) -> None:
    now = honeypot["ts"].max().to_pydatetime()
    failures = int(honeypot["outcome"].eq(Outcome.AUTH_FAILED).sum())
    assert failures < AuthBruteforce().threshold  # so no IP can reach it
    assert AuthBruteforce().detect(honeypot, now) == []
    assert CredentialStuffing().detect(honeypot, now) == []
