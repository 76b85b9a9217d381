"""`mailwarden run` as a real process: followed log -> detect every 2 s -> signed chat messages on 127.0.0.1.

Each test starts the service with `python -m pipeline run` on a temporary store (a SQLite file and a
schema on the PostgreSQL test server), writes attack lines into the file it follows, and watches a
real HTTP receiver. Receivers verify signatures the way Feishu, DingTalk and Standard Webhooks
consumers do. The kill tests SIGKILL the process mid-detect and mid-delivery, start it again and
count what arrived.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from pipeline.notify.outbox import DELIVERED, deliveries, outbox
from pipeline.notify.signing import dingtalk_verify_url, feishu_verify, new_whsec, standard_webhooks_verify
from pipeline.store import Store, alerts, events

REPO = Path(__file__).resolve().parents[2]
FEISHU_SECRET = "feishuSigningKey-0042"
LARK_SECRET = "larkSigningKey-0077"
DING_SECRET = "SECdingSigningKey0099"
WHSEC = new_whsec(bytes(range(40, 72)))
ATTACKER = "203.0.113.66"
# auth_bruteforce fires at 20 failures in 10 minutes from one address (its default).
ATTACK_LINES = 30
START_TIMEOUT_S = 30.0


@dataclass
class Hit:
    path: str
    url: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the receiver got it
    status: int


@dataclass
class Receiver:
    """Records every request; answers from a per-path script (status, body, headers), then 200."""

    server: HTTPServer
    hits: list[Hit] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, str, dict[str, str]]]] = field(default_factory=dict)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return self.server.url_for(path)

    def handler(self, path: str, ok_body: str) -> Callable[[Request], Response]:
        def handle(request: Request) -> Response:
            arrived = time.monotonic()
            gate = self.hold.get(path)
            with self.lock:
                script = self.scripts.get(path) or []
                status, body, headers = script.pop(0) if script else (200, ok_body, {})
                self.hits.append(Hit(path, request.url, dict(request.headers), request.get_data(), arrived, status))
            if gate is not None:
                gate.wait(30)  # hold the answer: the sender is mid-delivery until the test lets go
            return Response(body, status=status, headers=headers, content_type="application/json")

        return handle

    def on(self, path: str, ok_body: str = '{"code":0,"errcode":0,"msg":"ok"}') -> None:
        self.server.expect_request(path, method="POST").respond_with_handler(self.handler(path, ok_body))

    def at(self, path: str, status: int | None = None) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path and (status is None or h.status == status)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    try:
        yield Receiver(server)
    finally:
        server.clear()
        server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


@dataclass
class Service:
    """One `mailwarden run` process with its config, environment and log."""

    workdir: Path
    database_url: str
    env: dict[str, str]
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None
    runs: int = 0

    @property
    def logfile(self) -> Path:
        return self.workdir / "api.log"

    def start(self) -> None:
        self.runs += 1
        out = open(self.workdir / f"service-{self.runs}.out", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--port", str(self.port), "--database-url", self.database_url],
            cwd=self.workdir,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service did not answer /health in {START_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("service-*.out")))

    def dump_stacks(self) -> None:
        """On a hang: SIGABRT makes faulthandler (PYTHONFAULTHANDLER) print every thread's stack."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(10)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def append(self, lines: list[str]) -> None:
        with open(self.logfile, "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()


def _routes_toml(routes: list[dict[str, Any]]) -> str:
    out = []
    for route in routes:
        out.append("[[routes]]")
        for key, value in route.items():
            out.append(f"{key} = {_toml_list(value) if isinstance(value, list) else json.dumps(value)}")
    return "\n".join(out)


def make_service(
    tmp_path: Path,
    database_url: str,
    routes: list[dict[str, Any]],
    urls: dict[str, str],
    notify_seconds: float = 1.0,
) -> Service:
    workdir = tmp_path / "svc"
    workdir.mkdir()
    (workdir / "api.log").touch()
    config = f"""
[[sources]]
paths = [{json.dumps(str(workdir / 'api.log'))}]
format = "json"

[schedule]
detect_seconds = 2
notify_seconds = {notify_seconds}

{_routes_toml(routes)}
"""
    (workdir / "mailwarden.toml").write_text(config)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MAILWARDEN_")
    } | {
        "MAILWARDEN_CONFIG": str(workdir / "mailwarden.toml"),
        "MAILWARDEN_PEPPER": "service-test-pepper",
        "PYTHONFAULTHANDLER": "1",
        "FEISHU_SECRET": FEISHU_SECRET,
        "LARK_SECRET": LARK_SECRET,
        "DING_SECRET": DING_SECRET,
        "WH_SECRET": WHSEC,
        **urls,
    }
    return Service(workdir, database_url, env)


def attack_lines(ip: str = ATTACKER, count: int = ATTACK_LINES, when: datetime | None = None) -> list[str]:
    """Mail-API JSON lines: one address presenting wrong API keys, a few per second, ending now."""
    end = when or datetime.now(timezone.utc)
    lines = []
    for i in range(count):
        ts = end - timedelta(milliseconds=200 * (count - 1 - i))
        lines.append(
            json.dumps(
                {
                    "time": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "client_ip": ip,
                    "method": "POST",
                    "path": "/v3/mail/send",
                    "status": 401,
                    "api_key": "sk_live_leaked_guess",
                    "account": "acct_1001",
                    "scheme": "https",
                    "user_agent": "curl/8.5.0",
                }
            )
        )
    return lines


def normal_lines(count: int = 20) -> list[str]:
    """Ordinary successful sends from several customers: nothing to alert on."""
    now = datetime.now(timezone.utc)
    return [
        json.dumps(
            {
                "time": (now - timedelta(seconds=count - i)).isoformat().replace("+00:00", "Z"),
                "client_ip": f"198.51.100.{10 + i % 5}",
                "method": "POST",
                "path": "/v3/mail/send",
                "status": 202,
                "api_key": f"sk_live_customer{i % 5}",
                "account": f"acct_{2000 + i % 5}",
                "scheme": "https",
                "recipients": 1,
            }
        )
        for i in range(count)
    ]


def wait_for(check: Callable[[], Any], timeout: float, what: str, service: Service | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ""
            if service is not None:
                service.dump_stacks()
                detail = f"\n--- service output ---\n{service.output()[:12000]}"
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(0.1)


def _alert_rows(database_url: str) -> list[dict[str, Any]]:
    store = Store.open(database_url, upgrade=False)
    try:
        with store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(alerts))]
    finally:
        store.close()


def _count(database_url: str, table: sa.Table, *where: Any) -> int:
    store = Store.open(database_url, upgrade=False)
    try:
        with store.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
    finally:
        store.close()


# ---- signed delivery --------------------------------------------------------------------------

SIGNED_ROUTES = [
    {"name": "feishu", "platform": "feishu", "url_env": "FEISHU_URL", "secret_env": "FEISHU_SECRET"},
    {"name": "lark", "platform": "lark", "url_env": "LARK_URL", "secret_env": "LARK_SECRET"},
    {"name": "dingtalk", "platform": "dingtalk", "url_env": "DING_URL", "secret_env": "DING_SECRET"},
    {"name": "generic", "platform": "generic", "url_env": "GENERIC_URL", "secret_env": "WH_SECRET"},
    # Unsigned, and failing for a while: 503, then 429, each with Retry-After, then it takes the message.
    {"name": "flaky", "platform": "generic", "url_env": "FLAKY_URL", "timeout": "2s"},
]


def _verify(route: str, hit: Hit, now_s: int) -> bool:
    if route in ("feishu", "lark"):
        payload = json.loads(hit.body)
        secret = FEISHU_SECRET if route == "feishu" else LARK_SECRET
        return feishu_verify(secret, payload["timestamp"], payload["sign"], now_s=now_s)
    if route == "dingtalk":
        return dingtalk_verify_url(hit.url, DING_SECRET, now_ms=now_s * 1000)
    return standard_webhooks_verify(WHSEC, hit.headers, hit.body, now_s=now_s)


def _wrong_key_fails(route: str, hit: Hit) -> bool:
    """The same check with another key must fail, or the verification above proves nothing."""
    if route in ("feishu", "lark"):
        payload = json.loads(hit.body)
        return not feishu_verify("not-the-key", payload["timestamp"], payload["sign"])
    if route == "dingtalk":
        return not dingtalk_verify_url(hit.url, "SECnot-the-key")
    return not standard_webhooks_verify(new_whsec(bytes(32)), hit.headers, hit.body)


@pytest.mark.slow
def test_attack_lines_reach_every_signed_chat_within_10_seconds(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    paths = {r["name"]: f"/hook/{r['name']}" for r in SIGNED_ROUTES}
    for path in paths.values():
        receiver.on(path)
    receiver.scripts[paths["flaky"]] = [
        (503, "upstream broke", {"Retry-After": "1"}),
        (429, "slow down", {"Retry-After": "1"}),
    ]
    urls = {r["url_env"]: receiver.url(paths[r["name"]]) for r in SIGNED_ROUTES}
    service = make_service(tmp_path, database_url, SIGNED_ROUTES, urls)
    service.start()
    try:
        service.append(normal_lines())
        # Normal traffic alone: a detect tick covers it and nobody is told anything.
        wait_for(lambda: _count(database_url, events) == 20, 10, "the normal lines to be stored", service)
        wait_for(lambda: _watermark_updated(database_url), 30, "a detect tick over them", service)
        time.sleep(0.5)  # the notify that follows the tick
        assert receiver.hits == [] and _count(database_url, alerts) == 0

        written = time.monotonic()
        service.append(attack_lines())
        signed = [r["name"] for r in SIGNED_ROUTES if "secret_env" in r]
        wait_for(lambda: all(receiver.at(paths[n]) for n in signed), 10, "a message on every signed route", service)
        now_s = int(time.time())
        for name in signed:
            (hit,) = receiver.at(paths[name])
            assert hit.at - written < 10.0, f"{name}: {hit.at - written:.1f} s from line to chat"
            assert _verify(name, hit, now_s), f"{name}: signature does not verify"
            assert _wrong_key_fails(name, hit), name
            assert ATTACKER in hit.body.decode(), f"{name}: the message names the attacking address"

        # The failing receiver gets it too once it recovers: three attempts, one message, one id.
        wait_for(lambda: receiver.at(paths["flaky"], 200), 10, "the flaky route to recover", service)
        flaky = receiver.at(paths["flaky"])
        assert [h.status for h in flaky] == [503, 429, 200]
        assert len({h.headers["Webhook-Id"] for h in flaky}) == 1
        # Retry-After counts from the tick that sent the request (its `now`), a few ms before the answer.
        assert flaky[1].at - flaky[0].at >= 0.9 and flaky[2].at - flaky[1].at >= 0.9, "Retry-After was honoured"
        # Only auth_bruteforce fired, on the attacker, and only the attacker.
        rows = _alert_rows(database_url)
        assert {(r["detector"], r["entity"]) for r in rows} == {("auth_bruteforce", ATTACKER)}
        generic = json.loads(receiver.at(paths["generic"])[0].body)
        assert [a["fingerprint"] for a in generic["alerts"]] == [rows[0]["alert_id"]]

        # A later tick re-finds the same alert: nobody hears of it twice.
        time.sleep(2.5)
        assert {n: len(receiver.at(p)) for n, p in paths.items()} == {
            "feishu": 1, "lark": 1, "dingtalk": 1, "generic": 1, "flaky": 3,
        }
        assert _count(database_url, outbox, outbox.c.status == DELIVERED) == len(SIGNED_ROUTES)
    finally:
        service.stop()
    assert service.proc.returncode == 0, service.output()
    assert "Traceback" not in service.output()


# ---- SIGKILL mid-detect and mid-delivery ------------------------------------------------------


def _watermark_updated(database_url: str) -> Any:
    from pipeline.store import job_state

    store = Store.open(database_url, upgrade=False)
    try:
        with store.engine.connect() as conn:
            return conn.execute(sa.select(job_state.c.updated_at).where(job_state.c.job == "detect")).scalar()
    finally:
        store.close()


class AlertsWriteLock:
    """Holds writes to the alerts table, so a detect tick that found something hangs in its write.

    PostgreSQL: LOCK TABLE alerts (reads go on; pg_stat_activity shows who waits). SQLite: the
    database's write lock (WAL readers go on; writers wait on their busy timeout).
    """

    def __init__(self, database_url: str):
        self.engine = sa.create_engine(database_url)
        self.conn = self.engine.connect()
        self.postgres = self.engine.dialect.name == "postgresql"
        if self.postgres:
            self.conn.execute(sa.text("LOCK TABLE alerts IN SHARE ROW EXCLUSIVE MODE"))
        else:
            self.conn.exec_driver_sql("BEGIN IMMEDIATE")

    def waiting_alert_writes(self) -> int:
        """PostgreSQL only: sessions blocked on a lock while writing alerts."""
        probe = self.engine.connect()
        try:
            return probe.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query ILIKE '%alerts%' AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        finally:
            probe.close()

    def release(self) -> None:
        self.conn.rollback() if self.postgres else self.conn.exec_driver_sql("ROLLBACK")
        self.conn.close()
        self.engine.dispose()


@pytest.mark.slow
def test_sigkill_mid_detect_and_mid_delivery_loses_and_duplicates_nothing(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    path = "/hook/soc"
    receiver.on(path)
    routes = [
        # A 1 s timeout keeps the claim lease of a killed send short (4 x timeout + 10 s).
        {"name": "soc", "platform": "generic", "url_env": "SOC_URL", "secret_env": "WH_SECRET", "timeout": "1s"}
    ]
    service = make_service(tmp_path, database_url, routes, {"SOC_URL": receiver.url(path)})
    service.start()
    try:
        service.append(normal_lines())
        first_tick = wait_for(lambda: _watermark_updated(database_url), 30, "a first detect tick", service)
        # Right after a tick: the next is ~2 s away, time enough to store the attack and lock.
        service.append(attack_lines())
        wait_for(lambda: _count(database_url, events) == 20 + ATTACK_LINES, 5, "the attack lines", service)
        lock = AlertsWriteLock(database_url)
        try:
            if lock.postgres:
                wait_for(lock.waiting_alert_writes, 10, "the detect tick to block writing its alert", service)
            else:
                time.sleep(3.0)  # a tick comes every 2 s; it finds the attack and waits for the lock
            assert _count(database_url, alerts) == 0
            service.kill()  # mid-detect: alerts found, not yet written, watermark not moved
        finally:
            lock.release()
        assert _watermark_updated(database_url) == first_tick, "the killed tick committed nothing"
        assert _count(database_url, alerts) == 0 and receiver.hits == []

        # Restart: the tick redoes the range from the watermark. This time the receiver holds its
        # answer and the service is killed while the request is in flight.
        gate = receiver.hold[path] = threading.Event()
        service.start()
        wait_for(lambda: receiver.at(path), 10, "the alert to be sent after the restart", service)
        service.kill()  # mid-delivery: the receiver has the request, the outbox has no answer
        gate.set()
        del receiver.hold[path]
        assert _count(database_url, deliveries) == 0, "the killed send recorded nothing"
        assert _count(database_url, outbox, outbox.c.status == DELIVERED) == 0

        service.start()
        wait_for(
            lambda: _count(database_url, outbox, outbox.c.status == DELIVERED) == 1,
            30,
            "the re-sent notification to be recorded as delivered",
            service,
        )
        time.sleep(2.5)  # another detect and notify tick: still nothing more
    finally:
        service.stop()
    assert service.proc.returncode == 0, service.output()

    rows = _alert_rows(database_url)
    assert [(r["detector"], r["entity"]) for r in rows] == [("auth_bruteforce", ATTACKER)]
    assert _count(database_url, events) == 20 + ATTACK_LINES, "the restarts re-read no line twice"
    hits = receiver.at(path)
    # Two requests (the one cut off by the kill, then the retry after the claim lease), one
    # message: the same webhook-id, so a receiver that did process the first drops the second.
    assert len(hits) == 2
    assert len({h.headers["Webhook-Id"] for h in hits}) == 1
    for hit in hits:
        assert [a["fingerprint"] for a in json.loads(hit.body)["alerts"]] == [rows[0]["alert_id"]]
        assert standard_webhooks_verify(WHSEC, hit.headers, hit.body)
    assert _count(database_url, deliveries) == 1
    assert _count(database_url, deliveries, deliveries.c.outcome == "delivered") == 1
