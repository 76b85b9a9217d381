"""The smtp-auth parser and its syslog time handling: shapes, times, privacy, robustness, vectorisation."""

from __future__ import annotations

import base64
import calendar
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.parsers import PARSERS, _load_builtin
from pipeline.parsers import smtp_auth as smtp_auth_module
from pipeline.parsers.base import ParseContext, event_frame_schema
from pipeline.parsers.smtp_auth import SmtpAuthParser
from pipeline.parsers.syslog import MAX_LINE_CHARS, TAI64_EPOCH, Clock, split_lines
from pipeline.schema import ConfigError, Flag, Outcome

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "parsers" / "smtp-auth"
UTC = timezone.utc


def parse(lines: list[str], **ctx: object) -> tuple[dict[int, dict], dict[int, str]]:
    ctx.setdefault("reference_time", datetime(2026, 3, 1, tzinfo=UTC))
    batch = SmtpAuthParser(ParseContext(**ctx)).parse(lines)
    return {row["row"]: row for row in batch.events.to_dicts()}, dict(batch.rejected)


def postfix_failure(stamp: str, ip: str = "203.0.113.5") -> str:
    return f"{stamp} mx postfix/smtpd[1]: warning: unknown[{ip}]: SASL LOGIN authentication failed: UGFzc3dvcmQ6"


def test_registered_under_its_name() -> None:
    _load_builtin()
    assert PARSERS["smtp-auth"] is SmtpAuthParser


def test_unknown_time_zone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        SmtpAuthParser(ParseContext(timezone="Mars/Olympus"))


# --------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("reference", "stamp", "year"),
    [
        (datetime(2026, 1, 2, tzinfo=UTC), "Dec 31 23:00:00", 2025),  # later month: last year
        (datetime(2026, 1, 2, tzinfo=UTC), "Jan  1 23:00:00", 2026),
        # A date after the reference (the file's last write, or now) cannot be this year's.
        (datetime(2026, 1, 2, tzinfo=UTC), "Jan 30 23:00:00", 2025),
        (datetime(2026, 12, 4, tzinfo=UTC), "Dec 30 10:00:00", 2025),
        # One day of slack for clocks and zones a little ahead of the reference.
        (datetime(2026, 1, 2, tzinfo=UTC), "Jan  3 12:00:00", 2026),
        (datetime(2026, 12, 4, tzinfo=UTC), "Dec  4 10:00:00", 2026),
        (datetime(2026, 7, 15, tzinfo=UTC), "Aug  1 00:00:00", 2025),
        (datetime(2026, 7, 15, tzinfo=UTC), "Feb  1 00:00:00", 2026),
        # 23:30 UTC on Dec 31 is already January in Berlin: the local month decides.
        (datetime(2025, 12, 31, 23, 30, tzinfo=UTC), "Jan  1 00:10:00", 2026),
    ],
)
def test_year_of_rfc3164_stamp_is_inferred_from_reference(reference: datetime, stamp: str, year: int) -> None:
    tz = "Europe/Berlin" if reference.hour == 23 else "UTC"
    events, rejected = parse([postfix_failure(stamp)], reference_time=reference, timezone=tz)
    assert not rejected
    assert events[0]["ts"].astimezone(ZoneInfo(tz)).year == year


def test_feb_29_is_rejected_when_the_inferred_year_is_not_leap() -> None:
    events, rejected = parse([postfix_failure("Feb 29 10:00:00")], reference_time=datetime(2025, 3, 10, tzinfo=UTC))
    assert not events
    assert "invalid date" in rejected[0]


def test_tai64n_label_converts_with_ten_second_offset() -> None:
    moment = datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC)
    seconds = calendar.timegm(moment.utctimetuple())
    label = f"@{TAI64_EPOCH + seconds:016x}{moment.microsecond * 1000 + 789:08x}"
    events, rejected = parse(
        [f"{label} imap-login: Info: Aborted login (auth failed, 1 attempts): user=<u>, rip=192.0.2.7, lip=192.0.2.1"]
    )
    assert not rejected
    assert events[0]["ts"] == moment  # nanoseconds beyond the microsecond are dropped


def test_tai64n_label_before_the_epoch_is_rejected() -> None:
    events, rejected = parse(["@3fffffffffffffff00000000 imap-login: Info: Login: user=<u>, rip=192.0.2.7"])
    assert not events
    assert rejected[0] == "TAI64N label out of range"


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2026-01-05T10:00:00.123+01:00", datetime(2026, 1, 5, 9, 0, 0, 123000, tzinfo=UTC)),
        ("2026-01-05T10:00:00Z", datetime(2026, 1, 5, 10, tzinfo=UTC)),
        ("2026-01-05T10:00:00-0530", datetime(2026, 1, 5, 15, 30, tzinfo=UTC)),
        ("2026-01-05T10:00:00,5+00:00", datetime(2026, 1, 5, 10, 0, 0, 500000, tzinfo=UTC)),
        # No offset: the context's zone (Berlin, CET in January).
        ("2026-01-05T10:00:00", datetime(2026, 1, 5, 9, tzinfo=UTC)),
        ("2026-07-05 10:00:00", datetime(2026, 7, 5, 8, tzinfo=UTC)),
        ("Jan  5 10:00:00.000001", datetime(2026, 1, 5, 9, 0, 0, 1, tzinfo=UTC)),
    ],
)
def test_iso_and_precise_stamps(stamp: str, expected: datetime) -> None:
    august = datetime(2026, 8, 1, tzinfo=UTC)
    events, rejected = parse([postfix_failure(stamp)], timezone="Europe/Berlin", reference_time=august)
    assert not rejected
    assert events[0]["ts"] == expected


def test_repeated_autumn_hour_tolerates_jitter_but_follows_the_change() -> None:
    stamps = ["Oct 25 02:40:05", "Oct 25 02:40:03", "Oct 25 02:58:00", "Oct 25 02:10:00", "Oct 25 02:40:04"]
    events, rejected = parse(
        [postfix_failure(s) for s in stamps], timezone="Europe/Berlin", reference_time=datetime(2026, 11, 1, tzinfo=UTC)
    )
    assert not rejected
    # CEST (+2) until the clock visibly restarts the hour, CET (+1) after; 2 s back is jitter.
    assert [events[row]["ts"].strftime("%H:%M:%S") for row in range(5)] == [
        "00:40:05",
        "00:40:03",
        "00:58:00",
        "01:10:00",
        "01:40:04",
    ]


def test_offset_out_of_range_is_rejected() -> None:
    events, rejected = parse([postfix_failure("2026-01-05T10:00:00+25:00")])
    assert not events
    assert "offset" in rejected[0]


def test_exim_timestamp_inside_journald_line_is_used() -> None:
    line = (
        "mx exim[3751]: 2026-02-17 23:20:49 plain_server authenticator failed for ([192.0.2.17]) "
        "[192.0.2.27]: 535 Incorrect authentication data"
    )
    events, rejected = parse([line])
    assert not rejected
    assert events[0]["ts"] == datetime(2026, 2, 17, 23, 20, 49, tzinfo=UTC)
    assert events[0]["source_ip"] == "192.0.2.27"


def test_split_lines_exposes_header_parts_for_reuse() -> None:
    clock = Clock.from_context("UTC", datetime(2026, 3, 1, tzinfo=UTC))
    frame = split_lines(pl.Series(["Feb  1 10:00:00 mx1 postfix/smtpd[77]: connect from x[192.0.2.1]"]), clock)
    row = frame.row(0, named=True)
    assert (row["host"], row["program"], row["pid"], row["message"]) == (
        "mx1",
        "postfix/smtpd",
        "77",
        "connect from x[192.0.2.1]",
    )


# --------------------------------------------------------------------------- shapes and attribution


def test_source_ip_normalisation() -> None:
    lines = [
        "Feb  1 10:00:00 mx imapd: LOGIN FAILED, user=a, ip=[::ffff:198.51.100.1]",
        "Feb  1 10:00:00 mx imapd: LOGIN FAILED, user=a, ip=[2001:DB8:0:0:0:0:0:1]",
        "Feb  1 10:00:00 mx imapd: LOGIN FAILED, user=a, ip=[999.1.1.1]",
    ]
    events, rejected = parse(lines)
    assert events[0]["source_ip"] == "198.51.100.1"
    assert events[1]["source_ip"] == "2001:db8::1"
    assert rejected[2] == "invalid source IP address"


@pytest.mark.parametrize(
    ("line", "ip"),
    [
        # A user name carrying its own rip= must not move the blame.
        (
            "Feb  1 10:00:00 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts): "
            "user=<x, rip=192.0.2.99>, method=PLAIN, rip=203.0.113.1, lip=192.0.2.1",
            "203.0.113.1",
        ),
        (
            "Feb  1 10:00:00 mx dovecot: auth: sql(a,192.0.2.99,b,203.0.113.2,<s>): Password mismatch",
            "203.0.113.2",
        ),
        (
            "Feb  1 10:00:00 mx sendmail[1]: q1: AUTH failure (LOGIN): authentication failure, "
            "user=a, relay=[192.0.2.99], relay=[203.0.113.3]",
            "203.0.113.3",
        ),
        (
            "Feb  1 10:00:00 mx imapd: LOGIN FAILED, user=a, ip=[192.0.2.99], ip=[203.0.113.4]",
            "203.0.113.4",
        ),
        (
            "Feb  1 10:00:00 mx dovecot-auth: pam_unix(dovecot:auth): authentication failure; logname= uid=0 "
            "euid=0 tty=dovecot ruser=rhost=192.0.2.99 rhost=203.0.113.5",
            "203.0.113.5",
        ),
        (
            "2026-02-01 10:00:00 login authenticator failed for (a) [192.0.2.99]) [203.0.113.6]:123: 535 "
            "Incorrect authentication data",
            "203.0.113.6",
        ),
    ],
)
def test_client_chosen_text_cannot_move_the_blame(line: str, ip: str) -> None:
    events, rejected = parse([line])
    assert not rejected, rejected
    assert events[0]["outcome"] == Outcome.AUTH_FAILED
    assert events[0]["source_ip"] == ip


def test_keywords_in_client_text_cannot_hide_a_failure() -> None:
    # Each HELO or user name below holds another daemon's keyword; the line must still be read
    # by the pattern that fits it.
    lines = [
        "2026-02-01 10:00:00 login authenticator failed for (x authentication failed: y) [203.0.113.60]: 535 "
        "Incorrect authentication data (set_id=ann)",
        "Feb  1 10:00:01 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts): "
        "user=<a: badlogin: b AUTH failure (x) sasl_username=>, rip=203.0.113.61",
        "Feb  1 10:00:02 mx postfix/smtpd[1]: warning: unknown[203.0.113.62]: SASL LOGIN authentication failed: "
        "x: LOGIN, lost connection after AUTH -login",
    ]
    events, rejected = parse(lines)
    assert not rejected
    assert [(e["source_ip"], e["outcome"]) for e in events.values()] == [
        ("203.0.113.60", Outcome.AUTH_FAILED),
        ("203.0.113.61", Outcome.AUTH_FAILED),
        ("203.0.113.62", Outcome.AUTH_FAILED),
    ]


def test_pam_unix_outside_mail_services_is_not_ours() -> None:
    events, rejected = parse(
        ["Feb  1 10:00:00 mx sshd[9]: pam_unix(sshd:auth): authentication failure; rhost=203.0.113.9 user=root"]
    )
    assert not events
    assert rejected[0] == "not a mail authentication event"


def test_pam_unix_rhost_that_is_a_name_gives_no_address() -> None:
    events, _ = parse(
        ["Feb  1 10:00:00 mx auth: pam_unix(imap:auth): authentication failure; rhost=client.example.net user=ann"]
    )
    assert events[0]["source_ip"] is None
    assert (events[0]["account"], events[0]["service"]) == ("ann", "imap")


def test_exim_auth_plain_initial_response_never_reaches_the_event() -> None:
    secret = "Sup3r-Secret!"
    response = base64.b64encode(f"\0bob@example.com\0{secret}".encode()).decode()
    login = base64.b64encode(b"carol").decode()
    lines = [
        f'2026-02-01 10:00:00 SMTP protocol error in "AUTH PLAIN {response}" H=(x) [203.0.113.20]:5000 '
        "I=[192.0.2.1]:25 AUTH command used when not advertised",
        f'2026-02-01 10:00:01 SMTP protocol error in "AUTH LOGIN {login}" H=(x) [203.0.113.21] '
        "AUTH command used when not advertised",
    ]
    events, rejected = parse(lines)
    assert not rejected
    assert (events[0]["account"], events[0]["method"], events[0]["flags"]) == (
        "bob@example.com",
        "PLAIN",
        Flag.PASSWORD_LOGGED,
    )
    assert (events[1]["account"], events[1]["flags"]) == ("carol", None)
    for event in events.values():
        assert all(secret not in str(value) for value in event.values())


def test_dovecot_logged_password_appears_nowhere() -> None:
    secret = "Winter2026!x"
    lines = [
        "Feb  1 10:00:00 auth(ann,203.0.113.30,sasl:plain)<s1>: Info: sql: Password mismatch "
        f"(given password: {secret})",
        "Feb  1 10:00:01 auth-worker(ann,203.0.113.30)<1><s1>: request [3]: Info: sql: Password mismatch "
        f"(given password: {secret})",
        f"Feb  1 10:00:02 auth(ann,203.0.113.30,sasl:plain)<s1>: Info: sql: lookup failed (given password: {secret})",
    ]
    batch = SmtpAuthParser(ParseContext(reference_time=datetime(2026, 3, 1, tzinfo=UTC))).parse(lines)
    assert secret not in json.dumps(batch.events.to_dicts(), default=str)
    assert secret not in json.dumps(batch.rejected)
    flags = batch.events.sort("row")["flags"].to_list()
    assert flags == [Flag.PASSWORD_LOGGED, Flag.PASSWORD_LOGGED]
    assert dict(batch.rejected) == {2: "not an authentication event"}


def test_outcomes_for_non_credential_failures() -> None:
    lines = [
        "Feb  1 10:00:00 mx cyrus/imap[1]: badlogin: h [203.0.113.40] NTLM [SASL(-4): no mechanism available]",
        '2026-02-01 10:00:00 SMTP protocol error in "AUTH NTLM" H=(x) [203.0.113.41] '
        "NTLM authentication mechanism not supported",
    ]
    events, _ = parse(lines)
    assert [events[0]["outcome"], events[1]["outcome"]] == [Outcome.CLIENT_ERROR, Outcome.CLIENT_ERROR]


# --------------------------------------------------------------------------- sniffing


def test_sniff_recognises_mail_logs_and_not_access_logs() -> None:
    mail = [
        postfix_failure("Feb  1 10:00:00"),
        "Feb  1 10:00:01 mx postfix/smtpd[1]: connect from unknown[192.0.2.1]",
        "Feb  1 10:00:02 mx dovecot: imap-login: Login: user=<a>, method=PLAIN, rip=192.0.2.2, lip=192.0.2.1",
        "2026-02-01 10:00:00 1vAbCd-000Efg-Hi <= a@example.com H=(x) [192.0.2.3] P=esmtpsa S=100",
        "@40000000695b7d9a1dcd6500 pop3-login: Info: Aborted login (auth failed, 1 attempts): rip=192.0.2.4",
    ]
    access = [
        '192.0.2.1 - - [01/Feb/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 12 "-" "curl/8"',
        '{"time": "2026-02-01T10:00:00Z", "client_ip": "192.0.2.1", "status": 200}',
        "Feb  1 10:00:00 host CRON[2]: (root) CMD (true)",
    ]
    assert SmtpAuthParser.sniff(mail) == 1.0
    assert SmtpAuthParser.sniff(access) == 0.0
    assert SmtpAuthParser.sniff(mail[:2] + access[:2]) == 0.5
    assert SmtpAuthParser.sniff([]) == 0.0


# --------------------------------------------------------------------------- vectorised, batch-independent


def _golden_cases() -> list[Path]:
    # The autumn case is order-dependent by design (the repeated hour is read from the sequence).
    return sorted(p for p in GOLDEN.iterdir() if (p / "input.log").exists() and "autumn" not in p.name)


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda p: p.name)
def test_each_line_parses_the_same_alone_and_in_a_batch(case: Path) -> None:
    overrides = json.loads((case / "context.json").read_text()) if (case / "context.json").exists() else {}
    if "reference_time" in overrides:
        overrides["reference_time"] = datetime.fromisoformat(overrides["reference_time"])
    ctx = ParseContext(**overrides)
    lines = (case / "input.log").read_text().splitlines()
    together = SmtpAuthParser(ctx).parse(lines)
    batch_events = {r["row"]: r for r in together.events.to_dicts()}
    for row, line in enumerate(lines):
        alone = SmtpAuthParser(ctx).parse([line])
        if alone.rejected:
            assert dict(together.rejected)[row] == alone.rejected[0][1]
        else:
            single = alone.events.to_dicts()[0]
            single["row"] = row
            assert batch_events[row] == single


def test_common_shapes_never_take_the_per_line_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = smtp_auth_module._fallback_line
    monkeypatch.setattr(smtp_auth_module, "_fallback_line", lambda rest: calls.append(rest) or original(rest))
    shapes = [
        postfix_failure("Feb  1 10:00:00"),
        "Feb  1 10:00:01 mx postfix/smtpd[2]: Q1: client=x[198.51.100.2], sasl_method=PLAIN, sasl_username=ann",
        "Feb  1 10:00:02 mx postfix/smtpd[2]: lost connection after AUTH from x[198.51.100.3]",
        "Feb  1 10:00:03 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts): user=<a>, rip=198.51.100.4",
        "Feb  1 10:00:04 mx dovecot: auth-worker(9): pam(a,198.51.100.5): unknown user",
        "2026-02-01 10:00:05 login authenticator failed for (x) [198.51.100.6]: 535 Incorrect authentication data",
        "Feb  1 10:00:06 mx imapd: LOGIN FAILED, user=a, ip=[::ffff:198.51.100.7]",
        "Feb  1 10:00:07 mx imapd[3]: badlogin: h [198.51.100.8] PLAIN [SASL(-13): authentication failure]",
        "Feb  1 10:00:08 mx sendmail[4]: q: AUTH failure (LOGIN): authentication failure, relay=[198.51.100.9]",
        "Feb  1 10:00:09 mx postfix/smtpd[2]: NOQUEUE: reject: RCPT from x[198.51.100.10]: 554 Relay access denied",
    ]
    repeat = 2_000
    lines = shapes * repeat
    started = time.perf_counter()
    events, rejected = parse(lines)
    elapsed = time.perf_counter() - started
    assert calls == []
    assert len(rejected) == repeat  # only the NOQUEUE line, once per repetition
    outcomes = pl.Series([e["outcome"] for e in events.values()]).value_counts().sort("")
    assert dict(outcomes.iter_rows()) == {
        Outcome.AUTH_FAILED.value: 7 * repeat,
        Outcome.OK.value: repeat,
        Outcome.CLIENT_ERROR.value: repeat,
    }
    assert elapsed < 3.0, f"{len(lines)} lines took {elapsed:.2f}s"


# --------------------------------------------------------------------------- robustness

_SEED_LINES = [
    postfix_failure("Feb  1 10:00:00"),
    "Mar  3 11:20:31 imap1 dovecot: imap-login: Disconnected (auth failed, 3 attempts): user=<c>, rip=198.51.100.61",
    "2026-01-05 10:00:00 login authenticator failed for (x) [203.0.113.50]:5 I=[192.0.2.1]:587: 535 x (set_id=s)",
    "<38>1 2026-01-05T09:00:05Z mx1 dovecot 812 - [a b=\"c\"] imap-login: Login: user=<k>, rip=203.0.113.94",
    "@40000000695b7d9a1dcd6500 dovecot-auth: pam_unix(dovecot:auth): authentication failure; rhost=1.2.3.4",
    "Feb 24 14:00:00 server sendmail[26592]: u0CB32qX026592: [192.0.2.1]: possible SMTP attack: command=AUTH, count=5",
    '2026-02-01 10:00:00 SMTP protocol error in "AUTH PLAIN AGEAYg==" H=(x) [203.0.113.20] '
    "AUTH command used when not advertised",
]


@st.composite
def hostile_lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["text", "binary", "mutated", "huge", "spliced"]))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "binary":
        return draw(st.binary(max_size=300)).decode("utf-8", "backslashreplace")
    if kind == "huge":
        return draw(st.sampled_from(_SEED_LINES)) + "A" * draw(st.integers(MAX_LINE_CHARS - 200, MAX_LINE_CHARS + 10))
    seed = draw(st.sampled_from(_SEED_LINES))
    if kind == "spliced":
        return seed + draw(st.sampled_from(["\n", "\r", "\x00", "\udc80", "\ufeff", "]", "[", ")", "<", ""])) + seed
    # Mutate: replace a slice of the seed line with random text.
    start = draw(st.integers(0, len(seed)))
    end = draw(st.integers(start, len(seed)))
    return seed[:start] + draw(st.text(max_size=20)) + seed[end:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(hostile_lines(), min_size=1, max_size=12), tz=st.sampled_from(["UTC", "Europe/Berlin"]))
def test_any_input_becomes_exactly_one_event_or_reject(lines: list[str], tz: str) -> None:
    ctx = ParseContext(timezone=tz, reference_time=datetime(2026, 3, 1, tzinfo=UTC) + timedelta(days=len(lines)))
    batch = SmtpAuthParser(ctx).parse(lines)
    event_rows = batch.events["row"].to_list()
    rejected_rows = [row for row, _ in batch.rejected]
    assert sorted(event_rows + rejected_rows) == list(range(len(lines)))
    assert all(isinstance(reason, str) and reason for _, reason in batch.rejected)
    assert dict(batch.events.schema) == event_frame_schema()
    assert batch.events["outcome"].null_count() == 0
    assert batch.events["ts"].null_count() == 0


def test_non_text_and_oversized_entries_are_rejected_not_raised() -> None:
    lines: list[object] = [postfix_failure("Feb  1 10:00:00"), None, 42, "x" * (MAX_LINE_CHARS + 1), "\udcff bad"]
    parser = SmtpAuthParser(ParseContext(reference_time=datetime(2026, 3, 1, tzinfo=UTC)))
    batch = parser.parse(lines)  # type: ignore[arg-type]
    reasons = dict(batch.rejected)
    assert batch.events["row"].to_list() == [0]
    assert reasons[1] == reasons[2] == "line is not text"
    assert reasons[3].startswith("line longer than")
    assert reasons[4] == "no recognised timestamp"


def test_per_line_fallback_stays_fast_on_crafted_lines() -> None:
    # Shapes the per-line fallback handles, stuffed with the separators its patterns look for.
    width = smtp_auth_module.FALLBACK_MAX_CHARS
    crafted = [
        ('2026-02-01 10:00:00 SMTP protocol error in "' + '" H= [' * width)[:width],
        ("2026-02-01 10:00:00 1vAbCd-000Efg-Hi <= " + " H=(x) [1.2.3.4] A=" * width)[:width],
        ("Feb  1 10:00:00 h auth: pam_unix(dovecot:auth): authentication failure;" + " rhost=" * width)[:width],
        ("Feb  1 10:00:00 h sm-mta[1]: q: AUTH=server, relay=[1.2.3.4], authid=" + ", mech=x" * width)[:width],
    ]
    started = time.perf_counter()
    events, rejected = parse(crafted * 25)
    assert time.perf_counter() - started < 2.0
    assert len(events) + len(rejected) == 100
    # Past the fallback's length limit the same hint is simply not an authentication event.
    too_long = "Feb  1 10:00:00 h auth: pam_unix(dovecot:auth): authentication failure; rhost=1.2.3.4 " + "x" * width
    _, rejected = parse([too_long])
    assert rejected[0] == "not an authentication event"


def test_empty_batch() -> None:
    batch = SmtpAuthParser(ParseContext()).parse([])
    assert batch.events.height == 0 and batch.rejected == []
