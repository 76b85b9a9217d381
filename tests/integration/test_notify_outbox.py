"""The outbox against a real HTTP receiver on 127.0.0.1 and real stores (SQLite file and PostgreSQL).

Time is passed in: each run's `now` is the moment the previous one said the next attempt is due,
so retries and Retry-After are tested exactly, without sleeping.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, urlsplit

import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from pipeline.notify import delivery_log, load_routes, notify_once, outbox_rows
from pipeline.notify.outbox import DELIVERED, FAILED, PENDING, deliveries, outbox
from pipeline.notify.signing import dingtalk_verify_url, new_whsec, standard_webhooks_verify
from pipeline.schema import Alert, EntityKind, Severity
from pipeline.store import Store, alerts

T0 = datetime(2026, 11, 30, 14, 0, tzinfo=timezone.utc)
WHSEC = new_whsec(bytes(range(100, 132)))
# Credentials that must never show up in logs, tables or errors.
URL_TOKEN = "zT0pS3cretPathToken"
QUERY_TOKEN = "qK9accessTokenValue"
DING_SECRET = "SECd1ngSigningKey0042"


@pytest.fixture(scope="module")
def _server() -> Iterator[HTTPServer]:
    # One server for the module: stopping a werkzeug server takes half a second.
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def receiver(_server: HTTPServer) -> Iterator[HTTPServer]:
    _server.clear()
    yield _server
    _server.clear()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store.open(database_url)
    try:
        yield store
    finally:
        store.close()


def _alert(
    i: int = 0, severity: Severity = Severity.HIGH, detector: str = "auth_bruteforce", entity: str | None = None
) -> Alert:
    start = T0 - timedelta(minutes=10) + timedelta(seconds=i)
    who = entity or f"user{i}@example.com"
    return Alert(
        detector=detector,
        severity=severity,
        entity_kind=EntityKind.ACCOUNT,
        entity=who,
        window_start=start,
        window_end=start + timedelta(minutes=10),
        score=10.0 + i,
        title=f"Account {who}: {20 + i} failed logins in 10 min",
        evidence={"failures": 20 + i},
        mitre="T1110.001",
    )


def _routes(server_url: str, *specs: dict) -> list:
    env = {"HOOK_URL": server_url, "DING_SECRET": DING_SECRET, "WH_SECRET": WHSEC}
    return load_routes([{"url_env": "HOOK_URL", **spec} for spec in specs], env)


def _hook(server: HTTPServer) -> str:
    return server.url_for(f"/hook/{URL_TOKEN}") + f"?access_token={QUERY_TOKEN}"


def _counting_handler(answers: list[tuple[int, str, dict]]):
    """Answer from the list in order, then 200 forever; keeps every request body received."""
    lock = threading.Lock()
    seen: list[bytes] = []
    headers: list[dict[str, str]] = []

    def handler(request: Request) -> Response:
        with lock:
            seen.append(request.get_data())
            headers.append(dict(request.headers))
            index = len(seen) - 1
        status, body, extra = answers[index] if index < len(answers) else (200, "ok", {})
        return Response(body, status=status, headers=extra)

    handler.headers = headers  # type: ignore[attr-defined]
    return handler, seen


def _all_ids(bodies: list[bytes]) -> set[str]:
    """Alert ids named in DingTalk markdown bodies (each alert lists its "Alert id")."""
    ids = set()
    for body in bodies:
        for line in json.loads(body)["markdown"]["text"].splitlines():
            if line.startswith("- Alert id: "):
                ids.add(line.removeprefix("- Alert id: "))
    return ids


def _next_due(store: Store, route: str) -> datetime:
    rows = [r for r in outbox_rows(store, route) if r["status"] == PENDING]
    return min(r["next_attempt_at"] for r in rows)


def _delivered_alert_ids(bodies: list[bytes]) -> list[str]:
    ids = []
    for body in bodies:
        ids += [a["fingerprint"] for a in json.loads(body)["alerts"]]
    return ids


def test_receiver_answering_500_three_times_gets_the_alert_once_it_recovers(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([(500, "boom", {})] * 3)
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(_hook(receiver), {"name": "soc", "platform": "generic", "secret_env": "WH_SECRET"})
    alert = _alert()
    store.upsert_alerts([alert])

    now = T0
    waits = []
    for _ in range(3):
        summary = notify_once(store, routes, now)
        assert summary.alerts_delivered == 0 and summary.retrying == 1
        due = _next_due(store, "soc")
        waits.append((due - now).total_seconds())
        # Nothing is sent before the backoff elapses.
        assert notify_once(store, routes, due - timedelta(milliseconds=1)).messages_sent == 0
        now = due
    summary = notify_once(store, routes, now)
    assert summary.alerts_delivered == 1

    assert len(seen) == 4
    assert waits[0] < waits[1] < waits[2], "backoff grows"
    # The receiver processed exactly one successful request carrying the alert.
    (row,) = outbox_rows(store, "soc")
    assert (row["status"], row["attempts"]) == (DELIVERED, 4)
    assert _delivered_alert_ids([seen[-1]]) == [alert.alert_id]
    # What arrived is signed: the receiver verifies it with the shared whsec_ key.
    assert standard_webhooks_verify(WHSEC, handler.headers[-1], seen[-1], now_s=int(now.timestamp()))
    assert len({h["Webhook-Id"] for h in handler.headers}) == 1
    # Every attempt of the same message carries the same webhook-id (receivers can dedupe).
    log = delivery_log(store, "soc")
    assert [r["outcome"] for r in reversed(log)] == ["retry", "retry", "retry", "delivered"]
    assert [r["status_code"] for r in reversed(log)] == [500, 500, 500, 200]
    assert len({r["message_id"] for r in log}) == 1
    # Later runs within the repeat interval send nothing more.
    for later in (now + timedelta(minutes=1), now + timedelta(hours=1)):
        assert notify_once(store, routes, later).messages_sent == 0
    assert len(seen) == 4


def test_429_retry_after_is_honoured_to_the_second(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([(429, "rate_limited", {"Retry-After": "2"})])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(_hook(receiver), {"name": "slack-soc", "platform": "slack"})
    store.upsert_alerts([_alert()])

    notify_once(store, routes, T0)
    assert len(seen) == 1
    (row,) = outbox_rows(store, "slack-soc")
    assert row["next_attempt_at"] == T0 + timedelta(seconds=2)
    assert delivery_log(store, "slack-soc")[0]["retry_after"] == 2.0
    notify_once(store, routes, T0 + timedelta(seconds=1.9))
    assert len(seen) == 1, "nothing before Retry-After"
    summary = notify_once(store, routes, T0 + timedelta(seconds=2))
    assert summary.alerts_delivered == 1 and len(seen) == 2


def test_teams_throttle_reported_in_a_200_body_is_retried(store: Store, receiver: HTTPServer) -> None:
    throttled = "Webhook message delivery failed with error: Microsoft Teams endpoint returned HTTP error 429 (…)"
    handler, seen = _counting_handler([(200, throttled, {}), (200, throttled, {})])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(_hook(receiver), {"name": "teams", "platform": "teams"})
    store.upsert_alerts([_alert()])
    now = T0
    for _ in range(2):
        assert notify_once(store, routes, now).retrying == 1
        now = _next_due(store, "teams")
    assert notify_once(store, routes, now).alerts_delivered == 1
    assert len(seen) == 3
    assert [r["outcome"] for r in reversed(delivery_log(store, "teams"))] == ["retry", "retry", "delivered"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_receiver_down_for_a_minute_then_up_gets_every_alert_once(store: Store) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/hook/{URL_TOKEN}?access_token={QUERY_TOKEN}"
    routes = _routes(url, {"name": "ops", "platform": "generic", "group_by": ["..."]})
    batch = [_alert(i) for i in range(3)]
    store.upsert_alerts(batch)

    now, attempts = T0, 0
    while now < T0 + timedelta(seconds=60):
        summary = notify_once(store, routes, now)
        assert summary.alerts_delivered == 0
        attempts += 1
        now = _next_due(store, "ops")
    errors = {r["error"] for r in delivery_log(store, "ops")}
    assert all(e.startswith("ConnectError") for e in errors)
    assert attempts >= 3

    server = HTTPServer(host="127.0.0.1", port=port, threaded=True)
    handler, seen = _counting_handler([])
    server.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    server.start()
    try:
        for _ in range(3):  # one message per alert (group_by ...), within the rate limit
            notify_once(store, routes, now)
            pending = [r for r in outbox_rows(store, "ops") if r["status"] == PENDING]
            if not pending:
                break
            now = max(now, _next_due(store, "ops")) + timedelta(seconds=1)
    finally:
        server.clear()
        server.stop()
    assert sorted(_delivered_alert_ids(seen)) == sorted(a.alert_id for a in batch)
    assert {r["status"] for r in outbox_rows(store, "ops")} == {DELIVERED}


def test_at_most_once_per_route_per_alert_until_the_repeat_interval(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(
        _hook(receiver),
        {"name": "a", "platform": "generic", "repeat_interval": "4h"},
        {"name": "b", "platform": "generic", "repeat_interval": 0},
    )
    alert = _alert()
    store.upsert_alerts([alert])
    for minute in range(0, 60, 5):
        store.upsert_alerts([alert])  # the detector re-finds it every run
        notify_once(store, routes, T0 + timedelta(minutes=minute))
    # Two routes share one receiver: exactly one message each.
    assert len(seen) == 2
    assert _delivered_alert_ids(seen) == [alert.alert_id, alert.alert_id]
    # Still open four hours after delivery: route a repeats it once, route b never does.
    notify_once(store, routes, T0 + timedelta(hours=4, minutes=1))
    notify_once(store, routes, T0 + timedelta(hours=4, minutes=2))
    assert len(seen) == 3
    repeat = [r for r in outbox_rows(store) if r["seq"] == 1]
    assert [(r["route"], r["status"]) for r in repeat] == [("a", DELIVERED)]


def test_enqueue_is_idempotent_even_when_runs_overlap(store: Store, receiver: HTTPServer) -> None:
    from pipeline.notify.outbox import enqueue

    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_data("ok")
    routes = _routes(_hook(receiver), {"name": "a", "platform": "slack"})
    store.upsert_alerts([_alert(i) for i in range(5)])
    first = enqueue(store, routes, T0)
    second = enqueue(store, routes, T0 + timedelta(seconds=1))
    assert (first, second) == (5, 0)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one() == 5


def test_route_filters_by_severity_and_detector(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(
        _hook(receiver),
        {
            "name": "pager",
            "platform": "generic",
            "min_severity": "high",
            "detectors": ["auth_bruteforce", "credential_stuffing"],
            "group_by": [],
        },
        {
            "name": "all-but-bursts",
            "platform": "generic",
            "min_severity": "info",
            "exclude_detectors": ["ip_burst"],
            "group_by": [],
        },
    )
    wanted = _alert(0, Severity.CRITICAL)
    too_low = _alert(1, Severity.MEDIUM)
    other_detector = _alert(2, Severity.CRITICAL, detector="ip_burst")
    stuffing = _alert(3, Severity.HIGH, detector="credential_stuffing")
    store.upsert_alerts([wanted, too_low, other_detector, stuffing])
    notify_once(store, routes, T0)
    by_route = {}
    for body in seen:
        payload = json.loads(body)
        by_route[payload["receiver"]] = sorted(a["fingerprint"] for a in payload["alerts"])
    assert by_route["pager"] == sorted([wanted.alert_id, stuffing.alert_id])
    assert by_route["all-but-bursts"] == sorted([wanted.alert_id, too_low.alert_id, stuffing.alert_id])


def test_old_and_silenced_alerts_stay_out_of_chat(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(
        _hook(receiver), {"name": "soc", "platform": "generic", "max_alert_age": "1h", "group_by": ["..."]}
    )
    fresh, silenced_later = _alert(0), _alert(1)
    ancient = _alert(2)
    ancient.window_start, ancient.window_end = T0 - timedelta(days=3), T0 - timedelta(days=3) + timedelta(minutes=10)
    store.upsert_alerts([fresh, silenced_later, ancient])
    from pipeline.notify.outbox import enqueue

    assert enqueue(store, routes, T0) == 2
    with store.engine.begin() as conn:
        conn.execute(alerts.update().where(alerts.c.alert_id == silenced_later.alert_id).values(status="silenced"))
    summary = notify_once(store, routes, T0)
    assert summary.cancelled == 1
    assert _delivered_alert_ids(seen) == [fresh.alert_id]


def test_group_interval_holds_new_alerts_of_a_group_that_just_spoke(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(
        _hook(receiver), {"name": "soc", "platform": "generic", "group_by": ["detector"], "group_interval": "5m"}
    )
    first, second, other = _alert(0), _alert(1), _alert(2, detector="ip_burst")
    store.upsert_alerts([first])
    notify_once(store, routes, T0)
    store.upsert_alerts([second, other])
    notify_once(store, routes, T0 + timedelta(minutes=1))
    # ip_burst had not spoken: it goes now; the second brute-force alert waits for its group.
    assert [_delivered_alert_ids([b]) for b in seen] == [[first.alert_id], [other.alert_id]]
    assert _next_due(store, "soc") == T0 + timedelta(minutes=5)
    notify_once(store, routes, T0 + timedelta(minutes=4))
    assert len(seen) == 2
    notify_once(store, routes, T0 + timedelta(minutes=5))
    assert _delivered_alert_ids([seen[-1]]) == [second.alert_id]


def test_dingtalk_burst_of_30_is_folded_into_a_signed_digest(store: Store, receiver: HTTPServer) -> None:
    requests: list[tuple[str, bytes]] = []

    def handler(request: Request) -> Response:
        requests.append((request.url, request.get_data()))
        return Response('{"errcode":0,"errmsg":"ok"}', status=200, content_type="application/json")

    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(
        _hook(receiver), {"name": "ding", "platform": "dingtalk", "secret_env": "DING_SECRET", "group_by": ["..."]}
    )
    burst = [_alert(i) for i in range(30)]
    store.upsert_alerts(burst)
    summary = notify_once(store, routes, T0)

    assert summary.alerts_delivered == 30
    assert 1 <= len(requests) <= 3 and summary.digests >= 1
    url, body = requests[0]
    assert dingtalk_verify_url(url, DING_SECRET, now_ms=int(T0.timestamp() * 1000))
    assert dict(parse_qsl(urlsplit(url).query))["access_token"] == QUERY_TOKEN
    text = json.loads(body)["markdown"]["text"]
    assert text.startswith("### Digest: 30 alerts")
    assert "and 20 more alerts" in text
    assert {r["status"] for r in outbox_rows(store, "ding")} == {DELIVERED}
    (entry,) = delivery_log(store, "ding")
    assert entry["digest"] and entry["alert_count"] == 30


def test_dingtalk_rate_limit_holds_a_second_burst_instead_of_overrunning(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(
        _hook(receiver), {"name": "ding", "platform": "dingtalk", "group_by": ["..."], "group_interval": 0}
    )
    # Bursts of 8 every 20 s: more than DingTalk's 20 a minute if each went alone.
    sent_at: list[datetime] = []
    for wave in range(6):
        now = T0 + timedelta(seconds=20 * wave)
        store.upsert_alerts([_alert(100 * wave + i) for i in range(8)])
        before = len(seen)
        notify_once(store, routes, now)
        sent_at += [now] * (len(seen) - before)
    notify_once(store, routes, T0 + timedelta(minutes=3))
    worst = max(sum(1 for s in sent_at if t <= s < t + timedelta(seconds=60)) for t in sent_at)
    assert worst <= 20
    assert {r["status"] for r in outbox_rows(store, "ding")} == {DELIVERED}
    assert len(_all_ids(seen)) == 48


def test_non_retryable_answer_fails_without_retrying(store: Store, receiver: HTTPServer) -> None:
    handler, seen = _counting_handler([(404, "no_service", {})])
    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(handler)
    routes = _routes(_hook(receiver), {"name": "gone", "platform": "slack"})
    store.upsert_alerts([_alert()])
    assert notify_once(store, routes, T0).failed == 1
    assert notify_once(store, routes, T0 + timedelta(minutes=30)).messages_sent == 0
    assert len(seen) == 1
    (row,) = outbox_rows(store, "gone")
    assert row["status"] == FAILED and "404" in row["last_error"]


def test_undelivered_notifications_give_up_after_the_configured_time(store: Store) -> None:
    url = f"http://127.0.0.1:{_free_port()}/hook"
    routes = _routes(url, {"name": "down", "platform": "generic", "give_up_after": "2m"})
    store.upsert_alerts([_alert()])
    now = T0
    for _ in range(20):
        notify_once(store, routes, now)
        pending = [r for r in outbox_rows(store, "down") if r["status"] == PENDING]
        if not pending:
            break
        now = _next_due(store, "down")
    (row,) = outbox_rows(store, "down")
    assert row["status"] == FAILED
    assert now - T0 <= timedelta(minutes=3)


def test_secrets_never_reach_the_delivery_log_errors_or_logs(
    store: Store, receiver: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    def echo(request: Request) -> Response:
        # A hostile or sloppy receiver echoes the full URL back in its error body.
        return Response(f"bad request to {request.url} with {request.query_string.decode()}", status=500)

    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(echo)
    routes = _routes(_hook(receiver), {"name": "ding", "platform": "dingtalk", "secret_env": "DING_SECRET"})
    store.upsert_alerts([_alert()])
    with caplog.at_level(logging.DEBUG):
        summary = notify_once(store, routes, T0)
    down_url = f"http://127.0.0.1:{_free_port()}/hook/{URL_TOKEN}?access_token={QUERY_TOKEN}"
    closed = _routes(down_url, {"name": "down", "platform": "slack"})
    store.upsert_alerts([_alert(1)])
    with caplog.at_level(logging.DEBUG):
        summary_down = notify_once(store, closed, T0)

    with store.engine.connect() as conn:
        tables = [dict(r._mapping) for r in conn.execute(sa.select(deliveries))]
        tables += [dict(r._mapping) for r in conn.execute(sa.select(outbox))]
    # The receiver's own access log (werkzeug) naturally shows its URL; everything of ours must not.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("werkzeug"))
    assert "HTTP Request: POST http://127.0.0.1" in ours, "httpx did log the request, scrubbed"
    haystacks = [json.dumps(tables, default=str), ours, json.dumps(summary.errors), json.dumps(summary_down.errors)]
    assert summary.errors and summary_down.errors
    for text in haystacks:
        for secret in (URL_TOKEN, QUERY_TOKEN, DING_SECRET):
            assert secret not in text


def test_migration_creates_the_tables_the_code_declares(store: Store) -> None:
    inspector = sa.inspect(store.engine)
    for table in (outbox, deliveries):
        live = {c["name"] for c in inspector.get_columns(table.name)}
        assert live == {c.name for c in table.columns}, table.name
    assert "notify_buckets" in inspector.get_table_names()


def test_two_workers_draining_at_once_send_each_alert_once(database_url: str, receiver: HTTPServer) -> None:
    import time

    from pipeline.notify.outbox import NotifySummary, drain, enqueue
    from pipeline.notify.sender import make_client

    bodies: list[bytes] = []
    lock = threading.Lock()

    def slow(request: Request) -> Response:
        time.sleep(0.05)  # both workers are mid-send at the same time
        with lock:
            bodies.append(request.get_data())
        return Response("ok")

    receiver.expect_request(f"/hook/{URL_TOKEN}", method="POST").respond_with_handler(slow)
    routes = _routes(_hook(receiver), {"name": "ops", "platform": "generic", "group_by": ["..."]})
    setup = Store.open(database_url)
    batch = [_alert(i) for i in range(8)]
    setup.upsert_alerts(batch)
    enqueue(setup, routes, T0)
    setup.close()

    def worker() -> None:
        own = Store.open(database_url, upgrade=False)
        client = make_client()
        try:
            drain(own, routes, T0, client, NotifySummary())
        finally:
            client.close()
            own.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    ids = _delivered_alert_ids(bodies)
    assert sorted(ids) == sorted(a.alert_id for a in batch), "every alert once, none twice"
