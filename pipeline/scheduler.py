"""The service loop: follow the configured sources, and run detect and notify on APScheduler intervals."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from pipeline.config import Settings
from pipeline.jobs import detect_once, follow_paths
from pipeline.store import Store

log = logging.getLogger(__name__)


class Service:
    """One process's share of the work: followers (threads) plus the scheduled jobs.

    Jobs never overlap themselves (`max_instances=1`) and missed ticks fold into one (`coalesce`):
    a detect run that took longer than its interval simply makes the next one cover more data.
    """

    def __init__(self, settings: Settings, store: Store, after_detect: Callable[[Store], None] | None = None):
        self.settings = settings
        self.store = store
        # Wiring hook (the API's silences re-applied to new alerts) so this module needs no API import.
        self.after_detect = after_detect
        self.stop_event = threading.Event()
        self._followers: list[threading.Thread] = []
        self.scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        )
        self._routes = None

    # ---- jobs ------------------------------------------------------------------------------
    def detect_job(self) -> None:
        try:
            summary = detect_once(self.store, self.settings)
            if self.after_detect is not None:
                self.after_detect(self.store)
            if summary.alerts_new:
                log.warning("detect: %d new alerts (%s)", summary.alerts_new, dict(summary.by_detector))
        except Exception:  # a failed tick is logged and retried next tick; the service keeps running
            log.exception("detect job failed")
        self.notify_job()  # new alerts leave at once, not a notify interval later

    def notify_job(self) -> None:
        routes = self.routes()
        if not routes:
            return
        from pipeline.notify import notify_once

        try:
            notify_once(self.store, routes, datetime.now(timezone.utc))
        except Exception:
            log.exception("notify job failed")

    def routes(self):
        if self._routes is None:
            from pipeline.notify import load_routes

            self._routes = load_routes(self.settings.routes)
        return self._routes

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.routes()  # a bad route is a ConfigError at start-up, not at the first alert
        for source in self.settings.sources:
            thread = threading.Thread(
                target=follow_paths,
                args=(self.store, self.settings, source.paths, source.format, self.stop_event),
                name=f"follow:{','.join(source.paths)}",
                daemon=True,
            )
            thread.start()
            self._followers.append(thread)
        sched = self.settings.schedule
        first = datetime.now(timezone.utc) + timedelta(seconds=min(sched.detect_seconds, 5))
        self.scheduler.add_job(self.detect_job, IntervalTrigger(seconds=sched.detect_seconds), id="detect",
                               next_run_time=first)
        self.scheduler.add_job(self.notify_job, IntervalTrigger(seconds=sched.notify_seconds), id="notify")
        self.scheduler.start()
        log.info("service started: %d sources, detect every %ss", len(self.settings.sources), sched.detect_seconds)

    def stop(self) -> None:
        self.stop_event.set()
        self.scheduler.shutdown(wait=True)
        for thread in self._followers:
            thread.join(10)
