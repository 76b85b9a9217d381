"""The combined parser on real Apache logs, nginx log_format compilation, and hostile input."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.parsers import PARSERS, ParseContext, _load_builtin
from pipeline.parsers.base import empty_events
from pipeline.parsers.combined import (
    DEFAULT_FORMAT,
    LOG_FORMATS,
    CombinedParser,
    _scan,
    _scanner_steps,
    compile_log_format,
)
from pipeline.schema import ConfigError, Flag

HONEYNET = "honeynet-redhat-2004/access_log.24"
ATTACKER = "82.82.97.119"


def _decoded_lines(raw: bytes) -> list[str]:
    # The file source's rule: invalid UTF-8 as \xNN escapes, \n / \r\n / \r end a line.
    text = raw.decode("utf-8", "backslashreplace").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _assert_partition(batch, n: int) -> None:
    rows = batch.events["row"].to_list()
    rejected = [row for row, _ in batch.rejected]
    assert len(rows) == len(set(rows))
    assert len(rejected) == len(set(rejected))
    assert not set(rows) & set(rejected)
    assert set(rows) | set(rejected) == set(range(n))
    assert all(isinstance(reason, str) and reason for _, reason in batch.rejected)


@pytest.fixture(scope="module")
def honeynet(shared_data: Path) -> tuple[bytes, list[str]]:
    raw = (shared_data / HONEYNET).read_bytes()
    return raw, _decoded_lines(raw)


def test_registered_under_its_name() -> None:
    _load_builtin()
    assert PARSERS["combined"] is CombinedParser


# -- real data ------------------------------------------------------------------------------


def test_honeynet_log_parses_every_line(honeynet: tuple[bytes, list[str]]) -> None:
    raw, lines = honeynet
    raw_lines = raw.split(b"\n")[:-1]
    # Facts about the file itself, counted from its bytes, not from the parser.
    assert len(raw_lines) == 9_344
    attacker_lines = sum(1 for line in raw_lines if line.startswith(ATTACKER.encode() + b" "))
    assert attacker_lines == 6_152

    batch = CombinedParser(ParseContext()).parse(lines)

    assert batch.rejected == []
    assert batch.events.height == len(raw_lines)
    _assert_partition(batch, len(lines))
    events = batch.events
    assert events.filter(pl.col("source_ip") == ATTACKER).height == attacker_lines

    # The WebDAV SEARCH overflow requests carry raw control bytes; "-" requests are empty.
    control_lines = sum(1 for line in raw_lines if re.search(rb'"[A-Z]+ [^"]*[\x00-\x08\x0e-\x1f]', line))
    dash_requests = sum(1 for line in raw_lines if b'] "-" ' in line)
    flags = events["flags"]
    assert (flags == Flag.BINARY_REQUEST.value).sum() == control_lines > 0
    assert (flags == Flag.EMPTY_REQUEST.value).sum() == dash_requests > 0

    first = raw_lines[0].decode()
    stamp = first[first.index("[") + 1 : first.index("]")]
    expected_ts = datetime.strptime(stamp, "%d/%b/%Y:%H:%M:%S %z").astimezone(timezone.utc)
    assert events["ts"][0] == expected_ts
    assert events["source_ip"][0] == first.split(" ", 1)[0]


def test_sniff_recognises_access_logs_not_json(honeynet: tuple[bytes, list[str]]) -> None:
    _, lines = honeynet
    json_lines = ['{"time": "2026-11-30T14:03:11Z", "client_ip": "203.0.113.9"}'] * 50
    assert CombinedParser.sniff(lines[:200]) == 1.0
    assert CombinedParser.sniff(json_lines) == 0.0
    assert CombinedParser.sniff(lines[:50] + json_lines) == 0.5
    assert CombinedParser.sniff([]) == 0.0


def test_fallback_scanner_reads_the_same_fields_as_the_regex(honeynet: tuple[bytes, list[str]]) -> None:
    _, lines = honeynet
    steps = _scanner_steps(DEFAULT_FORMAT)
    pattern = re.compile(DEFAULT_FORMAT.regex)
    for line in lines[:3000:7] + [line for line in lines if len(line) > 20_000][:5]:
        match = pattern.match(line)
        assert match is not None
        groups = match.groupdict().items()
        expected = {g: v for g, v in groups if g in DEFAULT_FORMAT.groups and v is not None}
        assert _scan(line, steps, DEFAULT_FORMAT) == expected


def test_odd_spacing_gives_the_same_events_as_clean_lines(honeynet: tuple[bytes, list[str]]) -> None:
    _, lines = honeynet
    clean = lines[:400]
    # Doubled separators defeat the fast regex, so every one of these goes through the fallback.
    spaced = [line.replace(" - - [", "  -  -  [", 1).replace('" ', '"  ', 1) for line in clean]
    parser = CombinedParser(ParseContext())
    fast, slow = parser.parse(clean), parser.parse(spaced)
    assert slow.rejected == [] and fast.rejected == []
    assert slow.events.equals(fast.events)


def test_big_batches_split_across_threads_give_the_same_events(honeynet: tuple[bytes, list[str]]) -> None:
    _, lines = honeynet
    copies = 6  # 56k lines: above the size where parsing is split across the thread pool
    parser = CombinedParser(ParseContext())
    one = parser.parse(lines).events
    many = parser.parse(lines * copies).events
    assert many.height == one.height * copies
    shifted = pl.concat([one.with_columns(pl.col("row") + i * len(lines)) for i in range(copies)])
    assert many.equals(shifted)


# -- log_format compilation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "line", "expected"),
    [
        (
            "combined",
            '192.0.2.1 - alice [30/Nov/2026:14:03:11 +0100] "GET / HTTP/1.1" 200 12 "-" "curl/8.5.0"',
            {"remote_addr": "192.0.2.1", "remote_user": "alice", "status": "200",
             "http_user_agent": "curl/8.5.0"},
        ),
        (
            "common",
            '192.0.2.1 - - [30/Nov/2026:14:03:11 +0100] "GET / HTTP/1.1" 404 -',
            {"remote_addr": "192.0.2.1", "request": "GET / HTTP/1.1", "body_bytes_sent": "-"},
        ),
        (
            "mailapi",
            '10.0.0.2 - - [30/Nov/2026:14:03:11 +0000] "POST /v3/mail/send HTTP/1.1" 202 64 "-" "sdk/1" '
            '0.041 https "mk_live_1" "198.51.100.7, 10.0.0.3"',
            {"request_time": "0.041", "scheme": "https", "http_x_api_key": "mk_live_1",
             "http_x_forwarded_for": "198.51.100.7, 10.0.0.3"},
        ),
    ],
)
def test_presets_compile_to_one_regex_for_python_and_polars(preset: str, line: str, expected: dict) -> None:
    compiled = compile_log_format(preset)
    assert compiled.log_format == LOG_FORMATS[preset]
    match = re.match(compiled.regex, line)
    assert match is not None
    by_variable = {compiled.groups[g]: v for g, v in match.groupdict().items() if g in compiled.groups}
    assert {k: by_variable[k] for k in expected} == expected
    polars_fields = pl.Series([line]).str.extract_groups(compiled.regex).struct.unnest()
    assert {compiled.groups[g]: polars_fields[g][0] for g in compiled.groups} == by_variable


def test_unknown_and_braced_variables_are_captured_and_ignored() -> None:
    fmt = '${remote_addr} [$time_local] $geoip_country_code "$request" $status "$http_x_custom"'
    compiled = compile_log_format(fmt)
    assert {"geoip_country_code", "http_x_custom", "remote_addr"} <= compiled.variables
    line = '192.0.2.1 [30/Nov/2026:14:03:11 +0000] NL "GET /v3/x HTTP/1.1" 200 "anything at all"'
    batch = CombinedParser(ParseContext(log_format=fmt)).parse([line])
    assert batch.rejected == []
    event = batch.events.row(0, named=True)
    got = (event["source_ip"], event["path"], event["status"], event["service"])
    assert got == ("192.0.2.1", "/v3/x", 200, "api")


def test_parser_compiles_its_format_once() -> None:
    parser = CombinedParser(ParseContext(log_format="mailapi"))
    assert parser.format == compile_log_format("mailapi")
    before = parser.format
    line = '10.0.0.2 - - [30/Nov/2026:14:03:11 +0000] "GET / HTTP/1.1" 200 1 "-" "-" 0.1 http "-" "-"'
    parser.parse([line] * 3)
    assert parser.format is before


@pytest.mark.parametrize(
    ("ctx", "message"),
    [
        (ParseContext(log_format='$remote_addr "$request" $status'), "no time variable"),
        (ParseContext(log_format="no_such_preset"), "neither a preset"),
        (ParseContext(trusted_proxies=["10.0.0.0/33"]), "trusted_proxies"),
    ],
)
def test_bad_configuration_is_a_config_error(ctx: ParseContext, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CombinedParser(ctx)


def test_empty_batch_and_careless_input() -> None:
    parser = CombinedParser(ParseContext())
    empty = parser.parse([])
    assert empty.events.height == 0 and empty.rejected == []
    # Lone surrogates (a caller that decoded with surrogateescape) must not crash polars.
    line = '192.0.2.1 - - [30/Nov/2026:14:03:11 +0000] "GET /\udcff HTTP/1.1" 200 1 "-" "-"'
    batch = parser.parse([line, "\udcff"])
    _assert_partition(batch, 2)
    assert batch.events["path"].to_list() == ["/\\xff"]


def test_raw_control_bytes_in_the_request_are_flagged_like_escaped_ones() -> None:
    # A decoded file keeps bytes below 0x80 as characters; servers write them as \\xNN text.
    stem = '192.0.2.1 - - [30/Nov/2026:14:03:11 +0000] "{}" 400 157 "-" "-"'
    requests = ["\x16\x03\x01\x00\xa5", "\x00\x01\x02", "GET /\x02 HTTP/1.1"]
    lines = [stem.format(request) for request in requests]
    events = CombinedParser(ParseContext()).parse(lines).events
    assert events["flags"].to_list() == [
        Flag.TLS_ON_PLAIN_PORT.value,
        Flag.BINARY_REQUEST.value,
        Flag.BINARY_REQUEST.value,
    ]
    assert events["method"].to_list() == [None, None, "GET"]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("192.0.2.1:8080", "192.0.2.1"),
        ("[2001:db8::1]x", None),
        ("192.0.2.1:http", None),
        ("192.0.2.256", None),
        ("-", None),
    ],
)
def test_client_address_spellings(client: str, expected: str | None) -> None:
    line = f'{client} - - [30/Nov/2026:14:03:11 +0000] "GET / HTTP/1.1" 200 1 "-" "-"'
    batch = CombinedParser(ParseContext()).parse([line])
    if expected is None:
        assert batch.events.height == 0
        assert "client address is not an IP address" in batch.rejected[0][1]
    else:
        assert batch.events["source_ip"].to_list() == [expected]


def test_format_pasted_with_nginx_conf_escapes_means_the_same() -> None:
    pasted = '$remote_addr [$time_local] \\"$request\\" $status'
    plain = '$remote_addr [$time_local] "$request" $status'
    assert compile_log_format(pasted).regex == compile_log_format(plain).regex


# -- hostile input --------------------------------------------------------------------------

VALID = [
    '203.0.113.9 - alice [30/Nov/2026:14:03:11 +0000] "POST /v3/send?api_key=k HTTP/1.1" 202 64 "-" "sdk/1"',
    '[2001:db8::1]:443 - - [25/Apr/2004:04:07:38 -0400] "\\x16\\x03\\x01\\x00" 400 157 "-" "-"',
    '10.0.0.2 - - [30/Nov/2026:14:03:11 +0000] "GET /" 200 1 "-" "-" 0.04 https "mk" "192.0.2.7, 10.0.0.3"',
    '127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326',
]
NASTY = '"\\[] -:\t\x00\x16\x7f\u2028é\\x90,'


@st.composite
def mutated(draw: st.DrawFn) -> str:
    line = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(line)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        if action == "insert":
            line = line[:pos] + draw(st.text(st.sampled_from(NASTY), min_size=1, max_size=4)) + line[pos:]
        elif action == "delete":
            line = line[:pos] + line[pos + draw(st.integers(1, 8)) :]
        elif action == "replace" and pos < len(line):
            line = line[:pos] + draw(st.sampled_from(NASTY)) + line[pos + 1 :]
        else:  # blow one spot up: lines far beyond 32 KB
            line = line[:pos] + line[pos : pos + 3] * draw(st.integers(1, 30_000)) + line[pos:]
    return line


binary_lines = st.binary(max_size=300).map(lambda b: b.decode("utf-8", "backslashreplace"))
any_line = st.one_of(mutated(), st.text(max_size=300), binary_lines, st.sampled_from(VALID))

CONTEXTS = [
    ParseContext(),
    ParseContext(log_format="mailapi", trusted_proxies=["10.0.0.0/8", "2001:db8::/32"]),
    ParseContext(
        log_format='$remote_addr [$time_iso8601] "$request_method $request_uri" $msec "$http_authorization"'
    ),
]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(lines=st.lists(any_line, min_size=1, max_size=12), which=st.integers(0, len(CONTEXTS) - 1))
def test_any_input_ends_as_exactly_one_event_or_reject(lines: list[str], which: int) -> None:
    batch = CombinedParser(CONTEXTS[which]).parse(lines)
    _assert_partition(batch, len(lines))
    assert batch.events.schema == empty_events().schema
