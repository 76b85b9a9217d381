"""The smtp-auth parser against fail2ban's labelled sample lines: every labelled failure found, no false alarm."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pipeline.parsers.base import ParseContext
from pipeline.parsers.smtp_auth import SmtpAuthParser
from pipeline.schema import Outcome

# fail2ban sample files and the filter modes whose sections are about authentication failures.
# A filter's sections are selected by `# filterOptions:` lines; a section without one, or an
# option set without "mode", uses the filter's default mode. Postfix's default mode ("more")
# covers rejects and spam; only its "auth" sections are credential failures. The others' default
# is "normal"; their "more"/"aggressive" sections add protocol errors and connection aborts,
# which are not authentication failures and are left out.
IN_SCOPE_MODES: dict[str, set[str]] = {
    "postfix": {"auth"},
    "dovecot": {"normal"},
    "exim": {"normal"},
    "courier-auth": {"normal"},
    "cyrus-imap": {"normal"},
    "sendmail-auth": {"normal"},
}
DEFAULT_MODE = {"postfix": "more"}

# Lines in scope on which we deliberately disagree with fail2ban's label, with the reason.
# The test fails if this list holds a line we actually agree on, so it cannot go stale.
EXCLUSIONS: dict[tuple[str, str], str] = {}

_DIRECTIVE = re.compile(r"^#+ ?(failJSON|filterOptions|fileOptions|addFILE):(.*)$")
_LABEL_TIME = re.compile(r"^([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})T([0-9]{1,2}):([0-9]{2}):([0-9]{2})")


@dataclass
class Labelled:
    line_no: int
    text: str
    label: dict[str, Any]
    modes: set[str]


def _json_with_continuation(first: str, following: list[str]) -> tuple[Any, int]:
    """Parse a directive's JSON; a value may continue on the next comment lines."""
    payload = first
    for used in range(len(following) + 1):
        try:
            return json.loads(payload), used
        except json.JSONDecodeError:
            if used == len(following) or not following[used].startswith("#"):
                raise
            payload += "\n" + following[used].lstrip("#")
    raise AssertionError("unreachable")


def _modes(options: Any, default: str) -> set[str]:
    entries = options if isinstance(options, list) else [options]
    return {str(entry.get("mode", default)) if isinstance(entry, dict) else default for entry in entries}


def read_labelled(path: Path) -> list[Labelled]:
    """Each log line with the `# failJSON:` label before it and the modes of its section."""
    default = DEFAULT_MODE.get(path.name, "normal")
    lines = path.read_bytes().decode("utf-8", "backslashreplace").splitlines()
    modes = {default}
    pending: dict[str, Any] | None = None
    result: list[Labelled] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        directive = _DIRECTIVE.match(line)
        if directive:
            value, used = _json_with_continuation(directive.group(2), lines[index + 1 :])
            index += used
            if directive.group(1) == "failJSON":
                pending = value
            elif directive.group(1) == "filterOptions":
                modes = _modes(value, default)
        elif line.strip() and not line.startswith("#"):
            if pending is not None:
                result.append(Labelled(index + 1, line, pending, modes))
            pending = None
        index += 1
    return result


def _wall_clock(label_time: str) -> tuple[int, ...] | None:
    m = _LABEL_TIME.match(label_time)
    return tuple(int(g) for g in m.groups()) if m else None


@pytest.mark.parametrize("name", sorted(IN_SCOPE_MODES))
def test_fail2ban_labels_agree(shared_data: Path, name: str) -> None:
    path = shared_data / "fail2ban" / name
    labelled = read_labelled(path)
    assert labelled, f"no labelled lines read from {path}"
    in_scope = [item for item in labelled if item.modes & IN_SCOPE_MODES[name]]
    assert in_scope, f"no section of {name} is in scope"

    # Syslog lines carry no year; fail2ban's own samples span 2004-2005.
    ctx = ParseContext(reference_time=datetime(2005, 12, 31, tzinfo=timezone.utc), timezone="UTC")
    batch = SmtpAuthParser(ctx).parse([item.text for item in labelled])
    events = {row["row"]: row for row in batch.events.to_dicts()}
    rejected = dict(batch.rejected)
    assert set(events) | set(rejected) == set(range(len(labelled)))

    disagreements: dict[str, str] = {}
    wrong_times: list[str] = []
    for row, item in enumerate(labelled):
        if item not in in_scope:
            continue
        event = events.get(row)
        failed = event is not None and event["outcome"] == Outcome.AUTH_FAILED
        if item.label.get("match"):
            if not failed:
                got = f"event {event['outcome']}" if event else f"rejected: {rejected[row]}"
                disagreements[item.text] = f"line {item.line_no}: labelled failure, got {got}"
            elif event["source_ip"] != item.label["host"]:
                disagreements[item.text] = (
                    f"line {item.line_no}: source_ip {event['source_ip']} != labelled {item.label['host']}"
                )
            elif "time" in item.label and not item.text.startswith("@"):
                # fail2ban's years for syslog lines come from its own test clock, so compare the
                # wall-clock parts; TAI64N lines are converted by a different convention there.
                want = _wall_clock(item.label["time"])
                ts = event["ts"]
                got_clock = (ts.year, ts.month, ts.day, ts.hour, ts.minute, ts.second)
                if item.text[:1].isdigit():
                    ok = want == got_clock
                else:
                    ok = want is not None and want[1:] == got_clock[1:]
                if not ok:
                    wrong_times.append(f"line {item.line_no}: {ts.isoformat()} vs label {item.label['time']}")
        elif failed:
            disagreements[item.text] = f"line {item.line_no}: labelled no-match, got auth_failed"

    excluded = {text for (file, text) in EXCLUSIONS if file == name}
    agreeing = len(in_scope) - len(disagreements)
    positives = [item for item in in_scope if item.label.get("match")]
    negatives = [item for item in in_scope if not item.label.get("match")]
    found = sum(1 for item in positives if item.text not in disagreements)
    clear = sum(1 for item in negatives if item.text not in disagreements)
    print(
        f"\nfail2ban/{name}: {agreeing}/{len(in_scope)} in-scope labelled lines agree "
        f"({100 * agreeing / len(in_scope):.1f}%): {found}/{len(positives)} failures found with the "
        f"labelled IP, {clear}/{len(negatives)} non-failures kept clear; {len(excluded)} exclusion(s); "
        f"{len(labelled) - len(in_scope)} out-of-scope lines parsed too"
    )
    unexplained = {text: why for text, why in disagreements.items() if text not in excluded}
    stale = excluded - set(disagreements)
    assert not unexplained, "disagreements with fail2ban:\n" + "\n".join(unexplained.values())
    assert not stale, "exclusions that now agree (remove them):\n" + "\n".join(sorted(stale))
    assert not wrong_times, "timestamps differ from the labels:\n" + "\n".join(wrong_times)


def test_label_reader_handles_sections_multiline_and_escapes(tmp_path: Path) -> None:
    sample = tmp_path / "postfix"
    sample.write_bytes(
        b'# failJSON: { "match": true, "host": "192.0.2.1" }\n'
        b"Jan  1 00:00:01 h postfix/smtpd[1]: first\n"
        b'# filterOptions: [{"mode": "auth"}, {"mode": "aggressive"}]\n'
        b'# failJSON: { "match": false,\n'
        b'#   "desc": "split over \\"two\\" lines\\n" }\n'
        b"Jan  1 00:00:02 h postfix/smtpd[1]: second \xff\n"
        b"Jan  1 00:00:03 h postfix/smtpd[1]: unlabelled\n"
        b"# filterOptions: {}\n"
        b'# failJSON: { "match": true, "host": "192.0.2.3" }\n'
        b"Jan  1 00:00:04 h postfix/smtpd[1]: fourth\n"
    )
    got = read_labelled(sample)
    assert [(g.line_no, g.label.get("match"), g.modes) for g in got] == [
        (2, True, {"more"}),
        (6, False, {"auth", "aggressive"}),
        (10, True, {"more"}),
    ]
    assert got[1].label["desc"] == 'split over "two" lines\n'
    assert got[1].text.endswith("second \\xff")
