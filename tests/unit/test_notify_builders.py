"""Payload builders, signatures, routes, rate limits and response reading: pure, no network, no database."""

from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from pipeline.notify.builders import BUILDERS, build, view
from pipeline.notify.ratelimit import PLATFORM_LIMITS, DestinationLimiter, Limit, TokenBucket, plan_messages
from pipeline.notify.routes import load_routes, parse_duration
from pipeline.notify.sender import classify, parse_retry_after, redact
from pipeline.notify.signing import (
    dingtalk_sign,
    dingtalk_verify_url,
    feishu_sign,
    feishu_verify,
    new_whsec,
    standard_webhooks_verify,
)
from pipeline.schema import Alert, ConfigError, EntityKind, Severity

NOW = datetime(2026, 11, 30, 14, 0, 5, tzinfo=timezone.utc)
WHSEC = new_whsec(bytes(range(32)))
ENV = {
    "HOOK_URL": "https://hooks.example.test/services/T0001/B0002/sEcReTtOkEn123?access_token=tok987654",
    "FEISHU_SECRET": "feishu-signing-key-1",
    "DING_SECRET": "SECdingtalk-signing-key-2",
    "WH_SECRET": WHSEC,
}
# An attacker picks the account name they brute-force: it must not ping, link or inject markup.
HOSTILE = "<!channel> @everyone [click](https://evil.example) <at id=all></at>"


def _route(platform: str, **extra):
    spec = {"name": f"r-{platform}", "platform": platform, "url_env": "HOOK_URL", **extra}
    if platform in ("feishu", "lark") and "secret_env" not in extra:
        spec["secret_env"] = "FEISHU_SECRET"
    if platform == "dingtalk" and "secret_env" not in extra:
        spec["secret_env"] = "DING_SECRET"
    if platform == "generic" and "secret_env" not in extra:
        spec["secret_env"] = "WH_SECRET"
    return load_routes([spec], ENV)[0]


def _alert(
    i: int = 0, severity: Severity = Severity.HIGH, entity: str = "203.0.113.7", detector: str = "auth_bruteforce"
) -> Alert:
    start = datetime(2026, 11, 30, 13, 50, tzinfo=timezone.utc) + timedelta(minutes=i)
    return Alert(
        detector=detector,
        severity=severity,
        entity_kind=EntityKind.ACCOUNT,
        entity=entity,
        window_start=start,
        window_end=start + timedelta(minutes=10),
        score=20.0 + i,
        title=f"Account {entity}: {20 + i} failed logins in 10 min, usual 1",
        evidence={"failures": 20 + i, "baseline": 1.0, "ips": ["203.0.113.7", "203.0.113.8"]},
        mitre="T1110.001",
    )


def _flip_byte(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ---- one test per platform: shape, and for signed formats the signature verifies -------------
def test_slack_blocks_hold_the_alert_and_escape_mentions() -> None:
    route = _route("slack")
    url, headers, body = build([_alert(entity=HOSTILE)], route, NOW)
    payload = json.loads(body)
    assert url == ENV["HOOK_URL"]
    assert headers["Content-Type"].startswith("application/json")
    blocks = payload["blocks"]
    assert blocks[0]["type"] == "header" and len(blocks[0]["text"]["text"]) <= 150
    section = blocks[1]
    assert section["type"] == "section" and len(section["fields"]) <= 10
    mrkdwn = [payload["text"], section["text"]["text"]] + [f["text"] for f in section["fields"]]
    assert all("<!channel>" not in t and "<at " not in t for t in mrkdwn)
    assert any("&lt;!channel&gt;" in t for t in mrkdwn)
    assert any("*Detector*\nauth_bruteforce" == f["text"] for f in section["fields"])
    assert len(blocks) <= 50


def test_teams_posts_an_adaptive_card_message() -> None:
    route = _route("teams")
    _, _, body = build([_alert(entity=HOSTILE)], route, NOW)
    payload = json.loads(body)
    assert payload["type"] == "message"
    (attachment,) = payload["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    facts = card["body"][1]["items"][1]["facts"]
    assert {f["title"] for f in facts} >= {"Severity", "Detector", "Entity", "Window", "Score"}
    text = json.dumps(card, ensure_ascii=False)
    assert "[click](" not in text and "<!channel>" not in text
    assert len(body) < 28 * 1024


def test_feishu_card_is_signed_and_the_signature_verifies() -> None:
    route = _route("feishu")
    _, _, body = build([_alert(entity=HOSTILE)], route, NOW)
    payload = json.loads(body)
    assert payload["msg_type"] == "interactive"
    assert payload["timestamp"] == str(int(NOW.timestamp()))
    assert feishu_verify(ENV["FEISHU_SECRET"], payload["timestamp"], payload["sign"], now_s=int(NOW.timestamp()))
    # The sign matches only its own timestamp and key.
    assert not feishu_verify(ENV["FEISHU_SECRET"], int(payload["timestamp"]) + 1, payload["sign"])
    assert not feishu_verify("another-key", payload["timestamp"], payload["sign"])
    tampered = payload["sign"][:-2] + ("A" if payload["sign"][-2] != "A" else "B") + payload["sign"][-1]
    assert not feishu_verify(ENV["FEISHU_SECRET"], payload["timestamp"], tampered)
    # Stale by more than an hour: Feishu rejects it, so does the verifier.
    late = int(NOW.timestamp()) + 3601
    assert not feishu_verify(ENV["FEISHU_SECRET"], payload["timestamp"], payload["sign"], now_s=late)
    card = payload["card"]
    assert card["header"]["template"] == "orange"
    # Untrusted text only in plain_text: no lark_md, where "<at id=all>" would mention everyone.
    assert "lark_md" not in json.dumps(card)


def test_feishu_signature_is_keyed_by_timestamp_and_secret_over_an_empty_message() -> None:
    # Recomputed from the documented definition with the stdlib, independently of the module.
    import hashlib
    import hmac

    key = f"1599360473\n{ENV['FEISHU_SECRET']}".encode()
    expected = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
    assert feishu_sign(ENV["FEISHU_SECRET"], 1599360473) == expected


def test_lark_uses_the_feishu_format() -> None:
    assert BUILDERS["lark"] is BUILDERS["feishu"]
    _, _, body = build([_alert()], _route("lark"), NOW)
    assert json.loads(body)["msg_type"] == "interactive"


def test_dingtalk_url_is_signed_in_milliseconds_and_verifies() -> None:
    route = _route("dingtalk")
    url, _, body = build([_alert(entity=HOSTILE)], route, NOW)
    params = dict(parse_qsl(urlsplit(url).query))
    assert params["access_token"] == "tok987654"
    assert params["timestamp"] == str(int(NOW.timestamp() * 1000))
    assert dingtalk_verify_url(url, ENV["DING_SECRET"], now_ms=int(NOW.timestamp() * 1000))
    assert not dingtalk_verify_url(url, "SECwrong", now_ms=int(NOW.timestamp() * 1000))
    # One changed character of the timestamp breaks it.
    bad = url.replace(f"timestamp={params['timestamp']}", f"timestamp={int(params['timestamp']) + 1}")
    assert not dingtalk_verify_url(bad, ENV["DING_SECRET"])
    # Signing a signed URL again replaces the pair instead of appending a second one.
    again = build([_alert()], route.model_copy(update={"url": route.url.__class__(url)}), NOW + timedelta(seconds=5))
    assert again.url.count("timestamp=") == 1 and again.url.count("sign=") == 1
    assert dingtalk_verify_url(again.url, ENV["DING_SECRET"])
    payload = json.loads(body)
    assert payload["msgtype"] == "markdown"
    text = payload["markdown"]["text"]
    assert "auth_bruteforce" in text and "[click](" not in text and "<at " not in text
    assert payload["at"]["isAtAll"] is False


def test_dingtalk_sign_matches_the_documented_formula() -> None:
    import hashlib
    import hmac

    secret, ts = ENV["DING_SECRET"], 1700000000123
    digest = hmac.new(secret.encode(), f"{ts}\n{secret}".encode(), hashlib.sha256).digest()
    assert dingtalk_sign(secret, ts) == base64.b64encode(digest).decode()


def test_wecom_markdown_stays_under_4096_bytes_for_a_big_burst() -> None:
    route = _route("wecom")
    long_entity = "账户" * 120
    alerts = [_alert(i, entity=f"{long_entity}{i}") for i in range(40)]
    _, _, body = build(alerts, route, NOW, digest=True)
    content = json.loads(body)["markdown"]["content"]
    assert json.loads(body)["msgtype"] == "markdown"
    assert len(content.encode("utf-8")) <= 4096
    assert content.startswith("**Digest: 40 alerts")
    shown = content.count('<font color="warning">HIGH</font>')
    assert 1 <= shown < 40
    assert f"and {40 - shown} more alerts" in content


def test_discord_embeds_respect_limits_and_never_ping() -> None:
    route = _route("discord")
    alerts = [_alert(i, entity=HOSTILE) for i in range(25)]
    _, _, body = build(alerts, route, NOW)
    payload = json.loads(body)
    assert payload["allowed_mentions"] == {"parse": []}
    embeds = payload["embeds"]
    assert 1 <= len(embeds) <= 10
    chars = sum(
        len(e["title"]) + len(e["footer"]["text"]) + sum(len(f["name"]) + len(f["value"]) for f in e["fields"])
        for e in embeds
    )
    assert chars <= 6000
    assert all(len(e["fields"]) <= 25 and len(e["title"]) <= 256 for e in embeds)
    assert f"{25 - len(embeds)} more alerts" in payload["content"]
    # Masked-link syntax is escaped, so it renders as text.
    assert "[click](" not in json.dumps(embeds)


def test_generic_is_alertmanager_v4_with_a_standard_webhooks_signature() -> None:
    route = _route("generic", group_by=["detector"])
    alerts = [_alert(0, Severity.CRITICAL), _alert(1, Severity.MEDIUM, entity="bob")]
    url, headers, body = build(alerts, route, NOW, message_id="msg_fixed")
    payload = json.loads(body)
    assert payload["version"] == "4" and payload["status"] == "firing"
    assert payload["receiver"] == route.name and payload["truncatedAlerts"] == 0
    assert payload["groupLabels"] == {"detector": "auth_bruteforce"}
    assert payload["commonLabels"]["alertname"] == "auth_bruteforce"
    assert len(payload["alerts"]) == 2
    first = payload["alerts"][0]
    assert first["labels"]["severity"] == "critical"
    assert first["startsAt"] == "2026-11-30T13:50:00Z" and first["endsAt"] == "0001-01-01T00:00:00Z"
    assert first["fingerprint"] == alerts[0].alert_id
    assert json.loads(first["annotations"]["evidence"])["failures"] == 20
    assert headers["webhook-id"] == "msg_fixed"
    assert headers["webhook-timestamp"] == str(int(NOW.timestamp()))
    assert headers["webhook-signature"].startswith("v1,")
    assert standard_webhooks_verify(WHSEC, headers, body, now_s=int(NOW.timestamp()))
    # Any changed byte of the body, a different id or key, or a stale timestamp fails.
    for index in (0, len(body) // 2, len(body) - 1):
        assert not standard_webhooks_verify(WHSEC, headers, _flip_byte(body, index))
    assert not standard_webhooks_verify(WHSEC, {**headers, "webhook-id": "msg_other"}, body)
    assert not standard_webhooks_verify(new_whsec(secrets.token_bytes(32)), headers, body)
    assert not standard_webhooks_verify(WHSEC, headers, body, now_s=int(NOW.timestamp()) + 301)
    # Receivers accept a rotated key listed next to the current one.
    rotated = {**headers, "webhook-signature": "v1,AAAA " + headers["webhook-signature"]}
    assert standard_webhooks_verify(WHSEC, rotated, body)


def test_generic_resolved_alert_has_an_end_time() -> None:
    resolved = {**_alert().to_row(), "status": "resolved"}
    payload = json.loads(build([resolved], _route("generic"), NOW).body)
    assert payload["status"] == "resolved"
    assert payload["alerts"][0]["endsAt"] == "2026-11-30T14:00:00Z"


@pytest.mark.parametrize("platform", sorted(BUILDERS))
def test_builders_are_pure_and_deterministic(platform: str) -> None:
    route = _route(platform)
    alerts = [_alert(i) for i in range(3)]
    first = build(alerts, route, NOW, message_id="m1")
    second = build(list(reversed(alerts)), route, NOW, message_id="m1")
    assert (first.url, first.headers, first.body) == (second.url, second.headers, second.body)
    assert "<hidden>" in repr(first) and "sEcReT" not in repr(first)


@pytest.mark.parametrize("platform", sorted(BUILDERS))
def test_builders_accept_alerts_store_rows_and_snapshots(platform: str) -> None:
    route = _route(platform)
    alert = _alert()
    from_alert = build([alert], route, NOW, message_id="m")
    from_row = build([alert.to_row()], route, NOW, message_id="m")
    from_snapshot = build([json.loads(json.dumps(view(alert).as_dict()))], route, NOW, message_id="m")
    assert from_alert.body == from_row.body == from_snapshot.body


def test_digest_headline_counts_by_severity() -> None:
    alerts = [_alert(i, Severity.CRITICAL if i < 2 else Severity.LOW) for i in range(5)]
    payload = json.loads(build(alerts, _route("slack"), NOW, digest=True).body)
    assert payload["blocks"][0]["text"]["text"] == "Digest: 5 alerts from auth_bruteforce (2 critical, 3 low)"


# ---- routes ------------------------------------------------------------------------------------
def test_load_routes_reads_secrets_from_the_environment_and_parses_durations() -> None:
    (route,) = load_routes(
        [
            {
                "name": "secops",
                "platform": "dingtalk",
                "url_env": "HOOK_URL",
                "secret_env": "DING_SECRET",
                "min_severity": "high",
                "detectors": ["auth_bruteforce"],
                "group_interval": "2m",
                "repeat_interval": "1d",
            }
        ],
        ENV,
    )
    assert route.url.get_secret_value() == ENV["HOOK_URL"]
    assert route.secret.get_secret_value() == ENV["DING_SECRET"]
    assert (route.group_interval, route.repeat_interval) == (120.0, 86400.0)
    assert route.min_severity is Severity.HIGH
    assert ENV["DING_SECRET"] not in repr(route) and "sEcReT" not in repr(route)
    assert "url" not in route.model_dump() and "secret" not in route.model_dump()


def test_route_matching_by_severity_and_detectors() -> None:
    route = _route(
        "slack", min_severity="high", detectors=["auth_bruteforce", "ip_burst"], exclude_detectors=["ip_burst"]
    )
    assert route.matches("auth_bruteforce", Severity.HIGH)
    assert route.matches("auth_bruteforce", Severity.CRITICAL)
    assert not route.matches("auth_bruteforce", Severity.MEDIUM)
    assert not route.matches("ip_burst", Severity.CRITICAL)
    assert not route.matches("credential_stuffing", Severity.CRITICAL)
    everything = _route("slack", min_severity="info")
    assert everything.matches("anything", Severity.INFO)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"url_env": "NOT_SET"}, "environment variable NOT_SET is not set"),
        ({"url": "https://hooks.example.test/x"}, "never in the configuration file"),
        ({"min_severity": "urgent"}, "unknown severity"),
        ({"group_interval": "soon"}, "not a duration"),
        ({"group_by": ["colour"]}, "cannot group by"),
        ({"platform": "irc"}, "platform"),
        ({"secret_env": "DING_SECRET"}, "secret_env is only used by"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_routes_raise_config_error_naming_the_route(spec: dict, message: str) -> None:
    base = {"name": "chat-ops", "platform": "slack", "url_env": "HOOK_URL"}
    with pytest.raises(ConfigError) as info:
        load_routes([{**base, **spec}], ENV)
    assert "chat-ops" in str(info.value) and message in str(info.value)


def test_bad_signing_key_error_never_shows_the_key() -> None:
    env = {**ENV, "WH_SECRET": "whsec_" + "Zq%%Xy!!Wv"}
    with pytest.raises(ConfigError) as info:
        load_routes([{"name": "wh", "platform": "generic", "url_env": "HOOK_URL", "secret_env": "WH_SECRET"}], env)
    assert "not valid base64" in str(info.value) and "Zq%%Xy" not in str(info.value)
    short = {**ENV, "WH_SECRET": new_whsec(b"tiny")}
    with pytest.raises(ConfigError, match="at least 24"):
        load_routes([{"name": "wh", "platform": "generic", "url_env": "HOOK_URL", "secret_env": "WH_SECRET"}], short)


def test_duplicate_route_names_are_rejected() -> None:
    spec = {"name": "twice", "platform": "slack", "url_env": "HOOK_URL"}
    with pytest.raises(ConfigError, match="defined twice"):
        load_routes([spec, spec], ENV)


def test_parse_duration_units() -> None:
    values = (30, "45", "90s", "5m", "4h", "1d", "250ms")
    assert [parse_duration(v) for v in values] == [30, 45, 90, 300, 14400, 86400, 0.25]


# ---- rate limits -------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", sorted(PLATFORM_LIMITS))
def test_greedy_sender_never_exceeds_the_platform_limit_in_any_window(platform: str) -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    limiter = DestinationLimiter.fresh(platform, start)
    sent: list[float] = []
    step = 0.05
    for i in range(int(180 / step)):
        t = i * step
        if limiter.take(start + timedelta(seconds=t)):
            sent.append(t)
    for limit in PLATFORM_LIMITS[platform]:
        # Slack's 1-per-second bucket allows a burst of 2, which Slack tolerates (documented there).
        allowed = limit.count if limit.count > 1 else 2
        worst = max(sum(1 for s in sent if t <= s < t + limit.seconds) for t in sent)
        assert worst <= allowed, (platform, limit, worst)
    # And it is not needlessly slow: at least half the limit, sustained.
    slowest = min(PLATFORM_LIMITS[platform], key=lambda lim: lim.count / lim.seconds)
    assert len(sent) >= 0.5 * slowest.count / slowest.seconds * 180


def test_pause_empties_the_bucket_until_retry_after() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    bucket = TokenBucket.full(Limit(20, 60.0), start)
    bucket.pause(30.0, start)
    assert not bucket.take(start + timedelta(seconds=29.9))
    assert bucket.take(start + timedelta(seconds=30.0))


def test_clock_stepping_back_mints_no_tokens() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    bucket = TokenBucket.full(Limit(2, 60.0), start)
    assert bucket.take(start)
    assert not bucket.take(start - timedelta(hours=1))


def test_plan_messages_folds_a_burst_into_one_digest() -> None:
    groups = [[f"n{i}"] for i in range(30)]
    assert plan_messages(groups[:3], available=10) == ([["n0"], ["n1"], ["n2"]], False)
    plan, digest = plan_messages(groups, available=10)
    assert digest and len(plan) == 1 and sorted(plan[0]) == sorted(f"n{i}" for i in range(30))
    assert plan_messages(groups, available=0) == ([], False)


# ---- responses ---------------------------------------------------------------------------------
TEAMS_FAILED = "Webhook message delivery failed with error: Microsoft Teams endpoint returned HTTP error {} (…)"


def _response(status: int, body: str | bytes = b"", headers: dict | None = None) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    request = httpx.Request("POST", "https://x.test/")
    return httpx.Response(status, content=content, headers=headers or {}, request=request)


@pytest.mark.parametrize(
    ("kind", "status", "body", "headers", "expected"),
    [
        ("slack", 200, "ok", {}, (True, False, None)),
        ("slack", 429, "rate_limited", {"Retry-After": "7"}, (False, True, 7.0)),
        ("slack", 404, "no_service", {}, (False, False, None)),
        ("slack", 503, "", {}, (False, True, None)),
        ("teams", 202, "", {}, (True, False, None)),
        ("teams", 200, "1", {}, (True, False, None)),
        ("teams", 200, TEAMS_FAILED.format(429), {}, (False, True, None)),
        ("teams", 200, TEAMS_FAILED.format(413), {}, (False, False, None)),
        ("feishu", 200, '{"code":0,"msg":"success","data":{}}', {}, (True, False, None)),
        ("feishu", 200, '{"code":19021,"msg":"sign match fail"}', {}, (False, False, None)),
        ("feishu", 200, '{"code":11232,"msg":"frequency limited"}', {}, (False, True, None)),
        ("dingtalk", 200, '{"errcode":0,"errmsg":"ok"}', {}, (True, False, None)),
        ("dingtalk", 200, '{"errcode":130101,"errmsg":"send too fast"}', {}, (False, True, 600.0)),
        ("dingtalk", 200, '{"errcode":310000,"errmsg":"sign not match"}', {}, (False, False, None)),
        ("wecom", 200, '{"errcode":45009,"errmsg":"api freq out of limit"}', {}, (False, True, 60.0)),
        ("wecom", 200, '{"errcode":93000,"errmsg":"invalid webhook url"}', {}, (False, False, None)),
        ("discord", 204, "", {}, (True, False, None)),
        ("discord", 429, '{"message":"rate limited","retry_after":1.5,"global":false}', {}, (False, True, 1.5)),
        ("generic", 200, "", {}, (True, False, None)),
        ("generic", 500, "boom", {"Retry-After": "3"}, (False, True, 3.0)),
        ("generic", 400, "bad", {}, (False, False, None)),
    ],
)
def test_classify_reads_each_platforms_answer(kind, status, body, headers, expected) -> None:
    result = classify(kind, _response(status, body, headers), NOW)
    assert (result.ok, result.retryable, result.retry_after) == expected


def test_retry_after_as_http_date_is_relative_to_now() -> None:
    assert parse_retry_after("Mon, 30 Nov 2026 14:00:35 GMT", NOW) == 30.0
    assert parse_retry_after("Mon, 30 Nov 2026 13:00:00 GMT", NOW) == 0.0
    assert parse_retry_after("999999", NOW) == 3600.0
    assert parse_retry_after("soon", NOW) is None


def test_redact_removes_urls_tokens_and_keys() -> None:
    url = ENV["HOOK_URL"]
    text = f"POST {url} failed; token tok987654; path /services/T0001/B0002/sEcReTtOkEn123; key {ENV['DING_SECRET']}"
    cleaned = redact(text, [url, ENV["DING_SECRET"]])
    for secret in ("tok987654", "sEcReTtOkEn123", ENV["DING_SECRET"]):
        assert secret not in cleaned


@pytest.mark.parametrize("module", ["builders", "signing", "ratelimit"])
def test_builders_signing_and_rate_limits_stay_pure(module: str) -> None:
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "pipeline" / "notify" / f"{module}.py"
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    forbidden = ("httpx", "sqlalchemy", "os", "time", "random", "secrets", "pipeline.store", "pipeline.notify.outbox")
    assert not sorted(m for m in imported if m.split(".")[0] in forbidden or m in forbidden)
    source = path.read_text()
    assert "datetime.now(" not in source and "os.environ" not in source and "getenv" not in source
