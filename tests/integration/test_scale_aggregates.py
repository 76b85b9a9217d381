"""Window aggregates counted by the database equal the ones pandas counts from the raw frame."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from detectors.features import bucket_counts as frame_bucket_counts
from detectors.features import window_features
from pipeline.aggregates import ENTITY_COLUMNS, bucket_counts, window_aggregates
from pipeline.config import Settings
from pipeline.generate import generate
from pipeline.jobs import ingest_paths
from pipeline.schema import Outcome
from pipeline.store import Store


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agg")
    generate(out, days=1, seed=11, attacks=True, scale=0.05)
    return out


@pytest.fixture
def filled(database_url: str, generated: Path, tmp_path: Path) -> Iterator[Store]:
    store = Store.open(database_url)
    settings = Settings(database_url="sqlite://", pepper="agg-pepper", data_dir=tmp_path / "state")
    files = [str(p) for p in sorted(generated.iterdir()) if p.name in ("api.jsonl", "nginx.log", "maillog")]
    ingest_paths(store, settings, files, "auto")
    yield store
    store.close()


def _sorted(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    return frame.sort_values([by, "bucket"]).reset_index(drop=True)


@pytest.mark.parametrize("by", ENTITY_COLUMNS)
def test_sql_window_aggregates_equal_the_frame_features(filled: Store, by: str) -> None:
    lo, hi = filled.event_time_range()
    # A window that starts and ends mid-bucket, so both edges are checked.
    since, until = lo + timedelta(hours=3, minutes=7), hi - timedelta(hours=2, minutes=13)
    frame = filled.load_events(since, until)
    assert len(frame) > 5000

    want = _sorted(window_features(frame, by=by, freq="10min"), by)
    got = _sorted(window_aggregates(filled.engine, since, until, by=by, bucket_seconds=600), by)
    assert len(got) > 100
    columns = list(want.columns)
    pd.testing.assert_frame_equal(got[columns], want[columns], check_dtype=False)
    assert got["bucket"].dt.tz is not None


def test_sql_failure_counts_equal_the_frame_counts(filled: Store) -> None:
    lo, hi = filled.event_time_range()
    frame = filled.load_events(lo, hi)
    failed = frame["outcome"].eq(Outcome.AUTH_FAILED)
    want = _sorted(frame_bucket_counts(frame, "source_ip", "1min", where=failed), "source_ip")
    got = _sorted(bucket_counts(filled.engine, lo, hi, "source_ip", 60, Outcome.AUTH_FAILED), "source_ip")
    assert want["events"].sum() > 50  # the generated attacks fail logins
    pd.testing.assert_frame_equal(got[list(want.columns)], want, check_dtype=False)
    # All events per account per hour add up to the stored total (nulls excluded on both sides).
    hourly = bucket_counts(filled.engine, lo, hi, "account", 3600)
    assert hourly["events"].sum() == int(frame["account"].notna().sum())


def test_unknown_entity_is_a_clear_error(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        lo = pd.Timestamp("2026-11-30", tz="UTC").to_pydatetime()
        with pytest.raises(ValueError, match="cannot aggregate by 'path'"):
            window_aggregates(store.engine, lo, lo, by="path")
    finally:
        store.close()
