"""POST /ingest: same parsing, quarantine and idempotency as files; shipper body shapes; limits."""

from __future__ import annotations

import gzip
import json

import pytest

from api.queries import EventQuery
from api.push import PushError, batch_source, gunzip, parse_body, split_lines
from pipeline.schema import event_ids
from pipeline.store import events

# mailapi JSON access log lines (the json parser's default mapping), one of them broken.
LINES = [
    json.dumps({"time": "2026-11-30T14:03:11.123Z", "client_ip": "203.0.113.9", "method": "POST",
                "path": "/v3/mail/send", "status": 202, "api_key": "mk_live_one", "account": "acct_1"}),
    "this is not JSON",
    json.dumps({"time": "2026-11-30T14:03:12Z", "client_ip": "203.0.113.10", "method": "POST",
                "path": "/v3/mail/send", "status": 401, "api_key": "mk_live_guess", "account": "acct_1"}),
    json.dumps({"time": "2026-11-30T14:03:13Z", "client_ip": "2001:db8::1", "method": "GET",
                "path": "/v3/stats", "status": 200, "account": "acct_2"}),
]
BODY = "\n".join(LINES) + "\n"


def _stored_ids(api) -> list[str]:
    with api.store.engine.connect() as conn:
        return sorted(r[0] for r in conn.execute(events.select().with_only_columns(events.c.event_id)))


def test_same_batch_id_twice_stores_once_and_quarantines_bad_lines(api) -> None:
    headers = {**api.key("ingest", name="vector"), "Content-Type": "text/plain"}
    first = api.client.post("/ingest?format=json&batch_id=host1-000042", headers=headers, content=BODY)
    assert first.status_code == 200, first.text
    result = first.json()
    assert (result["lines"], result["stored"], result["duplicates"], result["quarantined"]) == (4, 3, 0, 1)
    assert result["format"] == "json" and result["batch_id"] == "host1-000042"
    assert sum(result["reasons"].values()) == 1

    again = api.client.post("/ingest?format=json&batch_id=host1-000042", headers=headers, content=BODY).json()
    assert (again["stored"], again["duplicates"]) == (0, 3)
    assert api.store.count_events() == 3
    assert api.store.count_quarantine() == 1

    # Event ids: a key derived from the batch id (within the calling key), plus the line index.
    key_id = api.state.keys.list()[0]["key_id"]
    source_key, _ = batch_source("host1-000042", key_id, LINES)
    assert _stored_ids(api) == sorted(event_ids(source_key, [0, 2, 3]))
    rows = api.state.queries.search_events(EventQuery(), limit=10).items
    assert {r["origin"] for r in rows} == {"push:host1-000042:0", "push:host1-000042:2", "push:host1-000042:3"}
    assert all(r["api_key_id"] != "mk_live_one" for r in rows)  # keys are fingerprinted, as from files

    # The same batch id from another shipper's key is another batch.
    other = {**api.key("ingest", name="fluentbit"), "Content-Type": "text/plain"}
    from_other = api.client.post("/ingest?format=json&batch_id=host1-000042", headers=other, content=BODY).json()
    assert from_other["stored"] == 3


def test_without_batch_id_the_lines_are_the_identity(api) -> None:
    key = api.key("ingest")
    plain = api.client.post("/ingest?format=json", headers={**key, "Content-Type": "text/plain"}, content=BODY).json()
    assert plain["stored"] == 3 and plain["batch_id"].startswith("sha256:")
    # The same lines as a JSON array (Fluent Bit style records) and gzip-compressed: no new events.
    records = [{"date": 1, "log": line} for line in LINES]
    as_json = api.client.post("/ingest?format=json", headers={**key, "Content-Type": "application/json"},
                              json=records).json()
    assert (as_json["stored"], as_json["duplicates"], as_json["batch_id"]) == (0, 3, plain["batch_id"])
    zipped = api.client.post(
        "/ingest?format=json", content=gzip.compress(BODY.encode()),
        headers={**key, "Content-Type": "text/plain", "Content-Encoding": "gzip"},
    ).json()
    assert zipped["duplicates"] == 3
    # Our own JSON form carries format and batch id in the body.
    own = api.client.post("/ingest", headers=key, json={"format": "json", "batch_id": "b-1", "lines": LINES[:1]}).json()
    assert (own["stored"], own["batch_id"], own["format"]) == (1, "b-1", "json")
    assert api.store.count_events() == 4


def test_auto_format_and_ndjson(api) -> None:
    key = api.key("ingest")
    # NDJSON where each record is the log line itself (no message field).
    result = api.client.post("/ingest", headers={**key, "Content-Type": "application/x-ndjson"}, content=BODY).json()
    assert result["format"] == "json"  # sniffed
    assert (result["stored"], result["quarantined"]) == (3, 1)
    unknown = api.client.post("/ingest?format=cobol", headers={**key, "Content-Type": "text/plain"}, content="x")
    assert unknown.status_code == 400 and "cobol" in unknown.json()["detail"]


def test_limits(sqlite_api) -> None:
    api = sqlite_api
    key = {**api.key("ingest"), "Content-Type": "text/plain"}
    limit = api.state.limits.max_ingest_bytes
    too_big = api.client.post("/ingest?format=json", headers=key, content=b"x" * (limit + 1))
    assert too_big.status_code == 413
    bomb = gzip.compress(b"\n" * (limit * 4))
    assert len(bomb) < limit
    inflated = api.client.post("/ingest?format=json", content=bomb, headers={**key, "Content-Encoding": "gzip"})
    assert inflated.status_code == 413
    too_many = "\n".join(["x"] * (api.state.limits.max_ingest_lines + 1))
    assert api.client.post("/ingest?format=json", headers=key, content=too_many).status_code == 413
    assert api.client.post("/ingest", headers={**key, "Content-Type": "image/png"}, content=b"x").status_code == 415
    bad_id = api.client.post("/ingest?format=json&batch_id=%01", headers=key, content=BODY)
    assert bad_id.status_code == 400
    # Other routes take small bodies only, refused before the key is even looked at.
    huge = api.client.post("/silences", headers=api.key("alerts:write"), content=b"{" + b" " * (2 << 20) + b"}")
    assert huge.status_code == 413
    assert api.store.count_events() == 0


def test_metrics_count_ingested_lines(sqlite_api) -> None:
    api = sqlite_api
    api.client.post("/ingest?format=json&batch_id=m1", headers={**api.key("ingest"), "Content-Type": "text/plain"},
                    content=BODY)
    text = api.client.get("/metrics", headers=api.key("metrics:read")).text
    assert 'mailwarden_ingest_lines_total{format="json"} 4' in text
    assert 'mailwarden_ingest_events_stored_total{format="json"} 3' in text
    assert 'mailwarden_ingest_quarantined_total{format="json"} 1' in text


@pytest.mark.parametrize(
    "text, lines",
    [("a\nb\n", ["a", "b"]), ("a\r\nb", ["a", "b"]), ("a\rb\r\n\nc", ["a", "b", "", "c"]), ("", []), ("\n", [""])],
)
def test_split_lines_like_the_file_sources(text, lines) -> None:
    assert split_lines(text) == lines


def test_body_shapes() -> None:
    records = b'["a", {"message": "b"}, {"log": "c\\nd"}, {"msg": "e"}, {"x": 1}]'
    assert parse_body(records, "application/json").lines == ["a", "b", "c", "d", "e", '{"x":1}']
    own = parse_body(b'{"format": "combined", "batch_id": "7", "lines": ["l1"]}', "application/json; charset=utf-8")
    assert (own.lines, own.fmt, own.batch_id) == (["l1"], "combined", "7")
    assert parse_body(b"caf\xc3\xa9 \xff\n", "text/plain").lines == ["café \\xff"]
    assert parse_body(b'{"message":"m"}\nnot json\n', "application/x-ndjson").lines == ["m", "not json"]
    # A lone surrogate from JSON cannot reach the database as such.
    assert parse_body(b'["\\ud800x"]', "application/json").lines == ["\\ud800x"]
    for body, ctype in ((b"{", "application/json"), (b'{"lines": "x"}', "application/json"), (b"5", "image/png")):
        with pytest.raises(PushError):
            parse_body(body, ctype)


def test_gunzip_refuses_garbage_and_truncation() -> None:
    data = gzip.compress(b"hello\n" * 100)
    assert gunzip(data, 10_000) == b"hello\n" * 100
    with pytest.raises(PushError) as cut:
        gunzip(data[:-12], 10_000)
    assert cut.value.status == 400
    with pytest.raises(PushError) as garbage:
        gunzip(b"not gzip at all", 10_000)
    assert garbage.value.status == 400
