"""Isolation-forest scores of every window in a frame of events: the input of the score figure.

Pure (events in, scores out): the dashboard, the report and the notebooks all call it. It fits the
detector's own forest on the windows it is given and scores the same windows, so the figure shows
how the model sees that stretch of traffic and where its threshold cuts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from detectors.models import IsolationForestDetector, fit_state, transform
from detectors.models.iforest_ip import IforestIp
from detectors.rules import up_to_now, usec


@dataclass(frozen=True)
class WindowScores:
    """One row per (entity, bucket) window with its features and `score`; the model's threshold."""

    frame: pd.DataFrame
    threshold: float | None
    features: tuple[str, ...]


def window_scores(
    events: pd.DataFrame,
    now: datetime,
    detector: IsolationForestDetector | None = None,
) -> WindowScores:
    """Fit `detector`'s forest (default iforest_ip) on the complete windows of `events` and score them.

    Columns of the result: `entity`, `window_start` (UTC), the detector's features, `score` (higher is
    worse). Windows start `detector.history` after the first event at the earliest. No threshold when
    there are too few windows to fit a forest the detector would trust.
    """
    detector = detector or IforestIp()
    columns = ["entity", "window_start", *detector.features, "score"]
    empty = WindowScores(pd.DataFrame(columns=columns), None, detector.features)
    if events.empty:
        return empty
    kept, times = up_to_now(events, now)
    if kept.empty:
        return empty
    windows = detector.windows(kept, times)
    table = windows.table
    if table.empty:
        return empty
    bucket, history = usec(detector.bucket), usec(detector.history)
    start = table["bucket"].to_numpy() * bucket
    # As the detector does: only whole buckets (one cut by `now` looks quieter than it was) whose
    # `history` lies inside the frame (else every address looks new at the frame's start).
    rows = table[(start + bucket <= int(times.max()) + 1) & (start - history >= int(times.min()))]
    state = fit_state(rows, detector.features, detector.shape, quantile=detector.quantile, margin=detector.margin,
                      trees=detector.trees, max_samples=detector.max_samples, seed=detector.seed)
    if state is None:
        return empty
    scores = state.score(transform(rows, detector.features))
    entities = np.array([detector.entity(str(label))[1] for label in windows.labels], dtype=object)
    frame = pd.DataFrame({
        "entity": entities[rows["code"].to_numpy()],
        "window_start": pd.to_datetime(rows["bucket"].to_numpy() * bucket, unit="us", utc=True),
        **{name: rows[name].to_numpy() for name in detector.features},
        "score": scores,
    })
    return WindowScores(frame.reset_index(drop=True), float(state.threshold), detector.features)


def flag_alerted(scores: pd.DataFrame, alerts: pd.DataFrame, bucket_seconds: int = 600) -> pd.Series:
    """True for windows whose entity an alert names and whose bucket overlaps that alert's window."""
    flagged = np.zeros(len(scores), dtype=bool)
    if scores.empty or alerts.empty:
        return pd.Series(flagged, index=scores.index)
    starts = pd.to_datetime(scores["window_start"], utc=True)
    ends = starts + pd.Timedelta(seconds=bucket_seconds)
    entity = scores["entity"].astype(str).to_numpy()
    for alert in alerts.itertuples(index=False):
        mine = entity == str(alert.entity)
        if not mine.any():
            continue
        a_start, a_end = pd.Timestamp(alert.window_start), pd.Timestamp(alert.window_end)
        flagged |= mine & (starts < a_end).to_numpy() & (ends > a_start).to_numpy()
    return pd.Series(flagged, index=scores.index)
