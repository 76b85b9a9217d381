"""Sending spikes: an API key sending far more mail than it itself usually does, for a sustained time."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Clause, Measure, Pushdown, Rows, busy
from detectors.features import (
    US_PER_SECOND,
    KeySpace,
    Timeline,
    as_mask,
    counts_per_episode,
    entity_codes,
    episode_members,
    episodes,
    spread_sample,
)
from detectors.rules import (
    as_timedelta,
    bucket_ceil,
    bucket_floor,
    human,
    iso,
    known_from,
    up_to_now,
    usec,
)
from pipeline.schema import Alert, EntityKind, Outcome, Severity

_HOUR_US = 3600 * US_PER_SECOND
BASELINE_HOURS = 24  # one daily cycle: nights and office hours both weigh in the median
# How far back a key's first send is looked for when asking whether it has `min_history`: bounded,
# so every run that holds this much before an hour judges that hour the same way.
HISTORY_HOURS = 36
_MAD_TO_SIGMA = 1.4826  # MAD of normal data times this estimates its standard deviation


def _positive_number(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{field_name}: expected a number > 0, got {value!r}")
    return float(value)


def _whole(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{field_name}: expected a whole number >= 0, got {value!r}")
    return int(value)


@dataclass
class VolumeSpike(Detector):
    """Fires when an API key sends far more than its own usual volume, and keeps doing so.

    What fires: sends are requests with the key on a `send_paths` endpoint (or that report a
    recipient count), except those refused as `auth_failed` or `forbidden`. Per key, two volumes
    over a sliding `window`: sends, and recipients (the sum of `recipients`, where the log has it).
    Each is compared with the key's own hourly volume over the previous 24 hours (from its first
    send in them, and only once it has `min_history` of them): a window is hot when its volume,
    scaled to an hour, reaches all of `min_sends` (or `min_recipients`), `factor` times the median
    hour, and the median plus `mad_k` robust standard deviations (MAD x 1.4826). The median and MAD
    ignore the odd big hour, so one earlier burst does not raise the bar. An alert needs the key to
    stay hot for `min_duration`: from the first hot window to the last, with gaps shorter than
    `window`. One alert per key per episode.

    Why it matters: a stolen or leaked key is used to send spam or phishing from the customer's
    account (MITRE T1078, valid accounts): the mail is signed with the customer's domain, hurts its
    reputation and the service's, and gets the sending IPs blocklisted. Volume is often the first
    sign when the thief uses the customer's own infrastructure (a compromised server or plugin),
    where nothing else about the requests looks new.

    Triage: compare `peak_sends_per_hour` with `median_sends_per_hour`; check `ips` and
    `user_agents` against the key's usual ones (the leaked_key and impossible-travel alerts cover
    new places). Ask the customer whether a campaign or an import was planned; if not, suspend or
    rotate the key, then look at what was sent (subjects, recipient domains) in the mail logs.
    Scheduled campaigns of big senders are bursts of minutes, which `min_duration` keeps quiet;
    a customer who runs multi-hour sends on purpose can be given a higher `factor` or allowlisted.

    Tuning: `factor` (default 10) and `mad_k` (default 8) set how far above normal; `min_sends`
    (default 20 an hour) and `min_recipients` (default 200 an hour) keep small keys from alerting
    over a few extra mails; `window` (default 15 min) and `min_duration` (default 45 min, so a
    20-minute campaign stays quiet however big); `min_history` (default 6 h: newer keys, e.g.
    right after a rotation, are not judged yet); `send_paths` (default ["/v3/mail/send"]). Score:
    the peak volume / its limit. Keys silent for the whole previous day are not judged either.
    """

    name: ClassVar[str] = "volume_spike"
    severity: ClassVar[Severity] = Severity.HIGH
    # HISTORY_HOURS before each hour judged, the day a replay step covers, and half a day so an
    # episode keeps its start (and its alert id) in every run that still sees it.
    lookback: ClassVar[timedelta] = timedelta(hours=HISTORY_HOURS + 24 + 12)
    mitre: ClassVar[str] = "T1078"

    factor: float = 10.0
    mad_k: float = 8.0
    min_sends: int = 20
    min_recipients: int = 200
    window: timedelta = timedelta(minutes=15)
    min_duration: timedelta = timedelta(minutes=45)
    min_history: timedelta = timedelta(hours=24)
    send_paths: tuple[str, ...] = field(default=("/v3/mail/send",))

    def __post_init__(self) -> None:
        self.factor = _positive_number(self.factor, "factor")
        self.mad_k = _positive_number(self.mad_k, "mad_k")
        self.min_sends = _whole(self.min_sends, "min_sends")
        self.min_recipients = _whole(self.min_recipients, "min_recipients")
        self.window = as_timedelta(self.window, "window")
        if self.window > timedelta(hours=1):
            raise ValueError(f"window: at most 1 h (the baseline is hourly), got {human(self.window)}")
        self.min_duration = as_timedelta(self.min_duration, "min_duration")
        self.min_history = as_timedelta(self.min_history, "min_history")
        if self.min_history > timedelta(hours=BASELINE_HOURS) or self.min_history.total_seconds() % 3600:
            raise ValueError(f"min_history: whole hours up to {BASELINE_HOURS} h, got {human(self.min_history)}")
        paths = self.send_paths
        if isinstance(paths, str) or not paths or not all(isinstance(p, str) and p.startswith("/") for p in paths):
            raise ValueError(f"send_paths: expected a list of paths such as ['/v3/mail/send'], got {paths!r}")
        self.send_paths = tuple(paths)

    def pushdown(self) -> Pushdown:
        """A key needs, in a window, sends or recipients over a lower bound of its limits: the floor,
        and `factor` times the median of the BASELINE_HOURS before (hours it did not exist in or
        that lie outside the frame counted as zeros, which only lowers the median); and it must
        have sent in the hours that make it judged. The database counts exactly what `_sends` counts."""
        sends = Rows(
            all_of=(Clause("api_key_id", "notnull"),),
            any_of=(*_path_clauses(self.send_paths), Clause("recipients", "notnull")),
            none_of=(Clause("outcome", "in", (Outcome.AUTH_FAILED.value, Outcome.FORBIDDEN.value)),),
        )
        measures = {"sends": Measure(sends), "recipients": Measure(sends, total="recipients")}
        return Pushdown(local=True, by="api_key_id", bucket=self.window, measures=measures, pick=self._candidates)

    def _candidates(self, table: pd.DataFrame) -> set:
        per_window = usec(self.window) / _HOUR_US
        floors = busy(table, "api_key_id", "sends", self.min_sends * per_window) | busy(
            table, "api_key_id", "recipients", self.min_recipients * per_window)
        width = int(self.window.total_seconds())
        if not floors or 3600 % width:
            return floors
        table = table[table["api_key_id"].isin(floors)].sort_values(["api_key_id", "bucket"])
        row, keys = pd.factorize(table["api_key_id"].to_numpy(dtype=object))
        keys = np.asarray(keys, dtype=object)
        hour = table["bucket"].to_numpy() // 3600
        first_hour = int(hour.min())
        column = hour - first_hour + HISTORY_HOURS  # HISTORY_HOURS of zeros before the first
        shape = (len(keys), int(column.max()) + 1)
        cell = row * shape[1] + column
        counts = {name: np.bincount(cell, weights=table[name].to_numpy(), minlength=shape[0] * shape[1]).reshape(shape)
                  for name in ("sends", "recipients")}
        # Judged: a send in [H - HISTORY_HOURS, H - min_history] (hours outside the frame never).
        earliest = HISTORY_HOURS - int(self.min_history.total_seconds() // 3600)
        history = np.lib.stride_tricks.sliding_window_view(counts["sends"] > 0, HISTORY_HOURS, axis=1)[:, :-1]
        judged = np.zeros(shape, dtype=bool)
        judged[:, HISTORY_HOURS:] = history[:, :, : earliest + 1].any(axis=2)
        baseline = slice(HISTORY_HOURS - BASELINE_HOURS, HISTORY_HOURS)
        # The trailing window at an event lies in its bucket and the one before.
        bucket = table["bucket"].to_numpy()
        adjacent = np.r_[False, (row[1:] == row[:-1]) & (np.diff(bucket) == width)]

        def over(name: str, floor: float) -> np.ndarray:
            """Rows whose two-bucket sum reaches a lower bound of the key's limit for `name`."""
            per_hour = counts[name]
            # The median's lower bound ignores the first hour: it may begin before the frame does.
            per_hour[:, HISTORY_HOURS] = 0.0
            low = np.zeros(shape)
            low[:, HISTORY_HOURS:] = np.median(
                np.lib.stride_tricks.sliding_window_view(per_hour, HISTORY_HOURS, axis=1)[:, :-1, baseline], axis=2)
            limit = np.where(judged, np.maximum.reduce([np.full(shape, float(floor)), self.factor * low,
                                                        np.ones(shape)]), np.inf)[row, column] * per_window
            values = table[name].to_numpy()
            return values + np.where(adjacent, np.r_[0.0, values[:-1]], 0.0) >= limit

        hot = over("sends", self.min_sends) | over("recipients", self.min_recipients)
        return set(keys[np.unique(row[hot])])

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty:
            return []
        sends = self._sends(events)
        if not sends.any():
            return []
        window_us = usec(self.window)
        key_codes, keys = entity_codes(events["api_key_id"])
        space = KeySpace.covering(times, len(keys), window_us)
        timeline = Timeline.build(key_codes, times, sends, space)
        recipients = events["recipients"].to_numpy(dtype=np.float64, na_value=0.0)[timeline.rows].astype(np.int64)
        sent, reached = _trailing_count_and_sum(timeline, recipients, window_us)

        # Limits can only be higher than the floors: events under the floors need no baseline.
        per_window = window_us / _HOUR_US
        over_floor = (sent >= self.min_sends * per_window) | (reached >= self.min_recipients * per_window)
        candidate = np.flatnonzero(over_floor)
        if len(candidate) == 0:
            return []
        hours = timeline.times // _HOUR_US
        first_known_hour = -(-known_from(times, now, self.lookback) // _HOUR_US)
        base = self._baselines(timeline, recipients, hours, candidate, first_known_hour)

        limit_sends = np.full(len(timeline), np.inf)
        limit_recipients = np.full(len(timeline), np.inf)
        limit_sends[candidate] = base["limit_sends"] * per_window
        limit_recipients[candidate] = base["limit_recipients"] * per_window
        ratio = np.maximum(sent / limit_sends, reached / limit_recipients)
        hot = ratio >= 1.0
        found = episodes(timeline, sent, hot, window_us)
        if found.empty:
            return []
        hot_for = timeline.times[found["last"].to_numpy()] - timeline.times[found["first_hot"].to_numpy()]
        lasting = hot_for >= usec(self.min_duration)
        if not lasting.any():
            return []

        # Peak ratio per episode: hot events come in timeline order, as do the episodes.
        hot_positions = np.flatnonzero(hot)
        owner = np.searchsorted(found["first_hot"].to_numpy(), hot_positions, "right") - 1
        peak_at = pd.Series(ratio[hot_positions]).groupby(owner).idxmax().to_numpy()
        found = found.assign(peak_ratio_pos=hot_positions[peak_at])[lasting].reset_index(drop=True)
        return self._alerts(events, timeline, keys, recipients, sent, reached, found, base, candidate, ratio)

    def _sends(self, events: pd.DataFrame) -> np.ndarray:
        """Sending requests made with a key: a send path or a recipient count, not refused."""
        pattern = "^(?:" + "|".join(re.escape(p.rstrip("/")) for p in self.send_paths) + ")(?:[/?]|$)"
        codes, paths = pd.factorize(events["path"], use_na_sentinel=True)
        on_path = np.append(pd.Series(paths, dtype="string").str.contains(pattern).to_numpy(dtype=bool), False)
        sending = on_path[codes] | as_mask(events["recipients"].notna())
        refused = as_mask(events["outcome"].isin([Outcome.AUTH_FAILED.value, Outcome.FORBIDDEN.value]))
        return sending & ~refused & as_mask(events["api_key_id"].notna())

    def _baselines(
        self,
        timeline: Timeline,
        recipients: np.ndarray,
        hours: np.ndarray,
        candidate: np.ndarray,
        first_known_hour: int,
    ) -> dict[str, np.ndarray]:
        """Median, MAD and limits of hourly sends and recipients before the hour of each candidate.

        The baseline of hour H is the key's hours in [H - 24 h, H), silent ones included, from its
        first send in the HISTORY_HOURS before H (fully known hours only). A key whose first send
        in them is less than `min_history` before H is not judged (infinite limits). Computed once
        per distinct (key, hour) of the candidates, on a key x hour grid of the candidate keys only.
        """
        pair_codes, pair_hours = timeline.codes[candidate], hours[candidate]
        # Candidates come in timeline order (key, then time), so keys and (key, hour) pairs are
        # runs: numbering them needs no sort.
        new_key = np.r_[True, pair_codes[1:] != pair_codes[:-1]]
        keys_of_pairs, key_row = pair_codes[new_key], np.cumsum(new_key) - 1
        new_pair = new_key | np.r_[True, pair_hours[1:] != pair_hours[:-1]]
        pair_of_candidate = np.cumsum(new_pair) - 1
        row, hour = key_row[new_pair], pair_hours[new_pair]
        lowest = max(int(pair_hours.min()) - HISTORY_HOURS, first_known_hour)
        width = max(int(pair_hours.max()) - lowest, 1)  # hours before the latest candidate hour
        is_candidate_key = np.zeros(int(timeline.codes.max()) + 1, dtype=bool)
        is_candidate_key[keys_of_pairs] = True
        mine = is_candidate_key[timeline.codes] & (hours >= first_known_hour)
        # Hourly sends and recipients of the candidate keys, one row per key, one column per hour.
        member = mine & (hours >= lowest) & (hours < lowest + width)
        rows = np.searchsorted(keys_of_pairs, timeline.codes[member])
        cells = rows * width + (hours[member] - lowest)
        size = len(keys_of_pairs) * width
        sends_grid = np.bincount(cells, minlength=size).reshape(len(keys_of_pairs), width)
        recipients_grid = np.bincount(cells, weights=recipients[member], minlength=size).reshape(sends_grid.shape)

        # The HISTORY_HOURS before each judged hour; the key's first send among them (known hours).
        span = (hour - lowest)[:, None] + np.arange(-HISTORY_HOURS, 0)[None, :]
        known = span >= 0
        sent_in = np.where(known, sends_grid[row[:, None], np.where(known, span, 0)], 0) > 0
        first = np.where(sent_in.any(axis=1), sent_in.argmax(axis=1), HISTORY_HOURS)
        history = HISTORY_HOURS - first
        # Hours before the key's first send are not zeros of its own: it did not exist yet (a new
        # key after a rotation), or they lie before the first fully known hour.
        offsets = np.arange(HISTORY_HOURS - BASELINE_HOURS, HISTORY_HOURS)
        columns = span[:, offsets]
        started = (offsets[None, :] >= first[:, None]) & known[:, offsets]
        safe = np.where(started, columns, 0)
        hourly_sends = np.where(started, sends_grid[row[:, None], safe], 0)
        hourly_recipients = np.where(started, recipients_grid[row[:, None], safe], 0.0)
        judged = history >= int(self.min_history.total_seconds() // 3600)

        median_s, mad_s = _median_mad(np.where(started, hourly_sends, np.nan), judged)
        median_r, mad_r = _median_mad(np.where(started, hourly_recipients, np.nan), judged)
        limit_s = np.maximum.reduce([np.full_like(median_s, self.min_sends), self.factor * median_s,
                                     median_s + self.mad_k * _MAD_TO_SIGMA * mad_s])
        limit_r = np.maximum.reduce([np.full_like(median_r, self.min_recipients), self.factor * median_r,
                                     median_r + self.mad_k * _MAD_TO_SIGMA * mad_r])
        # Zero limits (floors set to 0 and a silent key) would make every send hot: keep them >= 1.
        limit_s = np.where(judged, np.maximum(limit_s, 1.0), np.inf)
        limit_r = np.where(judged, np.maximum(limit_r, 1.0), np.inf)
        take = pair_of_candidate
        return {
            "limit_sends": limit_s[take],
            "limit_recipients": limit_r[take],
            "median_sends": median_s[take],
            "mad_sends": mad_s[take],
            "median_recipients": median_r[take],
            "mad_recipients": mad_r[take],
            "history_hours": history[take],
        }

    def _alerts(
        self,
        events: pd.DataFrame,
        timeline: Timeline,
        keys: np.ndarray,
        recipients: np.ndarray,
        sent: np.ndarray,
        reached: np.ndarray,
        found: pd.DataFrame,
        base: dict[str, np.ndarray],
        candidate: np.ndarray,
        ratio: np.ndarray,
    ) -> list[Alert]:
        n = len(found)
        episode, positions = episode_members(found)
        rows = timeline.rows[positions]
        ips = counts_per_episode(episode, events["source_ip"].iloc[rows], n)
        accounts = counts_per_episode(episode, events["account"].iloc[rows], n)
        agents = counts_per_episode(episode, events["user_agent"].iloc[rows], n, top=5)
        outcomes = counts_per_episode(episode, events["outcome"].iloc[rows], n)
        total_recipients = np.bincount(episode, weights=recipients[positions], minlength=n).astype(np.int64)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)
        index_of = np.full(len(timeline), -1)
        index_of[candidate] = np.arange(len(candidate))
        hourly = _HOUR_US / usec(self.window)

        alerts = []
        for i, ep in enumerate(found.to_dict("records")):
            first, first_hot, last, peak = ep["first"], ep["first_hot"], ep["last"], ep["peak_ratio_pos"]
            entity = str(keys[ep["code"]])
            at = index_of[peak]  # every hot event is a candidate
            duration = timedelta(microseconds=int(timeline.times[last] - timeline.times[first_hot]))
            median_sends = float(base["median_sends"][at])
            evidence = {
                "peak_at": iso(timeline.times[peak]),
                "peak_sends_per_hour": round(float(sent[peak] * hourly), 1),
                "peak_recipients_per_hour": round(float(reached[peak] * hourly), 1),
                "median_sends_per_hour": median_sends,
                "mad_sends_per_hour": float(base["mad_sends"][at]),
                "median_recipients_per_hour": float(base["median_recipients"][at]),
                "mad_recipients_per_hour": float(base["mad_recipients"][at]),
                "limit_sends_per_hour": round(float(base["limit_sends"][at]), 1),
                "limit_recipients_per_hour": round(float(base["limit_recipients"][at]), 1),
                "history_hours": int(base["history_hours"][at]),
                "window_seconds": int(self.window.total_seconds()),
                "hot_seconds": int(duration.total_seconds()),
                "sends": last - first + 1,
                "recipients": int(total_recipients[i]),
                "first_seen": iso(timeline.times[first]),
                "last_seen": iso(timeline.times[last]),
                "ips": ips[i],
                "accounts": accounts[i],
                "user_agents": agents[i],
                "outcomes": outcomes[i],
                "sample_event_ids": [e for e in event_ids[timeline.rows[spread_sample(first, last)]] if e is not None],
            }
            # The title names the volume that went furthest over its limit at the peak.
            by_recipients = reached[peak] / base["limit_recipients"][at] > sent[peak] / base["limit_sends"][at]
            what, rate, usual = (
                ("recipients", evidence["peak_recipients_per_hour"], evidence["median_recipients_per_hour"])
                if by_recipients
                else ("sends", evidence["peak_sends_per_hour"], median_sends)
            )
            title = (
                f"API key {entity}: {_rate(rate)} {what} an hour at peak (usually {_rate(usual)}), "
                f"over the limit for {_duration(duration)}"
            )
            alerts.append(
                Alert(
                    detector=self.name,
                    severity=self.severity,
                    entity_kind=EntityKind.API_KEY,
                    entity=entity,
                    window_start=bucket_floor(timeline.times[first]),
                    window_end=bucket_ceil(timeline.times[last]),
                    score=float(ratio[peak]),
                    title=title,
                    evidence=evidence,
                    mitre=self.mitre,
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, a.entity))


def _trailing_count_and_sum(timeline: Timeline, values: np.ndarray, window_us: int) -> tuple[np.ndarray, np.ndarray]:
    """Events and the sum of `values` (aligned with the timeline) in (t - window, t] of the same
    entity, at each event: one pair of searchsorted calls serves both."""
    width = timeline.space.width(window_us)
    high = np.searchsorted(timeline.keys, timeline.keys, "right")
    low = np.searchsorted(timeline.keys, timeline.keys - width, "right")
    total = np.concatenate([[0], np.cumsum(values)])
    return high - low, total[high] - total[low]


def _median_mad(values: np.ndarray, judged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise median and median absolute deviation, ignoring NaN; zeros for rows not judged."""
    median = np.zeros(len(values))
    mad = np.zeros(len(values))
    if judged.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rows are never all-NaN when judged
            median[judged] = np.nanmedian(values[judged], axis=1)
            mad[judged] = np.nanmedian(np.abs(values[judged] - median[judged, None]), axis=1)
    return median, mad


def _rate(value: float) -> str:
    """"4.5", "12", "1,480": hourly rates as titles say them."""
    return f"{value:.1f}".removesuffix(".0") if value < 10 else f"{value:,.0f}"


def _duration(duration: timedelta) -> str:
    minutes = int(duration.total_seconds() // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _path_clauses(paths: tuple[str, ...]) -> tuple[Clause, ...]:
    """`_sends`' path pattern as clauses: the path itself, or it followed by `/` or `?`."""
    clauses: list[Clause] = []
    for path in paths:
        path = path.rstrip("/")
        clauses += [Clause("path", "eq", path), Clause("path", "prefix", path + "/"), Clause("path", "prefix", path + "?")]
    return tuple(clauses)
