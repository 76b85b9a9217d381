"""Threshold rules, one module each, and the few helpers they share (durations, windows, wording)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from detectors.base import FRAME_START_US
from detectors.features import BUCKET_US, KeySpace, Timeline, episodes, micros, to_timestamp

_NAT = np.iinfo(np.int64).min  # what pandas stores for NaT


def as_timedelta(value: Any, field: str) -> timedelta:
    """A duration parameter from config: a timedelta, seconds, or text such as "5min", "1h", "30 s"."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a duration such as '5min', got {value!r}")
    if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
        # pandas would read a bare "300" as nanoseconds; nobody means that in a config file.
        raise ValueError(f"{field}: give a unit, e.g. '{value.strip()}s', got {value!r}")
    try:
        if isinstance(value, (int, float)):
            duration = pd.Timedelta(seconds=value)
        else:
            duration = pd.Timedelta(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: expected a duration such as '5min', got {value!r}") from None
    if pd.isna(duration) or duration <= pd.Timedelta(0):
        raise ValueError(f"{field}: must be a positive duration, got {value!r}")
    return duration.to_pytimedelta()


def positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{field}: expected a whole number >= 1, got {value!r}")
    return int(value)


def check_lookback(window: timedelta, lookback: timedelta, field: str = "window") -> None:
    # An episode's start is the first event of the first window over the threshold; the events before
    # it must be in the frame for that start (and so the alert id) to be the same on every run.
    if window * 2 > lookback:
        raise ValueError(f"{field}: at most half the lookback ({human(lookback)}), got {human(window)}")


def check_confirmable(window: timedelta, lookback: timedelta, field: str = "window") -> None:
    # An episode is confirmed with two windows of history before its first hot event (features.
    # episodes, known_us), and a replay step adds a day: both must fit in the lookback.
    if window * 2 + REPLAY_STEP > lookback:
        raise ValueError(
            f"{field}: at most {human((lookback - REPLAY_STEP) / 2)} (two windows and a day must fit the "
            f"{human(lookback)} lookback), got {human(window)}"
        )


def human(duration: timedelta) -> str:
    """"5 min", "1 h", "90 s": durations the way titles say them."""
    seconds = int(duration.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def usec(duration: timedelta) -> int:
    return int(pd.Timedelta(duration).value // 1_000)


def up_to_now(events: pd.DataFrame, now: datetime) -> tuple[pd.DataFrame, np.ndarray]:
    """The events at or before `now` and their times in µs: a detector never looks into the future."""
    stamp = pd.Timestamp(now)
    if stamp.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    times = micros(events["ts"])
    now_us = usec(stamp - pd.Timestamp(0, tz="UTC"))
    keep = (times <= now_us) & (times != _NAT)  # an event without a time belongs to no window
    if not keep.all():
        return events.iloc[np.flatnonzero(keep)], times[keep]
    return events, times


def bucket_floor(us: int) -> datetime:
    return to_timestamp(us - us % BUCKET_US).to_pydatetime()


def bucket_ceil(us: int) -> datetime:
    """End of the minute holding `us`, so [window_start, window_end) covers the episode."""
    return to_timestamp(us - us % BUCKET_US + BUCKET_US).to_pydatetime()


def iso(us: int) -> str:
    return to_timestamp(us).isoformat()


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


# ---------------------------------------------------------------------------------------------
# History the frame is known to hold, flags, and episodes of sparse findings


def known_from(times: np.ndarray, now: datetime, lookback: timedelta) -> int:
    """The earliest time (µs) from which the frame holds every event: `now - lookback`, or earlier
    when the caller handed over more (the detect job replays in steps, each with its lookback).

    Baselines and "was it quiet before?" tests may only look at time after this point: before it,
    no event in the frame does not mean no event happened.
    """
    start = usec(pd.Timestamp(now) - pd.Timestamp(0, tz="UTC")) - usec(lookback)
    whole = FRAME_START_US.get()  # the job handed over some entities' rows only
    if whole is not None:
        return min(whole, start)
    return min(int(times.min()), start) if len(times) else start


def frame_first(times: np.ndarray) -> int:
    """The time (µs) of the whole frame's first event: the job's, when it handed over part of it."""
    whole = FRAME_START_US.get()
    return whole if whole is not None else int(times.min())


def flag_mask(flags: pd.Series, flag: str) -> np.ndarray:
    """Rows whose `|`-joined flags include `flag`; tested once per distinct flags value."""
    codes, values = pd.factorize(flags, use_na_sentinel=True)
    if len(values) == 0:
        return np.zeros(len(flags), dtype=bool)
    has = np.array([flag in str(v).split("|") for v in values] + [False])  # index -1: no flags
    return has[codes]


# The detect job replays history in one-day steps, each with its detectors' lookback before it.
REPLAY_STEP = timedelta(days=1)


def check_episode_gap(gap: timedelta, lookback: timedelta, field: str = "episode_gap") -> None:
    # A run can confirm that an episode began after a quiet `gap` only inside what it sees, and a
    # replay step sees the lookback before a day of events: the gap may use the lookback minus a day.
    if gap > lookback - REPLAY_STEP:
        raise ValueError(f"{field}: at most {human(lookback - REPLAY_STEP)}, got {human(gap)}")


def confirmed_episodes(
    codes: np.ndarray, times: np.ndarray, mask: np.ndarray, gap: timedelta, known_us: int
) -> tuple[Timeline, pd.DataFrame]:
    """Episodes of the events where `mask` holds, per entity: events less than `gap` apart belong
    together. For findings where each event counts (a key over plain HTTP, a secret in a URL).

    Only episodes whose start is confirmed are kept: the frame must hold the `gap` before the
    first event (from `known_us`, see `known_from`), else that event may continue an episode a
    previous run already reported, and a second alert with a later start would duplicate it.
    Columns as `episodes()`; `first` is the episode's first event.
    """
    gap_us = usec(gap)
    space = KeySpace.covering(times, int(codes.max()) + 1 if len(codes) else 0, gap_us)
    timeline = Timeline.build(codes, times, mask, space)
    found = episodes(timeline, np.ones(len(timeline), dtype=np.int64), np.ones(len(timeline), bool), gap_us)
    if found.empty:
        return timeline, found
    confirmed = timeline.times[found["first"].to_numpy()] - gap_us >= known_us
    return timeline, found[confirmed].reset_index(drop=True)
