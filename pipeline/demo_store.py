"""A labelled sample store in one SQLite file (generate, ingest, detect) for notebooks, tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.generate import LABELS_FILE
from pipeline.generate import generate as run_generator
from pipeline.jobs import detect_range, ingest_paths
from pipeline.store import Store

# Sample stores hold generated keys only; a fixed pepper lets notebooks fingerprint the raw keys
# in labels.csv and find them in the store.
SAMPLE_PEPPER = "mailwarden-sample-pepper"
DB_NAME = "mailwarden.db"
LOG_FILES = ("api.jsonl", "nginx.log", "maillog")


@dataclass(frozen=True)
class SampleStore:
    """Where a sample store lives: its URL, its folder, and the generated logs with their labels."""

    folder: Path

    @property
    def db_path(self) -> Path:
        return self.folder / DB_NAME

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def labels(self) -> Path:
        return self.logs / LABELS_FILE

    def settings(self) -> Settings:
        # The generator writes its nginx file in the "mailapi" log_format (scheme and X-Api-Key included).
        return Settings(database_url=self.url, pepper=SAMPLE_PEPPER, data_dir=self.folder / "state",
                        log_format="mailapi")

    def exists(self) -> bool:
        return self.db_path.is_file() and self.labels.is_file()


def build_sample_store(folder: Path, *, days: int = 2, seed: int = 7, scale: float = 0.1) -> SampleStore:
    """Generate `days` of labelled traffic, ingest it and run the detectors, into `folder`.

    The store is built in a sibling temporary folder and renamed into place, so a reader (or a
    second builder racing this one) sees either no store or a complete one.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = SampleStore(Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)))
    try:
        run_generator(staging.logs, days=days, seed=seed, attacks=True, scale=scale)
        settings = staging.settings()
        store = Store.open(settings.database_url)
        try:
            ingest_paths(store, settings, [str(staging.logs / name) for name in LOG_FILES], "auto")
            detect_range(store, settings)
        finally:
            store.close()
        for suffix in ("-wal", "-shm"):
            # A cleanly closed WAL database needs none of these; they name the staging path.
            Path(str(staging.db_path) + suffix).unlink(missing_ok=True)
        try:
            os.rename(staging.folder, folder)
        except OSError:
            if not SampleStore(folder).exists():
                raise
    finally:
        shutil.rmtree(staging.folder, ignore_errors=True)
    return SampleStore(folder)


# Names a folder holding (or to hold) the sample store, instead of one in the temp dir.
SAMPLE_DIR_ENV = "MAILWARDEN_SAMPLE_DIR"
STORE_URL_ENV = "MAILWARDEN_DATABASE_URL"


def sample_store(folder: Path | None = None, **params: float) -> SampleStore:
    """The sample store in `folder` (default: $MAILWARDEN_SAMPLE_DIR, else one in the temp dir),
    built if missing."""
    days, seed, scale = int(params.get("days", 2)), int(params.get("seed", 7)), float(params.get("scale", 0.1))
    if folder is None and os.environ.get(SAMPLE_DIR_ENV):
        folder = Path(os.environ[SAMPLE_DIR_ENV])
    folder = folder or Path(tempfile.gettempdir()) / f"mailwarden-sample-d{days}-s{seed}-x{scale:g}"
    found = SampleStore(Path(folder))
    if found.exists():
        return found
    return build_sample_store(found.folder, days=days, seed=seed, scale=scale)


# The key the demo makes so the dashboard can be opened at once: read alerts and events, and move
# alerts (acknowledge, resolve). Each demo run revokes the previous demo key before making its own.
DEMO_KEY_NAME = "demo dashboard"
DEMO_KEY_SCOPES = ("alerts:read", "alerts:write", "events:read")


def make_demo_key(store: Store) -> str:
    """A fresh dashboard key for the demo store (earlier demo keys revoked); the raw key, shown once."""
    from api.auth import KeyRing

    ring = KeyRing(store.engine)
    for key in ring.list():
        if key["name"] == DEMO_KEY_NAME and key["revoked_at"] is None:
            ring.revoke(key["key_id"])
    raw, _ = ring.create(DEMO_KEY_NAME, DEMO_KEY_SCOPES)
    return raw


def dashboard_hint(raw_key: str, database_url: str | None, port: int = 8000) -> list[str]:
    """The lines that tell how to open the dashboard on this store."""
    store_option = f" --database-url '{database_url}'" if database_url else ""
    me = command_name()
    return [
        "open the dashboard on this store:",
        f"  {me} serve{store_option}",
        f"  then browse to http://127.0.0.1:{port}/ and paste this key (made for the demo, shown only now):",
        f"  {raw_key}",
        "  (it reads alerts and events and can acknowledge or resolve alerts;"
        f" `{me} apikey revoke` ends it)",
        f"a shareable report: {me} report{store_option} --out report.html",
    ]


def command_name() -> str:
    """How this run was started, for hints to copy: `.venv/bin/mailwarden` when the virtual
    environment is not on PATH, `mailwarden` when it is (or under `python -m pipeline`)."""
    invoked = sys.argv[0] if sys.argv else ""
    if os.path.basename(invoked) != "mailwarden":
        return "mailwarden"
    on_path = shutil.which("mailwarden")
    if on_path and os.path.realpath(on_path) == os.path.realpath(invoked):
        return "mailwarden"
    return os.path.relpath(invoked) if not os.path.isabs(invoked) or invoked.startswith(os.getcwd()) else invoked


def print_dashboard_hint(store: Store, database_url: str | None, console: Any) -> None:
    """Make the demo's dashboard key and print how to open the dashboard with it."""
    for line in dashboard_hint(make_demo_key(store), database_url):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def notebook_store() -> tuple[Store, str]:
    """The store a notebook reads: $MAILWARDEN_DATABASE_URL when set, else the sample store (built
    on first use). Returns the open store and its URL with any password hidden."""
    from pipeline.schema import MailwardenError
    from pipeline.store import redact_url

    url = os.environ.get(STORE_URL_ENV) or sample_store().url
    store = Store.open(url)
    if store.event_time_range() is None:
        store.close()
        raise MailwardenError(f"the store {redact_url(url)} holds no events: ingest logs or run `mailwarden demo` first")
    return store, redact_url(url)
