"""The json parser: real API Gateway/Traefik samples, mappings, fallbacks, privacy, never crashing."""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.parsers.base import ParseContext, ParsedBatch, event_frame_schema
from pipeline.parsers.jsonl import (
    APIGATEWAY,
    MAILAPI,
    TRAEFIK,
    JsonLinesParser,
    detect_mapping,
    resolve_mapping,
)
from pipeline.privacy import fingerprint
from pipeline.schema import ConfigError

REAL_FILES = [
    "test-apigateway.log",
    "test-apigateway-rest.log",
    "test-apigateway-websocket.log",
    "test-format-json.log",
]
PEPPER = ParseContext().pepper


def parse(lines: list[str], **ctx) -> ParsedBatch:
    return JsonLinesParser(ParseContext(**ctx)).parse(lines)


def assert_partition(batch: ParsedBatch, n: int) -> None:
    rows = batch.events["row"].to_list()
    rejected = [row for row, _ in batch.rejected]
    assert len(rows) == len(set(rows)) and len(rejected) == len(set(rejected))
    assert set(rows).isdisjoint(rejected)
    assert set(rows) | set(rejected) == set(range(n))


def by_row(batch: ParsedBatch) -> dict[int, dict]:
    return {event["row"]: event for event in batch.events.to_dicts()}


def mailapi_line(**fields) -> str:
    record = {"time": "2026-11-30T14:03:11Z", "client_ip": "203.0.113.9", "path": "/v3/mail/send", "status": 202}
    record.update(fields)
    return json.dumps(record)


# -- real third-party samples ------------------------------------------------------------------


def _client_ip(text: str) -> str:
    """The address in `1.2.3.4`, `1.2.3.4:80` or `[::1]:80`, canonical."""
    if text.startswith("["):
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":")[0]
    return ipaddress.ip_address(text).compressed


@pytest.mark.parametrize("name", REAL_FILES)
def test_every_real_sample_line_becomes_an_event(shared_data: Path, name: str) -> None:
    lines = (shared_data / "elastic-integrations" / name).read_text().splitlines()
    batch = parse(lines)  # no mapping configured: detection must pick the right one
    assert batch.rejected == []
    assert_partition(batch, len(lines))
    events = by_row(batch)
    for row, line in enumerate(lines):
        record, event = json.loads(line), events[row]
        assert event["status"] == int(record.get("status", record.get("DownstreamStatus")))
        if "DownstreamStatus" in record:  # Traefik
            assert event["source_ip"] == _client_ip(record.get("ClientHost") or record["ClientAddr"])
            assert event["method"] == record["RequestMethod"]
            assert event["duration_ms"] == pytest.approx(record["Duration"] / 1e6)
            assert event["bytes"] == record["DownstreamContentSize"]
            assert event["user_agent"] == record.get("request_User-Agent")
            assert event["scheme"] == record.get("RequestScheme")
            start = record.get("StartUTC") or record["StartLocal"]
            want = datetime.fromisoformat(start[:26].rstrip("Z") + "+00:00")
            assert event["ts"] == want
        else:  # API Gateway
            assert event["source_ip"] == record["ip"]
            assert event["scheme"] == "https"
            assert event["service"] == "api"
            assert event["method"] == record.get("httpMethod")
            want = datetime.strptime(record["requestTime"], "%d/%b/%Y:%H:%M:%S %z")
            assert event["ts"] == want
            if record.get("responseLength"):
                assert event["bytes"] == int(record["responseLength"])


def test_real_traefik_sample_is_detected_as_traefik(shared_data: Path) -> None:
    lines = (shared_data / "elastic-integrations" / "test-format-json.log").read_text().splitlines()
    assert detect_mapping(lines) is TRAEFIK
    for name in REAL_FILES[:3]:
        lines = (shared_data / "elastic-integrations" / name).read_text().splitlines()
        assert detect_mapping(lines) is APIGATEWAY


# -- mapping selection and configuration -----------------------------------------------------------


def test_mailapi_is_the_default_for_unrecognised_objects() -> None:
    lines = [mailapi_line(), json.dumps({"something": "else"})]
    assert detect_mapping(lines) is MAILAPI
    assert resolve_mapping(None) is None
    assert resolve_mapping("Traefik") is TRAEFIK


def test_explicit_mapping_is_not_overridden_by_detection() -> None:
    traefik = json.dumps(
        {"ClientHost": "192.0.2.1", "DownstreamStatus": 200, "RequestMethod": "GET", "time": "2026-01-01T00:00:00Z"}
    )
    batch = parse([traefik], json_mapping="mailapi")
    assert batch.events.height == 0
    # mailapi finds `time` but no `client_ip`; traefik would have read ClientHost.
    assert "missing client ip" in batch.rejected[0][1]


def test_custom_mapping_reads_nested_and_flat_dotted_fields() -> None:
    mapping = {
        "ts": "event.created",
        "source_ip": ["source.ip", "client"],
        "status": "http.response.status_code",
        "api_key": "http.request.headers.x-api-key",
        "duration_s": "took",
    }
    nested = {"event": {"created": "2026-01-02T03:04:05Z"}, "source": {"ip": "192.0.2.7"},
              "http": {"response": {"status_code": 401}}, "took": 0.25}
    flat = {"event.created": "2026-01-02T03:04:06Z", "client": "192.0.2.8",
            "http.response.status_code": "200", "http.request.headers.x-api-key": "k-123"}
    batch = parse([json.dumps(nested), json.dumps(flat)], json_mapping=mapping)
    events = by_row(batch)
    assert events[0]["ts"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert (events[0]["source_ip"], events[0]["status"], events[0]["outcome"]) == ("192.0.2.7", 401, "auth_failed")
    assert events[0]["duration_ms"] == 250.0
    assert (events[1]["source_ip"], events[1]["status"]) == ("192.0.2.8", 200)
    assert events[1]["api_key_id"] == fingerprint("k-123", PEPPER)
    assert events[0]["service"] == "api"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nginx", "unknown mapping 'nginx'"),
        ({"ts": "t"}, "source_ip must be mapped"),
        ({"ts": "t", "source_ip": "ip", "colour": "c"}, "unknown column 'colour'"),
        ({"ts": "t", "source_ip": "ip", "status": []}, "json_mapping.status"),
        ({"ts": "t", "source_ip": "ip", "status": "a..b"}, "json_mapping.status"),
        ({"ts": "req", "source_ip": "req.ip"}, "mapped as a value"),
        (42, "expected a name or a table"),
    ],
)
def test_bad_mappings_are_config_errors(spec, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        JsonLinesParser(ParseContext(json_mapping=spec))


def test_bad_timezone_and_proxy_list_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        JsonLinesParser(ParseContext(timezone="Mars/Olympus"))
    with pytest.raises(ConfigError, match="trusted_proxies"):
        JsonLinesParser(ParseContext(trusted_proxies=["10.0.0.0/33"]))


# -- privacy ---------------------------------------------------------------------------------------


def test_raw_keys_and_addresses_never_reach_events_or_reasons() -> None:
    secrets = ["mk_live_AAAAsecret1", "mk_live_BBBBsecret2", "mk_live_CCCCsecret3"]
    addresses = ["ann@example.com", "bob@example.org"]
    lines = [
        mailapi_line(api_key=secrets[0], recipients=addresses),
        mailapi_line(**{"x-api-key": secrets[1]}, recipients=", ".join(addresses)),
        mailapi_line(authorization=f"Bearer {secrets[2]}", path=f"/v3/stats?api_key={secrets[0]}"),
        mailapi_line(api_key=secrets[1], time="not a time"),
        mailapi_line(api_key=secrets[2])[:-5],  # broken JSON
    ]
    batch = parse(lines)
    assert_partition(batch, len(lines))
    stored = json.dumps(batch.events.to_dicts(), default=str) + json.dumps(batch.rejected)
    for secret in secrets + addresses:
        assert secret not in stored
    events = by_row(batch)
    assert [events[i]["api_key_id"] for i in range(3)] == [fingerprint(s, PEPPER) for s in secrets]
    assert [events[i]["recipients"] for i in range(2)] == [len(addresses)] * 2


# -- fast path and per-line fallback agree --------------------------------------------------------


VARIED = [
    mailapi_line(status="401", recipients=["a@x.example", "b@x.example"], duration_ms="12.5", bytes=7),
    mailapi_line(client_ip="2001:DB8::1", time=1764511391.5, key_id="k_1", scheme="http"),
    mailapi_line(path="https://api.example.com/v3/messages/0123456789abcdef?token=abc", status=None),
    mailapi_line(account=12, user_agent="ua ü 😀", forwarded_for=["198.51.100.1"], method="get"),
    mailapi_line(time="30/Nov/2026:14:03:11 +0100", client_ip="[2001:db8::2]:443", recipients=True),
]


def test_per_line_fallback_gives_the_same_events_as_the_fast_path() -> None:
    fast = parse(VARIED, trusted_proxies=["203.0.113.0/24"])
    # NaN is valid for Python's json but not for polars: every line below takes the slow path.
    slow_lines = [line[:-1] + ', "unmapped": NaN}' for line in VARIED]
    slow = parse(slow_lines, trusted_proxies=["203.0.113.0/24"])
    assert fast.rejected == slow.rejected == []
    assert fast.events.sort("row").equals(slow.events.sort("row"))


def test_bad_lines_anywhere_in_a_big_batch_keep_rows_aligned() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    lines = [mailapi_line(time=(start + timedelta(seconds=i)).isoformat(), bytes=i) for i in range(20_000)]
    broken = {0, 1, 4095, 4096, 9999, 12_345, 19_999}
    for i in broken:
        lines[i] = lines[i][:-2]
    lines[777] = ""
    lines[778] = "[1, 2]"
    batch = parse(lines)
    assert_partition(batch, len(lines))
    reasons = dict(batch.rejected)
    assert set(reasons) == broken | {777, 778}
    assert reasons[777] == "empty line" and reasons[778].startswith("not a JSON object")
    events = batch.events.sort("row")
    rows = events["row"].to_list()
    assert events["bytes"].to_list() == rows
    assert events["ts"].to_list() == [start + timedelta(seconds=i) for i in rows]


def test_lone_surrogates_and_escapes_are_kept_out_of_polars() -> None:
    lines = [mailapi_line()[:-1] + ', "user_agent": "bad \udc80 bytes"}', mailapi_line(user_agent="ok\\xff")]
    batch = parse(lines)
    assert_partition(batch, 2)
    agents = batch.events.sort("row")["user_agent"].to_list()
    assert agents[0] == "bad \\udc80 bytes" and agents[1] == "ok\\xff"


def test_forwarded_for_only_from_trusted_proxies_and_as_list() -> None:
    lines = [
        mailapi_line(client_ip="10.0.0.5", forwarded_for=["192.0.2.9", "10.0.0.4"]),
        mailapi_line(client_ip="192.0.2.200", forwarded_for="198.51.100.1"),
        mailapi_line(client_ip="10.0.0.5", forwarded_for="198.51.100.1:3456"),
    ]
    events = by_row(parse(lines, trusted_proxies=["10.0.0.0/8"]))
    assert [events[i]["source_ip"] for i in range(3)] == ["192.0.2.9", "192.0.2.200", "198.51.100.1"]
    untrusted = by_row(parse(lines))
    assert [untrusted[i]["source_ip"] for i in range(3)] == ["10.0.0.5", "192.0.2.200", "10.0.0.5"]


def test_traefik_service_depends_on_versioned_path() -> None:
    def line(path: str) -> str:
        return json.dumps({"ClientHost": "192.0.2.1", "RequestPath": path, "StartUTC": "2026-01-01T00:00:00Z"})

    paths = ["/v3/mail/send", "/login", "/vendor/app.js", "/v1"]
    events = by_row(parse([line(p) for p in paths], json_mapping="traefik"))
    want = ["api" if p[:2] == "/v" and p[2:3].isdigit() else "web" for p in paths]
    assert [events[i]["service"] for i in range(len(paths))] == want


def test_sniff_is_the_share_of_json_object_lines() -> None:
    lines = [mailapi_line(), "[1]", "plain text", '{"a": 1}', "{broken", '{"b": {}}']
    objects = sum(isinstance(_try_json(line), dict) for line in lines)
    assert JsonLinesParser.sniff(lines) == pytest.approx(objects / len(lines))
    assert JsonLinesParser.sniff([]) == 0.0


def _try_json(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def test_empty_batch() -> None:
    batch = parse([])
    assert batch.events.height == 0 and batch.rejected == []
    assert batch.events.schema == pl.Schema(event_frame_schema())


# -- never crash -----------------------------------------------------------------------------------

_FIELD_NAMES = sorted({p for m in (MAILAPI, APIGATEWAY, TRAEFIK) for paths in m.fields.values() for p in paths})
_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_json_records = st.dictionaries(
    st.sampled_from(_FIELD_NAMES + ["identity", "extra"]),
    _json_values
    | st.sampled_from(["2026-11-30T14:03:11Z", "203.0.113.9", "[::1]:80", "10/Jun/2023:15:36:28 +0000", "-", ""]),
    max_size=10,
).map(lambda record: json.dumps(record, allow_nan=True))


@st.composite
def _mutated(draw) -> str:
    text = draw(_json_records)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.text(min_size=1, max_size=3))
        if op == "insert":
            text = text[:pos] + piece + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1 :]
        else:
            text = text[:pos] + piece + text[pos + len(piece) :]
    return text


_lines = st.one_of(
    _json_records,
    _mutated(),
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary(max_size=80).map(lambda b: b.decode("utf-8", "backslashreplace")),
    st.integers(10_000, 300_000).map(lambda n: mailapi_line(user_agent="A" * n)),
    st.integers(100, 50_000).map(lambda n: '{"time": ' + "[" * n + "]" * n + "}"),
    st.sampled_from(["", " ", "{}", "[]", "null", '{"time": NaN}', '{"time": 1e400, "client_ip": "::1"}']),
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    lines=st.lists(_lines, min_size=1, max_size=12),
    mapping=st.sampled_from([None, "mailapi", "apigateway", "traefik"]),
    proxies=st.sampled_from([(), ("0.0.0.0/0", "::/0"), ("10.0.0.0/8",)]),
)
def test_any_input_gives_one_event_or_reject_per_line(lines, mapping, proxies) -> None:
    batch = parse(lines, json_mapping=mapping, trusted_proxies=proxies)
    assert_partition(batch, len(lines))
    assert batch.events.schema == pl.Schema(event_frame_schema())
    assert all(isinstance(reason, str) and reason for _, reason in batch.rejected)
    # Everything stored must survive a UTF-8 store and a pandas hand-off.
    json.dumps(batch.events.to_dicts(), default=str).encode("utf-8")
    batch.events.to_pandas()
