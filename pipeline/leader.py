"""Leader election per job: a PostgreSQL advisory lock, so several schedulers run each tick once.

Every `mailwarden run` process schedules every job; before a run it asks for the job's session-level
`pg_try_advisory_lock` on a connection of its own that it keeps open. The process that holds the
lock runs the job; the others skip the tick. When the holder dies, PostgreSQL closes its session
and frees the lock, and the next process to tick takes it over: fail-over within one interval,
without heartbeats or a lease table. SQLite is one process by design, so there the lock always
succeeds. Each run is written to `job_runs` (job, owner, start, end, success).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.store import metadata

log = logging.getLogger(__name__)

TS = sa.DateTime(timezone=True)
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

job_runs = sa.Table(
    "job_runs",
    metadata,
    sa.Column("run_id", AUTO_ID, primary_key=True, autoincrement=True),
    sa.Column("job", sa.String(64), nullable=False),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("started_at", TS, nullable=False),
    sa.Column("finished_at", TS),
    sa.Column("ok", sa.Boolean),
)


def lock_key(job: str, scope: str = "") -> int:
    """A signed 64-bit advisory-lock key for a job; `scope` (the schema) keeps installations apart."""
    digest = hashlib.sha256(f"mailwarden:{scope}:{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership:
    """This process's claim on each job. One dedicated connection holds every lock it has won.

    The connection bypasses the engine's pool on purpose: a pooled connection would be handed to
    other code and reset, and a lock must live exactly as long as this process's session.
    """

    def __init__(self, engine: Engine, owner: str | None = None):
        self.engine = engine
        self.owner = owner or default_owner()
        self.enabled = engine.dialect.name == "postgresql"
        self._conn: Any = None
        self._held: set[str] = set()
        self._guard = threading.Lock()
        self._scope = ""

    # ---- the lock connection ------------------------------------------------------------------
    def _connection(self) -> Any:
        if self._conn is None:
            # Detached from the pool: never handed to other code, never reset; closed only by us.
            proxy = self.engine.raw_connection()
            conn = proxy.driver_connection
            proxy.detach()
            conn.rollback()  # a pre-ping may have opened a transaction; autocommit needs none
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT current_schema()")
                self._scope = cur.fetchone()[0] or ""
            self._conn = conn
        return self._conn

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing to release, the server freed the locks
                pass

    def _still_held(self, job: str) -> bool:
        key = lock_key(job, self._scope)
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND granted AND objid::text::bigint = (%s::bigint & 4294967295) "
                "AND classid::text::bigint = ((%s::bigint >> 32) & 4294967295)",
                (key, key),
            )
            return cur.fetchone()[0] > 0

    def holds(self, job: str) -> bool:
        """Whether this process is the job's leader now (taking the lock if it is free)."""
        if not self.enabled:
            return True
        with self._guard:
            try:
                conn = self._connection()
                if job in self._held:
                    if self._still_held(job):
                        return True
                    self._held.discard(job)
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(job, self._scope),))
                    won = bool(cur.fetchone()[0])
            except Exception as exc:  # lost connection: we may no longer hold anything; retry next tick
                log.warning("leader lock for %s unavailable: %s", job, str(exc).splitlines()[:1])
                self._reset()
                return False
            if won:
                self._held.add(job)
                log.info("%s is now the leader of job %s", self.owner, job)
            return won

    def release_all(self) -> None:
        """Give every lock up (a clean shutdown hands leadership over at the others' next tick)."""
        with self._guard:
            if self._conn is not None and self._held:
                try:
                    # Freed now, not when the server gets round to ending the closed session.
                    with self._conn.cursor() as cur:
                        cur.execute("SELECT pg_advisory_unlock_all()")
                except Exception:  # a broken session holds nothing any more
                    pass
            self._reset()

    # ---- guarded runs --------------------------------------------------------------------------
    @contextmanager
    def run(self, job: str) -> Iterator[bool]:
        """`with leadership.run("detect") as mine: if mine: ...` — logs the run in job_runs."""
        if not self.holds(job):
            yield False
            return
        started = datetime.now(timezone.utc)
        run_id = self._record_start(job, started)
        ok = False
        try:
            yield True
            ok = True
        finally:
            self._record_end(run_id, ok)

    def _record_start(self, job: str, started: datetime) -> int | None:
        try:
            with self.engine.begin() as conn:
                return conn.execute(
                    job_runs.insert().values(job=job, owner=self.owner, started_at=started).returning(job_runs.c.run_id)
                ).scalar_one()
        except sa.exc.SQLAlchemyError as exc:  # the log is evidence, not a reason to skip the job
            log.warning("cannot record the start of job %s: %s", job, str(exc).splitlines()[:1])
            return None

    def _record_end(self, run_id: int | None, ok: bool) -> None:
        if run_id is None:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    job_runs.update()
                    .where(job_runs.c.run_id == run_id)
                    .values(finished_at=datetime.now(timezone.utc), ok=ok)
                )
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cannot record the end of run %s: %s", run_id, str(exc).splitlines()[:1])


def job_run_rows(engine: Engine, job: str | None = None) -> list[dict[str, Any]]:
    """The job-run log, oldest first (for tests, the API and operators)."""
    query = sa.select(job_runs).order_by(job_runs.c.started_at, job_runs.c.run_id)
    if job:
        query = query.where(job_runs.c.job == job)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
