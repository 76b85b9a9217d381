"""Golden tests: each folder under tests/golden/parsers/<format>/<case>/ pins a parser's output."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.parsers import PARSERS, ParseContext, _load_builtin
from pipeline.privacy import fingerprint

GOLDEN = Path(__file__).parent / "golden" / "parsers"
CASES = sorted(p for p in GOLDEN.glob("*/*") if (p / "input.log").exists())


def _context(case: Path) -> ParseContext:
    overrides = {}
    if (case / "context.json").exists():
        overrides = json.loads((case / "context.json").read_text())
    if "reference_time" in overrides:
        overrides["reference_time"] = datetime.fromisoformat(overrides["reference_time"])
    return ParseContext(**overrides)


def _read_lines(path: Path) -> list[str]:
    # The same splitting rule as the file source: \n, \r\n and bare \r end a line.
    raw = path.read_bytes().decode("utf-8", "backslashreplace")
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _expected_value(column: str, value, ctx: ParseContext):
    if column == "api_key_id" and isinstance(value, dict) and "fingerprint_of" in value:
        return fingerprint(value["fingerprint_of"], ctx.pepper)
    return value


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_golden_parser_case(case: Path) -> None:
    _load_builtin()
    parser_name = case.parent.name
    assert parser_name in PARSERS, f"no parser registered as {parser_name!r}"
    ctx = _context(case)
    lines = _read_lines(case / "input.log")
    expected = [json.loads(l) for l in (case / "expected.jsonl").read_text().splitlines() if l.strip()]
    assert len(expected) == len(lines), "expected.jsonl needs one object per input line"

    batch = PARSERS[parser_name](ctx).parse(lines)
    events = {row["row"]: row for row in batch.events.to_dicts()}
    rejected = dict(batch.rejected)
    assert set(events) | set(rejected) == set(range(len(lines)))
    assert not set(events) & set(rejected)

    for row, want in enumerate(expected):
        if "rejected" in want:
            assert row in rejected, f"line {row + 1} should be rejected, got event {events.get(row)}"
            assert want["rejected"] in rejected[row], f"line {row + 1}: reason {rejected[row]!r}"
            continue
        assert row in events, f"line {row + 1} rejected: {rejected.get(row)}"
        got = events[row]
        for column, value in want.items():
            value = _expected_value(column, value, ctx)
            actual = got[column]
            if column == "ts" and actual is not None:
                actual = actual.isoformat()
            assert actual == value, f"line {row + 1} column {column}: {actual!r} != {value!r}"
