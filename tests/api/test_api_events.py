"""/events search and /stats on real stored events: CIDR, time, key, outcome, path, cursor, hard cap."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

import pytest

from api.queries import EventQuery, network_text_prefix, parse_ip_filter

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)

ADDRESSES = [
    "203.0.113.9", "203.0.113.200", "203.0.112.5", "203.0.127.1", "203.0.128.1", "198.51.100.7",
    "2001:db8:1::1", "2001:db8:1:ff::2", "2001:db8:2::1", "10.1.2.3",
]


def _rows():
    rows = []
    for i, ip in enumerate(ADDRESSES):
        rows.append({
            "ts": T0 + timedelta(minutes=i),
            "source_ip": ip,
            "outcome": "auth_failed" if i % 3 == 0 else "ok",
            "status": 401 if i % 3 == 0 else 200,
            "api_key_id": f"key{i % 2}",
            "account": f"acct_{i % 4}",
            "path": "/v3/mail/send" if i % 2 else "/v3/messages/{id}",
            "service": "api",
        })
    return rows


def _search(api, headers, **params):
    response = api.client.get("/events?" + urlencode(params), headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _ips(page):
    return [e["source_ip"] for e in page["items"]]


def _expected(predicate):
    """Addresses of the seeded events a predicate keeps, newest first (the API's order)."""
    return [r["source_ip"] for r in reversed(_rows()) if predicate(r)]


def test_search_by_cidr_time_and_fields(api) -> None:
    api.add_events(_rows())
    headers = api.key("events:read")
    search = lambda **p: _ips(_search(api, headers, limit=5, **p))  # noqa: E731

    in_net = lambda net: lambda r: ipaddress.ip_address(r["source_ip"]) in ipaddress.ip_network(net)  # noqa: E731
    # /20 is not octet-aligned: 203.0.112.0 - 203.0.127.255.
    assert search(ip="203.0.112.0/20") == _expected(in_net("203.0.112.0/20"))
    assert search(ip="203.0.113.0/24") == ["203.0.113.200", "203.0.113.9"]
    assert search(ip="2001:db8:1::/48") == ["2001:db8:1:ff::2", "2001:db8:1::1"]
    assert search(ip="203.0.113.9") == ["203.0.113.9"]
    assert search(ip="203.0.113.9/32") == ["203.0.113.9"]

    since, until = T0 + timedelta(minutes=2), T0 + timedelta(minutes=4)
    in_time = lambda r: since <= r["ts"] <= until  # noqa: E731
    assert search(since=since.isoformat(), until=until.isoformat()) == _expected(in_time)
    assert search(ip="203.0.0.0/16", since=since.isoformat()) == _expected(
        lambda r: r["ts"] >= since and in_net("203.0.0.0/16")(r)
    )[:5]
    assert search(outcome="auth_failed", key_id="key0") == _expected(
        lambda r: r["outcome"] == "auth_failed" and r["api_key_id"] == "key0"
    )
    assert search(account="acct_1") == _expected(lambda r: r["account"] == "acct_1")
    assert search(path="/v3/mail/*") == _expected(lambda r: r["path"] == "/v3/mail/send")[:5]
    assert search(path="/v3/messages/{id}", outcome="ok") == _expected(
        lambda r: r["path"] == "/v3/messages/{id}" and r["outcome"] == "ok"
    )

    for bad in ({"ip": "203.0.113"}, {"outcome": "fine"}, {"cursor": "not-a-cursor"},
                {"since": "2026-01-01", "until": "2025-01-01"}):
        assert api.client.get("/events?" + urlencode(bad), headers=headers).status_code == 422


def test_hard_cap_and_cursor_walk(api) -> None:
    ids = api.add_events(_rows())
    headers = api.key("events:read")
    first = _search(api, headers, limit=1000)
    assert first["limit"] == api.state.limits.max_event_rows == 5
    assert len(first["items"]) == 5 and first["next_cursor"]
    seen, cursor = [], None
    while True:
        page = _search(api, headers, limit=1000, **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= 5
        seen += [e["event_id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))


def test_cidr_pages_stay_exact_under_a_small_scan_budget(api) -> None:
    api.add_events(_rows())
    net = ipaddress.ip_network("203.0.112.0/20")
    query = EventQuery(network=net)
    found, cursor, short_pages = [], None, 0
    while True:
        page = api.state.queries.search_events(query, limit=3, cursor=cursor, scan_budget=3)
        found += [e["source_ip"] for e in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
        short_pages += len(page.items) < 3
    assert found == _expected(lambda r: ipaddress.ip_address(r["source_ip"]) in net)
    # The budget cut a scan short (a page with fewer rows than asked, yet a cursor) and it resumed.
    assert short_pages >= 1


def test_stats(api) -> None:
    rows = _rows()
    api.add_events(rows)
    headers = api.key("events:read")
    stats = api.client.get("/stats?top=3", headers=headers).json()
    failed = sum(r["outcome"] != "ok" for r in rows)
    assert stats["requests"] == len(rows)
    assert stats["failures"] == failed and stats["auth_failures"] == failed
    assert stats["by_outcome"] == {"ok": len(rows) - failed, "auth_failed": failed}
    assert len(stats["top_ips"]) == 3
    keys = {k["value"]: k for k in stats["top_keys"]}
    assert keys["key0"]["requests"] == sum(r["api_key_id"] == "key0" for r in rows)
    assert keys["key0"]["auth_failures"] == sum(r["api_key_id"] == "key0" and r["outcome"] != "ok" for r in rows)
    since = (T0 + timedelta(minutes=8)).isoformat()
    assert api.client.get("/stats?" + urlencode({"since": since}), headers=headers).json()["requests"] == 2


@pytest.mark.parametrize(
    "cidr, prefix",
    [
        ("203.0.113.0/24", "203.0.113."), ("203.0.112.0/20", "203.0."), ("0.0.0.0/0", ""), ("10.0.0.0/7", ""),
        ("2001:db8:1::/48", "2001:db8:1:"), ("2001:db8::/48", "2001:db8:"), ("::/0", ""),
        ("2001:db8:0:5::/64", "2001:db8:"),
    ],
)
def test_network_text_prefix_is_a_prefix_of_every_member(cidr, prefix) -> None:
    net = ipaddress.ip_network(cidr)
    assert network_text_prefix(net) == prefix
    for member in (net.network_address, net.broadcast_address, net.network_address + 1):
        assert member.compressed.startswith(prefix)


def test_ip_filter_parsing() -> None:
    assert parse_ip_filter("2001:DB8:0:0::1") == ("2001:db8::1", None)
    assert parse_ip_filter("[2001:db8::1]") == ("2001:db8::1", None)
    assert parse_ip_filter("203.0.113.77/24") == (None, ipaddress.ip_network("203.0.113.0/24"))
    with pytest.raises(ValueError):
        parse_ip_filter("example.com")


def test_a_reversed_range_is_refused_alike_by_stats_events_and_alerts(sqlite_api) -> None:
    sqlite_api.add_events(_rows())
    headers = sqlite_api.key("events:read", "alerts:read")
    for path in ("/stats", "/events", "/alerts"):
        response = sqlite_api.client.get(f"{path}?since=2026-12-01&until=2026-11-01", headers=headers)
        assert (response.status_code, response.json()["detail"]) == (422, "since is after until"), path
