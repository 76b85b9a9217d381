"""The service loop: follow the configured sources, and run detect and notify on APScheduler intervals."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from pipeline.config import Settings, SourceConfig
from pipeline.health import clear_problems, report_problem
from pipeline.jobs import FOLLOWER_PREFIX, detect_once, follow_paths, make_parser, parse_context
from pipeline.leader import Leadership
from pipeline.partitions import maintain
from pipeline.schema import ConfigError
from pipeline.store import Store

log = logging.getLogger(__name__)

TRAIN_WATERMARK = "train"


def train_due(store: Store, settings: Settings, force: bool = False) -> dict[str, Any] | None:
    """Fit and store the model detectors (pipeline.jobs.train_once) when the data has moved
    `train_hours` past the `train` watermark, or when `force`. Returns the training results by
    detector name, or None when not due.

    The watermark is data time, like detect's: a service that was down for days trains at its first
    tick after restart (catch-up), and a replay of old logs trains on them, not on the wall clock.
    """
    from pipeline.jobs import train_once

    stored = store.event_time_range()
    if stored is None:
        return None
    until = stored[1]
    last = store.get_watermark(TRAIN_WATERMARK)
    if not force and last is not None and until - last < timedelta(hours=settings.schedule.train_hours):
        return None
    results = {r.name: r for r in train_once(store, settings, until=until)}
    store.set_watermark(TRAIN_WATERMARK, until)
    return results


def check_sources(settings: Settings) -> None:
    """Refuse at start-up what a follower could never read (an unknown format, a directory, a file
    it may not open) with one line naming the entry; numbered from 1, as they appear in the file.

    A path where nothing exists yet only gets a warning: followed files may be created later.
    """
    for n, source in enumerate(settings.sources, start=1):
        if source.format != "auto":
            try:
                make_parser(source.format, parse_context(settings))
            except ConfigError as exc:
                raise ConfigError(f"sources[{n}].format: {exc}") from None
        if not source.paths:
            raise ConfigError(f"sources[{n}].paths: name at least one file to follow")
        for path in source.paths:
            if os.path.isdir(path):
                raise ConfigError(f"sources[{n}].paths: {path!r} is a directory; name the log file in it")
            if not os.path.exists(path):
                log.warning("sources[%d].paths: %r does not exist yet; it is followed once it appears", n, path)
            elif not os.access(path, os.R_OK):
                raise ConfigError(f"sources[{n}].paths: {path!r} is not readable by this user")


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
        # What the last train tick fitted (pipeline.jobs.TrainResult by detector name).
        self.models: dict[str, Any] = {}
        # Several `run` processes may share one PostgreSQL: each job runs only where its lock is held.
        self.leader = Leadership(store.engine)

    # ---- jobs ------------------------------------------------------------------------------
    def detect_job(self) -> None:
        try:
            summary = detect_once(self.store, self.settings)
            if self.after_detect is not None:
                self.after_detect(self.store)
            if summary.alerts_new:
                found = ", ".join(f"{name} {n}" for name, n in sorted(summary.by_detector.items()))
                log.warning("detect: %d new alert(s); found this run: %s", summary.alerts_new, found)
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

    def train_job(self) -> None:
        try:
            results = train_due(self.store, self.settings)
        except Exception:
            log.exception("train job failed")
            return
        if results is not None:
            self.models = results
            trained = sorted(name for name, r in results.items() if r.trained_to is not None)
            log.info("train: fitted %s", ", ".join(trained) or "nothing (too little history)")

    def maintenance_job(self) -> None:
        try:
            maintain(self.store.engine, datetime.now(timezone.utc), self.settings.partition_days_ahead,
                     self.settings.retention_days)
        except Exception:
            log.exception("maintenance job failed")

    def _led(self, job: str, func: Callable[[], None]) -> Callable[[], None]:
        def tick() -> None:
            with self.leader.run(job) as mine:
                if mine:
                    func()

        return tick

    def routes(self):
        if self._routes is None:
            from pipeline.notify import load_routes

            self._routes = load_routes(self.settings.routes)
        return self._routes

    # ---- lifecycle -------------------------------------------------------------------------
    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """A follower thread that fails (a file replaced by a directory, a permission taken away)
        logs one line instead of a traceback and shows in /health, rather than vanish unnoticed."""
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread else "?"
        where = _source_of(name, self.settings.sources) or f"thread {name}"
        first = str(args.exc_value).strip().splitlines()[:1]
        log.error("%s stopped: %s%s", where, args.exc_type.__name__, f": {first[0]}" if first else "")
        # /health is open to all: the exception type only, the path stays in the log.
        report_problem(where, f"stopped ({args.exc_type.__name__}); see the service log")

    def start(self) -> None:
        check_sources(self.settings)
        self.routes()  # a bad route is a ConfigError at start-up, not at the first alert
        # Likewise a bad detector table; building them also pays the imports (pandas, scikit-learn)
        # here instead of in the first detect tick, so the first alert is as quick as the later ones.
        from detectors.registry import build_detectors

        build_detectors(self.settings.detectors)
        _import_heavy_modules()
        clear_problems()
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_died
        for source in self.settings.sources:
            thread = threading.Thread(
                target=follow_paths,
                args=(self.store, self.settings, source.paths, source.format, self.stop_event),
                name=f"{FOLLOWER_PREFIX}{','.join(source.paths)}",
                daemon=True,
            )
            thread.start()
            self._followers.append(thread)
        sched = self.settings.schedule
        first = datetime.now(timezone.utc) + timedelta(seconds=min(sched.detect_seconds, 5))
        self.scheduler.add_job(self._led("detect", self.detect_job), IntervalTrigger(seconds=sched.detect_seconds),
                               id="detect", next_run_time=first)
        self.scheduler.add_job(self._led("notify", self.notify_job), IntervalTrigger(seconds=sched.notify_seconds),
                               id="notify")
        # Daily (train_hours), and once right at start: the job itself checks the watermark, so after
        # downtime it catches up at once and otherwise does nothing until a period of data is in.
        self.scheduler.add_job(self._led("train", self.train_job), IntervalTrigger(hours=sched.train_hours),
                               id="train", next_run_time=datetime.now(timezone.utc))
        self.scheduler.add_job(self._led("maintenance", self.maintenance_job),
                               IntervalTrigger(seconds=sched.maintenance_seconds), id="maintenance",
                               next_run_time=datetime.now(timezone.utc))
        self.scheduler.start()
        log.info("service started: %d sources, detect every %ss", len(self.settings.sources), sched.detect_seconds)

    def stop(self) -> None:
        self.stop_event.set()
        self.scheduler.shutdown(wait=True)
        self.leader.release_all()
        for thread in self._followers:
            thread.join(10)
        if threading.excepthook == self._thread_died:
            threading.excepthook = self._previous_hook


def _source_of(thread_name: str, sources: list[SourceConfig]) -> str | None:
    """Which `[[sources]]` entry a follower thread was reading, from its name (follow_paths names
    each thread after its file; the Service's own thread after all of the entry's files)."""
    if not thread_name.startswith(FOLLOWER_PREFIX):
        return None
    followed = thread_name.removeprefix(FOLLOWER_PREFIX)
    for n, source in enumerate(sources, start=1):
        if followed in source.paths or followed == ",".join(source.paths):
            return f"sources[{n}] follower"
    return None


def _import_heavy_modules() -> None:
    """Import what the jobs import lazily, once, before any job thread starts.

    Two threads importing the same package for the first time can deadlock on CPython's
    per-module import locks (seen with pandas' narwhals plugins between a detect and a train
    job); importing it all here, on one thread, leaves the jobs nothing to import.
    """
    import importlib

    for name in ("numpy", "pandas", "polars", "pyarrow", "sklearn.ensemble", "narwhals.stable.v2",
                 "detectors.models", "detectors.registry", "detectors.features", "pipeline.geo",
                 "pipeline.notify", "pipeline.evaluate", "pipeline.partitions", "psycopg.sql", "api.frames"):
        try:
            importlib.import_module(name)
        except ImportError:  # optional pieces; the job that needs one reports it
            log.debug("could not pre-import %s", name)

