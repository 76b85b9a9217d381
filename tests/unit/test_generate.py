"""The traffic generator: reproducible, labelled, time-ordered, and readable by our own parsers."""

from __future__ import annotations

import csv
import importlib
import ipaddress
import json
import re
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import iptocc
import numpy as np
import pytest

from pipeline.generate import (
    API_FILE,
    ATTACK_KINDS,
    DEFAULT_START,
    EDGE_FILE,
    LABEL_COLUMNS,
    LEGIT_PREFIX,
    PREFIXES,
    SMTP_FILE,
    AttackParams,
    IpFlood,
    _draw_ip,
    generate,
)

DATA_FILES = (API_FILE, EDGE_FILE, SMTP_FILE)
ALL_FILES = (*DATA_FILES, "labels.csv", "keys.json", "revoked_keys.txt")
SEED, DAYS, SCALE = 11, 2, 0.05


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("noisy")
    generate(out, days=DAYS, seed=SEED, scale=SCALE)
    return out


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quiet")
    generate(out, days=DAYS, seed=SEED, scale=SCALE, attacks=False)
    return out


def read_labels(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def attack_labels(out: Path) -> list[dict[str, str]]:
    return [row for row in read_labels(out) if not row["attack_kind"].startswith(LEGIT_PREFIX)]


def lines(out: Path, name: str) -> list[str]:
    return (out / name).read_text().splitlines()


def iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# Line time parsers written independently of the generator's formatting code.
def json_time(line: str) -> datetime:
    return iso(json.loads(line)["time"])


def nginx_time(line: str) -> datetime:
    stamp = re.search(r"\[([^\]]+)\]", line).group(1)
    return datetime.strptime(stamp, "%d/%b/%Y:%H:%M:%S %z")


def syslog_time(line: str, year: int) -> datetime:
    return datetime.strptime(f"{year} {line[:15]}", "%Y %b %d %H:%M:%S").replace(tzinfo=timezone.utc)


def line_ip(name: str, line: str) -> str:
    if name == API_FILE:
        return json.loads(line)["client_ip"]
    if name == EDGE_FILE:
        return line.split(" ", 1)[0]
    return re.search(r"\[([0-9A-Fa-f.:]+)\]", line.split(": ", 1)[1]).group(1)


# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(noisy: Path, tmp_path: Path) -> None:
    generate(tmp_path, days=DAYS, seed=SEED, scale=SCALE)
    for name in ALL_FILES:
        assert (tmp_path / name).read_bytes() == (noisy / name).read_bytes(), name


def test_another_seed_gives_other_traffic(noisy: Path, tmp_path: Path) -> None:
    generate(tmp_path, days=DAYS, seed=SEED + 1, scale=SCALE)
    for name in DATA_FILES:
        assert (tmp_path / name).read_bytes() != (noisy / name).read_bytes(), name


def test_summary_counts_what_was_written(tmp_path: Path) -> None:
    stages: list[tuple[str, int, int]] = []
    summary = generate(tmp_path, days=1, seed=3, scale=0.02, progress=lambda *a: stages.append(a))
    assert summary.files == {name: len(lines(tmp_path, name)) for name in DATA_FILES}
    assert summary.lines == sum(summary.files.values())
    assert summary.labels == dict(sorted(Counter(r["attack_kind"] for r in read_labels(tmp_path)).items()))
    assert summary.start == DEFAULT_START and summary.end == DEFAULT_START + timedelta(days=1)
    assert [done for _, done, _ in stages] == list(range(1, len(stages) + 1))
    assert stages[-1][1] == stages[-1][2]


def test_labels_cover_every_attack_kind_with_ips(noisy: Path) -> None:
    rows = attack_labels(noisy)
    assert list(rows[0]) == list(LABEL_COLUMNS)
    assert {r["attack_kind"] for r in rows} == set(ATTACK_KINDS)
    for row in rows:
        ips = row["ips"].split()
        assert ips, row["attack_kind"]
        for ip in ips:
            ipaddress.ip_address(ip)
        assert iso(row["first_ts"]) <= iso(row["last_ts"])
        assert row["file"] in DATA_FILES
        assert json.loads(row["params"])["enabled"] is True


def test_no_attack_labels_when_attacks_are_off(quiet: Path) -> None:
    kinds = {r["attack_kind"] for r in read_labels(quiet)}
    assert kinds, "benign labels (campaigns, rotations) are still written"
    assert all(k.startswith(LEGIT_PREFIX) for k in kinds), kinds


def test_turning_attacks_off_removes_only_attack_lines(noisy: Path, quiet: Path) -> None:
    for name in DATA_FILES:
        with_attacks, without = Counter(lines(noisy, name)), Counter(lines(quiet, name))
        assert not without - with_attacks, f"{name}: normal traffic changed with attacks on"
        extra = with_attacks - without
        attack_ips = {ip for r in attack_labels(noisy) if r["file"] == name for ip in r["ips"].split()}
        assert extra and all(line_ip(name, line) in attack_ips for line in extra.elements()), name


@pytest.mark.parametrize("name", DATA_FILES)
def test_lines_are_in_time_order(noisy: Path, name: str) -> None:
    text = lines(noisy, name)
    if name == API_FILE:
        times = [json_time(line) for line in text]
    elif name == EDGE_FILE:
        times = [nginx_time(line) for line in text]
    else:
        times = [syslog_time(line, DEFAULT_START.year) for line in text]
    assert len(times) > 100
    assert times == sorted(times)
    end = DEFAULT_START + timedelta(days=DAYS)
    assert DEFAULT_START <= times[0] and times[-1] < end


def test_attack_ips_appear_in_their_files(noisy: Path) -> None:
    for row in attack_labels(noisy):
        seen = {line_ip(row["file"], line) for line in lines(noisy, row["file"])}
        missing = set(row["ips"].split()) - seen
        assert not missing, f"{row['attack_kind']}: {sorted(missing)[:3]}"


def test_ip_labels_span_exactly_the_attackers_lines(noisy: Path) -> None:
    """Attack IPs are fresh, so every line from a labelled IP belongs to the attack."""
    readers = {API_FILE: json_time, EDGE_FILE: nginx_time, SMTP_FILE: lambda s: syslog_time(s, DEFAULT_START.year)}
    for row in attack_labels(noisy):
        if row["entity_kind"] != "ip":
            continue
        ips = set(row["ips"].split())
        assert row["entity"] in ips
        times = [readers[row["file"]](line) for line in lines(noisy, row["file"])
                 if line_ip(row["file"], line) in ips]
        assert min(times) == iso(row["first_ts"]), row["attack_kind"]
        assert max(times) == iso(row["last_ts"]), row["attack_kind"]


def test_attack_sizes_follow_their_parameters(tmp_path: Path) -> None:
    params = AttackParams(ip_flood=IpFlood(requests=777, minutes=2.0),
                          path_enumeration=replace(AttackParams().path_enumeration, paths=123))
    generate(tmp_path, days=1, seed=5, scale=0.02, attack_params=params)
    by_kind = {r["attack_kind"]: r for r in attack_labels(tmp_path)}
    flood_ip = by_kind["ip_flood"]["entity"]
    flood = [line for line in lines(tmp_path, API_FILE) if json.loads(line)["client_ip"] == flood_ip]
    assert len(flood) == 777
    assert iso(by_kind["ip_flood"]["last_ts"]) - iso(by_kind["ip_flood"]["first_ts"]) <= timedelta(minutes=2)
    enum_ip = by_kind["path_enumeration"]["entity"]
    paths = {line.split('"')[1].split()[1] for line in lines(tmp_path, EDGE_FILE) if line.startswith(enum_ip + " ")}
    assert len(paths) == 123


def test_disabled_attacks_are_not_injected(tmp_path: Path) -> None:
    off = {kind: replace(getattr(AttackParams(), kind), enabled=False) for kind in ATTACK_KINDS[1:]}
    generate(tmp_path, days=1, seed=5, scale=0.02, attack_params=AttackParams(**off))
    assert [r["attack_kind"] for r in attack_labels(tmp_path)] == [ATTACK_KINDS[0]]


@pytest.mark.parametrize("country", sorted(PREFIXES))
def test_prefixes_geolocate_to_their_country(country: str) -> None:
    rng = np.random.default_rng(0)
    for cidr, _kind in PREFIXES[country]:
        sample = [_draw_ip(rng, cidr) for _ in range(40)]
        assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(cidr) for ip in sample)
        assert set(iptocc.country_code(sample)) == {country}, cidr


def test_customers_and_attackers_geolocate_as_labelled(noisy: Path) -> None:
    customers = json.loads((noisy / "keys.json").read_text())["customers"]
    for customer in customers:
        assert set(iptocc.country_code(customer["ips"])) == {customer["country"]}
    rows = {r["attack_kind"]: r for r in attack_labels(noisy)}
    leaked = json.loads(rows["leaked_key"]["params"])
    countries = set(iptocc.country_code(rows["leaked_key"]["ips"].split()))
    assert leaked["home_country"] not in countries
    assert countries == set(leaked["new_countries"])
    travel = json.loads(rows["impossible_travel"]["params"])
    home_ip, far_ip = rows["impossible_travel"]["ips"].split()
    assert iptocc.country_code([home_ip, far_ip]) == [travel["home_country"], travel["far_country"]]
    assert travel["km"] >= travel["min_km"]
    assert iso(rows["impossible_travel"]["last_ts"]) - iso(rows["impossible_travel"]["first_ts"]) <= timedelta(
        minutes=travel["minutes"])


def test_revoked_keys_are_only_used_again_by_the_attack(noisy: Path) -> None:
    revoked = dict(line.split() for line in lines(noisy, "revoked_keys.txt"))
    assert revoked
    keys = {k["key"]: k for c in json.loads((noisy / "keys.json").read_text())["customers"] for k in c["keys"]}
    # Each line is `KEY TIME`, the time being when keys.json says the key was rotated away.
    assert {key: keys[key]["revoked_at"] for key in revoked} == revoked
    attack = next(r for r in attack_labels(noisy) if r["attack_kind"] == "revoked_key")
    assert attack["entity"] in revoked
    late = [json.loads(line) for line in lines(noisy, API_FILE)
            if (key := json.loads(line).get("api_key")) in keys and keys[key]["status"] == "revoked"
            and json_time(line) >= iso(keys[key]["revoked_at"])]
    assert late, "the revoked_key attack presents a rotated-away key"
    assert {(e["api_key"], e["status"], e["client_ip"]) for e in late} == {(attack["entity"], 401, attack["ips"])}


def test_campaigns_burst_from_the_customers_usual_ips(noisy: Path) -> None:
    customers = {c["account"]: c for c in json.loads((noisy / "keys.json").read_text())["customers"]}
    campaigns = [r for r in read_labels(noisy) if r["attack_kind"] == "legit_campaign"]
    assert campaigns
    for row in campaigns:
        params = json.loads(row["params"])
        assert set(row["ips"].split()) <= set(customers[row["entity"]]["ips"])
        # Retries of the last calls may trail the campaign by a few seconds.
        assert iso(row["last_ts"]) - iso(row["first_ts"]) <= timedelta(minutes=params["minutes"], seconds=10)
        assert params["calls"] >= 100


def test_spam_spike_multiplies_the_keys_usual_recipients(noisy: Path) -> None:
    row = next(r for r in attack_labels(noisy) if r["attack_kind"] == "spam_volume_spike")
    params = json.loads(row["params"])
    first, last = iso(row["first_ts"]), iso(row["last_ts"])
    inside = outside = 0
    for line in lines(noisy, API_FILE):
        event = json.loads(line)
        if event.get("api_key") == row["entity"]:
            if first <= json_time(line) <= last:
                inside += event.get("recipients", 0)
            else:
                outside += event.get("recipients", 0)
    hours_outside = DAYS * 24 - params["hours"]
    assert inside / params["hours"] >= params["factor"] / 2 * (outside / hours_outside)


def test_start_and_bad_arguments(tmp_path: Path) -> None:
    start = datetime(2027, 3, 1, 12, 0, tzinfo=timezone.utc)
    generate(tmp_path, days=1, seed=1, scale=0.02, start=start, attacks=False)
    times = [json_time(line) for line in lines(tmp_path, API_FILE)]
    assert start <= times[0] and times[-1] < start + timedelta(days=1)
    with pytest.raises(ValueError, match="days"):
        generate(tmp_path, days=0, seed=1)
    with pytest.raises(ValueError, match="scale"):
        generate(tmp_path, days=1, seed=1, scale=0)


# ---------------------------------------------------------------------------------------------
# Round trips through the parsers (written in parallel; skipped only while a module is missing).


def _parser(module: str, cls_name: str | None = None):
    try:
        mod = importlib.import_module(f"pipeline.parsers.{module}")
    except ImportError as exc:
        pytest.skip(f"pipeline.parsers.{module} is not importable yet ({exc})")
    from pipeline.parsers.base import Parser

    classes = [obj for obj in vars(mod).values() if isinstance(obj, type) and issubclass(obj, Parser)
               and obj is not Parser and obj.__module__ == mod.__name__]
    assert len(classes) == 1, classes
    return classes[0]


def test_api_log_round_trips_through_the_json_parser(noisy: Path) -> None:
    from pipeline.parsers.base import ParseContext
    from pipeline.privacy import fingerprint

    parser_cls = _parser("jsonl")
    ctx = ParseContext()
    text = lines(noisy, API_FILE)
    batch = parser_cls(ctx).parse(text)
    assert batch.rejected == []
    events = batch.events.sort("row")
    raw = [json.loads(line) for line in text]
    assert events["source_ip"].to_list() == [r["client_ip"] for r in raw]
    assert events["status"].to_list() == [r["status"] for r in raw]
    assert events["recipients"].to_list() == [r.get("recipients") for r in raw]
    assert events["api_key_id"].to_list() == [fingerprint(r["api_key"], ctx.pepper) if "api_key" in r else None
                                              for r in raw]
    assert [t.isoformat() for t in events["ts"].to_list()] == [json_time(line).isoformat() for line in text]


def test_nginx_log_round_trips_through_the_combined_parser(noisy: Path) -> None:
    from pipeline.parsers.base import ParseContext

    parser_cls = _parser("combined")
    text = lines(noisy, EDGE_FILE)
    batch = parser_cls(ParseContext(log_format="mailapi")).parse(text)
    assert batch.rejected == []
    events = batch.events.sort("row")
    assert events["source_ip"].to_list() == [line.split(" ", 1)[0] for line in text]
    assert events["ts"].to_list() == [nginx_time(line) for line in text]
    labels = {r["attack_kind"]: r for r in attack_labels(noisy)}
    secret_rows = [i for i, line in enumerate(text) if "api_key=" in line]
    assert secret_rows
    flagged = events.filter(events["flags"].str.contains("secret_in_url").fill_null(False))["row"].to_list()
    assert flagged == secret_rows
    assert labels["secret_in_url"]["entity"] not in " ".join(events["path"].drop_nulls().to_list())
    plain = events.filter((events["scheme"] == "http") & events["api_key_id"].is_not_null()).height
    assert plain == json.loads(labels["plaintext_http"]["params"])["requests"]


def test_maillog_round_trips_through_the_smtp_auth_parser(noisy: Path) -> None:
    from pipeline.parsers.base import ParseContext
    from pipeline.schema import Outcome

    parser_cls = _parser("smtp_auth")
    text = lines(noisy, SMTP_FILE)
    ctx = ParseContext(reference_time=DEFAULT_START + timedelta(days=DAYS))
    batch = parser_cls(ctx).parse(text)
    assert batch.rejected == []
    events = batch.events.sort("row")
    assert events["source_ip"].to_list() == [line_ip(SMTP_FILE, line) for line in text]
    assert events["ts"].to_list() == [syslog_time(line, DEFAULT_START.year) for line in text]
    failed = ["authentication failed" in line for line in text]
    assert events["outcome"].to_list() == [Outcome.AUTH_FAILED.value if f else Outcome.OK.value for f in failed]
    users = [m.group(1) if (m := re.search(r"sasl_username=(\S+)$", line)) else None for line in text]
    assert events["account"].to_list() == users
