"""The outbox claim on PostgreSQL skips rows another drainer holds (FOR UPDATE SKIP LOCKED)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from pipeline.notify import load_routes
from pipeline.notify.outbox import _claim, _due, enqueue, outbox
from pipeline.schema import Alert, EntityKind, Severity
from pipeline.store import Store

T0 = datetime(2026, 11, 30, 14, 0, tzinfo=timezone.utc)


def alert(i: int) -> Alert:
    start = T0 - timedelta(minutes=10) + timedelta(seconds=i)
    return Alert(
        detector="auth_bruteforce", severity=Severity.HIGH, entity_kind=EntityKind.IP, entity=f"203.0.113.{i + 1}",
        window_start=start, window_end=start + timedelta(minutes=10), score=5.0 + i,
        title=f"203.0.113.{i + 1}: failed logins", evidence={"failures": 20 + i},
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_claim_skips_rows_locked_by_another_drainer(database_url: str) -> None:
    store = Store.open(database_url)
    routes = load_routes([{"name": "ops", "platform": "generic", "url_env": "HOOK"}], {"HOOK": "http://127.0.0.1:9/"})
    store.upsert_alerts([alert(i) for i in range(6)])
    assert enqueue(store, routes, T0) == 6
    due = _due(store, routes[0], T0)
    ids = sorted(r.notification_id for r in due)
    held, free = ids[:3], ids[3:]

    other = store.engine.connect()
    trans = other.begin()
    try:
        # Another drainer, mid-claim: it holds row locks on half of the due rows.
        other.execute(sa.select(outbox.c.notification_id).where(outbox.c.notification_id.in_(held)).with_for_update())
        result: dict[str, list] = {}
        worker = threading.Thread(target=lambda: result.update(claimed=_claim(store, routes[0], due, T0)[1]))
        worker.start()
        worker.join(15)
        blocked = worker.is_alive()
    finally:
        trans.rollback()
        other.close()
    worker.join(15)
    store.close()
    assert not blocked, "the claim waited for the other drainer's locks instead of skipping them"
    assert sorted(r.notification_id for r in result["claimed"]) == free
