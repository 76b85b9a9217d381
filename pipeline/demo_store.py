"""A labelled sample store in one SQLite file (generate, ingest, detect) for notebooks, tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
        return Settings(database_url=self.url, pepper=SAMPLE_PEPPER, data_dir=self.folder / "state")

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


def sample_store(folder: Path | None = None, **params: float) -> SampleStore:
    """The sample store in `folder` (default: one per user in the temp dir), built if missing."""
    days, seed, scale = int(params.get("days", 2)), int(params.get("seed", 7)), float(params.get("scale", 0.1))
    folder = folder or Path(tempfile.gettempdir()) / f"mailwarden-sample-d{days}-s{seed}-x{scale:g}"
    found = SampleStore(Path(folder))
    if found.exists():
        return found
    return build_sample_store(found.folder, days=days, seed=seed, scale=scale)
