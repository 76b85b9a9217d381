"""Isolation-forest detectors: what the two models share (fitting, thresholds, episodes, explanations).

A model detector scores one row per (entity, time bucket) of `detectors.features.entity_windows`.
It runs in one of two modes:

- trained: `fit(history)` (the `mailwarden train` job) learned a forest and its threshold on a long
  baseline; `detect` scores every complete bucket whose `history` lies in the frame;
- self-fit: nothing was trained, so `detect` fits on the earlier part of its own input. Time is cut
  into epoch-aligned blocks of `block`; the buckets of one block are scored by a forest fitted on the
  `training` period right before the block starts. That period is in the past for every bucket of
  the block, so a live tick and a replay fit the same forest on the same rows and flag the same
  buckets: alert ids do not depend on when detection ran. A block is scored only when the frame
  reaches back over its training period and the history of its first training row.

Both modes flag a bucket when its score reaches the threshold and it has at least `min_requests`
events. Hot buckets of one entity less than three buckets apart make one episode, one alert, once
the episode has `min_hot_buckets` hot buckets.

Self-fitting costs a forest per block, so the detect job only does it when `self_fit` is true;
otherwise an untrained model stays quiet until `mailwarden train` has stored one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Collection
from abc import abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.features import Windows, spread_sample, to_timestamp
from detectors.pushdown import SKIP, Measure, Pushdown, Rows
from detectors.rules import as_timedelta, frame_first, iso, positive_int, up_to_now, usec
from pipeline.schema import Alert, EntityKind

# Features whose spread is multiplicative (counts, sums, ratios to a usual level): the forest and
# the explanations see them through log1p, so 10 -> 100 weighs like 100 -> 1,000.
LOG_FEATURES = frozenset(
    {
        "requests", "recipients", "bytes", "volume_vs_usual", "distinct_paths", "distinct_keys",
        "distinct_accounts", "distinct_ips", "distinct_user_agents",
    }
)
# Shares in [0, 1], shown with two decimals.
SHARE_FEATURES = frozenset({"failure_ratio", "error_ratio", "new_ip_share"})
# Never offered as the reason an alert stands out: the hour has no "usual" worth printing, and a new
# entity is said in the title instead.
NOT_EXPLAINED = frozenset({"hour", "first_seen"})
# Smallest spread an explanation divides by, so a feature that never varied in training (IQR 0)
# does not make a tiny change look enormous.
_SPREAD_FLOOR = {"log": 0.5, "share": 0.15, "other": 0.5}

# Buckets of one entity whose starts are at most this many buckets apart belong to one episode.
MERGE_BUCKETS = 2
# Fewer training rows than this and a fit is not trusted: the detector stays quiet instead.
MIN_TRAINING_ROWS = 50
# Training scores examined for the threshold: a deterministic, evenly spread subsample beyond this.
THRESHOLD_SAMPLE = 50_000


def transform(table: pd.DataFrame, features: tuple[str, ...]) -> np.ndarray:
    """The matrix the forest sees: log1p of the multiplicative features, the others as they are."""
    columns = []
    for name in features:
        values = table[name].to_numpy(dtype=np.float64)
        columns.append(np.log1p(values) if name in LOG_FEATURES else values)
    return np.column_stack(columns) if columns else np.zeros((len(table), 0))


def _spread_floor(name: str) -> float:
    if name in LOG_FEATURES:
        return _SPREAD_FLOOR["log"]
    if name in SHARE_FEATURES:
        return _SPREAD_FLOOR["share"]
    return _SPREAD_FLOOR["other"]


@dataclass
class ModelState:
    """What one fit learned. Pickled into the `models` table by pipeline.models_store.

    `threshold` is the `quantile` of the training scores plus `margin`: it needs no guess of how much
    of the training data is attack (the `contamination` of scikit-learn), only how rare a row must be.
    `spread` (IQR of each transformed feature) and `typical` (median raw value) come from the same
    rows and serve the explanations.
    """

    forest: Any  # sklearn.ensemble.IsolationForest
    threshold: float
    quantile_score: float
    features: tuple[str, ...]
    spread: np.ndarray
    typical: np.ndarray
    rows: int
    shape: dict[str, Any]
    trained_from: str | None = None
    trained_to: str | None = None
    sklearn_version: str = ""

    def score(self, matrix: np.ndarray) -> np.ndarray:
        # scikit-learn's score_samples is high for normal rows and low for outliers; every mailwarden
        # score is higher-is-worse. This is the one place the direction flips.
        return -self.forest.score_samples(matrix)


def fit_state(
    rows: pd.DataFrame,
    features: tuple[str, ...],
    shape: dict[str, Any],
    *,
    quantile: float,
    margin: float,
    trees: int,
    max_samples: int,
    seed: int,
) -> ModelState | None:
    """Fit a forest on `rows` (already in a canonical order) and derive its threshold; None when
    there are too few rows to trust."""
    import sklearn
    from sklearn.ensemble import IsolationForest

    if len(rows) < MIN_TRAINING_ROWS:
        return None
    matrix = transform(rows, features)
    forest = IsolationForest(
        n_estimators=trees, max_samples=min(max_samples, len(rows)), random_state=seed, n_jobs=1
    ).fit(matrix)
    state = ModelState(
        forest=forest,
        threshold=0.0,
        quantile_score=0.0,
        features=features,
        spread=np.maximum(
            np.subtract(*np.percentile(matrix, [75, 25], axis=0)),
            np.array([_spread_floor(f) for f in features]),
        ),
        typical=np.median(rows[list(features)].to_numpy(dtype=np.float64), axis=0),
        rows=len(rows),
        shape=dict(shape),
        sklearn_version=sklearn.__version__,
    )
    sample = matrix
    if len(matrix) > THRESHOLD_SAMPLE:
        sample = matrix[np.linspace(0, len(matrix) - 1, THRESHOLD_SAMPLE).round().astype(np.int64)]
    state.quantile_score = float(np.quantile(state.score(sample), quantile))
    state.threshold = state.quantile_score + margin
    return state


# Self-fit forests by (detector, parameters, block, digest of the training matrix). Within a block
# every tick fits the same forest on the same rows; the cache makes that one fit instead of one per
# tick. The digest keys on the data itself, so a changed input can never reuse a stale forest.
_CACHE: OrderedDict[tuple, ModelState | None] = OrderedDict()
_CACHE_SIZE = 32
_CACHE_LOCK = threading.Lock()


@dataclass
class IsolationForestDetector(Detector):
    """Base of the model detectors; subclasses set `features`, `windows` and the wording."""

    features: ClassVar[tuple[str, ...]]
    # What the windows are per (a pushdown entity) and which of its events they count.
    entity_column: ClassVar[str]
    counted: ClassVar[Rows] = Rows()
    # Long enough for a block's training period, the history of its first training row, the block
    # itself and a few hours more, so an episode still running is seen from its first bucket.
    lookback: ClassVar[timedelta] = timedelta(hours=36)

    bucket: timedelta = timedelta(minutes=10)
    history: timedelta = timedelta(hours=6)
    training: timedelta = timedelta(hours=24)
    block: timedelta = timedelta(hours=3)
    quantile: float = 0.999
    margin: float = 0.05
    min_requests: int = 10
    trees: int = 100
    max_samples: int = 256
    seed: int = 0
    min_hot_buckets: int = 1
    self_fit: bool = False

    def __post_init__(self) -> None:
        # Learned state (not a parameter, so not a dataclass field): set by `fit` or models_store.
        self.model_: ModelState | None = None
        for name in ("bucket", "history", "training", "block"):
            setattr(self, name, as_timedelta(getattr(self, name), name))
        bucket = usec(self.bucket)
        if bucket % 60_000_000:
            raise ValueError(f"bucket: must be whole minutes, got {self.bucket}")
        for name in ("history", "training", "block"):
            if usec(getattr(self, name)) % bucket:
                raise ValueError(f"{name}: must be a whole number of buckets ({self.bucket}), got {getattr(self, name)}")
        need = self.training + self.history + self.block + self.bucket * (MERGE_BUCKETS + 1)
        if need > self.lookback:
            raise ValueError(
                f"training + history + block must leave room in the {self.lookback} lookback, "
                f"got {self.training} + {self.history} + {self.block}"
            )
        for name in ("quantile",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value < 1:
                raise ValueError(f"{name}: expected a number in [0.5, 1), got {value!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or self.margin < 0:
            raise ValueError(f"margin: expected a number >= 0, got {self.margin!r}")
        self.quantile, self.margin = float(self.quantile), float(self.margin)
        self.min_requests = positive_int(self.min_requests, "min_requests")
        self.min_hot_buckets = positive_int(self.min_hot_buckets, "min_hot_buckets")
        if not isinstance(self.self_fit, bool):
            raise ValueError(f"self_fit: expected true or false, got {self.self_fit!r}")
        self.trees = positive_int(self.trees, "trees")
        self.max_samples = positive_int(self.max_samples, "max_samples")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected a whole number, got {self.seed!r}")

    # -- hooks for the subclasses (iforest_ip, iforest_key) ----------------------------------------
    @abstractmethod
    def windows(self, events: pd.DataFrame, times: np.ndarray) -> Windows:
        """The per-entity, per-bucket feature table the forest scores."""

    @abstractmethod
    def entity(self, label: str) -> tuple[EntityKind, str]:
        """The alert's entity kind and value for a window's entity label."""

    @abstractmethod
    def what(self, kind: EntityKind, entity: str) -> str:
        """How the title names the entity, e.g. "IP 203.0.113.9"."""

    def extra_evidence(self, members: pd.DataFrame) -> dict[str, Any]:
        """Triage details from the episode's events (top paths, addresses…)."""
        return {}

    # -- shared ---------------------------------------------------------------------------------
    @property
    def shape(self) -> dict[str, Any]:
        """The parameters that shape the features: a trained model is only valid with the same."""
        return {"bucket_seconds": int(self.bucket.total_seconds()),
                "history_seconds": int(self.history.total_seconds())}

    def params(self) -> dict[str, Any]:
        """Every parameter, JSON-ready (durations in seconds)."""
        out: dict[str, Any] = {}
        for name in ("bucket", "history", "training", "block"):
            out[f"{name}_seconds"] = int(getattr(self, name).total_seconds())
        for name in ("quantile", "margin", "min_requests", "trees", "max_samples", "seed", "min_hot_buckets"):
            out[name] = getattr(self, name)
        return out

    def _fit_rows(self, rows: pd.DataFrame) -> ModelState | None:
        return fit_state(
            rows, self.features, self.shape, quantile=self.quantile, margin=self.margin,
            trees=self.trees, max_samples=self.max_samples, seed=self.seed,
        )

    def fit(
        self,
        history: pd.DataFrame,
        exclude: Collection[tuple[str, tuple[datetime, datetime]]] | None = None,
    ) -> IsolationForestDetector:
        """Learn the forest and threshold from `history`, leaving out the rows in `exclude`.

        `exclude` holds (entity, (start, end)) pairs, typically the windows already alerted on: the
        buckets of that entity overlapping [start, end) do not train the model, so an attack seen
        before is not learned as normal. Only complete buckets whose own history lies inside
        `history` are used. Too little data leaves the detector untrained (self-fit at detect time).
        """
        self.model_ = None
        if history.empty:
            return self
        events, times = up_to_now(history, to_timestamp(int(_max_time(history))).to_pydatetime())
        if events.empty:
            return self
        windows = self.windows(events, times)
        table = windows.table
        bucket, hist = usec(self.bucket), usec(self.history)
        start = table["bucket"].to_numpy() * bucket
        usable = (start - hist >= int(times.min())) & (start + bucket <= int(times.max()))
        if exclude:
            usable &= ~self._excluded(table, windows.labels, exclude)
        rows = table[usable]
        self.model_ = self._fit_rows(rows)
        if self.model_ is not None:
            self.model_.trained_from = iso(int(start[usable].min()))
            self.model_.trained_to = iso(int(start[usable].max()) + bucket)
        return self

    def _excluded(
        self, table: pd.DataFrame, labels: np.ndarray, exclude: Collection[tuple[str, tuple[datetime, datetime]]]
    ) -> np.ndarray:
        entity_of_code = np.array([self.entity(str(label))[1] for label in labels], dtype=object)
        windows: dict[str, list[tuple[int, int]]] = {}
        for entity, (begin, end) in exclude:
            windows.setdefault(str(entity), []).append(
                (usec(pd.Timestamp(begin) - pd.Timestamp(0, tz="UTC")),
                 usec(pd.Timestamp(end) - pd.Timestamp(0, tz="UTC")))
            )
        bucket = usec(self.bucket)
        entity = entity_of_code[table["code"].to_numpy()]
        start = table["bucket"].to_numpy() * bucket
        out = np.zeros(len(table), dtype=bool)
        for i in np.flatnonzero(np.isin(entity, list(windows))):
            out[i] = any(start[i] < end and start[i] + bucket > begin for begin, end in windows[entity[i]])
        return out

    def pushdown(self) -> Pushdown | None:
        """Untrained and not self-fitting, a model is quiet: nothing to load. Trained, it scores each
        entity's windows alone against a fixed threshold, so an entity needs `min_requests` counted
        events in a bucket, and the candidates may run in groups (`local`). Self-fitting on the
        input (no stored model) learns from every entity: the whole frame."""
        if self.model_ is None:
            return None if self.self_fit else SKIP
        need = self.min_requests
        by = self.entity_column

        def pick(table: pd.DataFrame) -> set:
            return set(table.loc[table["requests"].to_numpy() >= need, by])

        return Pushdown(by=by, bucket=self.bucket, measures={"requests": Measure(self.counted)}, pick=pick, local=True)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty or (self.model_ is None and not self.self_fit):
            return []
        windows = self.windows(events, times)
        table = windows.table
        if table.empty:
            return []
        bucket, hist = usec(self.bucket), usec(self.history)
        data_start = frame_first(times)
        now_us = usec(pd.Timestamp(now) - pd.Timestamp(0, tz="UTC"))
        start = table["bucket"].to_numpy() * bucket
        complete = start + bucket <= now_us
        score = np.full(len(table), np.nan)
        threshold = np.full(len(table), np.nan)
        states: dict[int, ModelState] = {}
        block_of_row = np.zeros(len(table), dtype=np.int64)
        if self.model_ is not None:
            first_scorable = -(-(data_start + hist) // bucket) * bucket
            candidates = np.flatnonzero(complete & (start - hist >= data_start))
            if len(candidates):
                score[candidates] = self.model_.score(transform(table.iloc[candidates], self.features))
                threshold[candidates] = self.model_.threshold
            states[0] = self.model_
        else:
            block, training = usec(self.block), usec(self.training)
            block_start = np.floor_divide(start, block) * block
            first_scorable = -(-(data_start + training + hist) // block) * block
            scorable = complete & (block_start >= first_scorable)
            for begin in np.unique(block_start[scorable]):
                train = (start >= begin - training) & (start < begin)
                state = self._block_state(int(begin), table[train])
                if state is None:
                    continue
                rows = np.flatnonzero(scorable & (block_start == begin))
                score[rows] = state.score(transform(table.iloc[rows], self.features))
                threshold[rows] = state.threshold
                states[int(begin)] = state
                block_of_row[rows] = begin
        requests = table["requests"].to_numpy()
        hot = np.flatnonzero((score >= threshold) & (requests >= self.min_requests))
        if len(hot) == 0:
            return []
        return self._alerts(events, times, windows, hot, score, threshold, block_of_row, states,
                            first_scorable)

    def _block_state(self, begin: int, rows: pd.DataFrame) -> ModelState | None:
        matrix = transform(rows, self.features)
        digest = hashlib.blake2b(np.ascontiguousarray(matrix).tobytes(), digest_size=16).hexdigest()
        key = (type(self).__name__, tuple(sorted(self.params().items())), begin, len(rows), digest)
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
        state = self._fit_rows(rows)
        if state is not None:
            state.trained_from = iso(begin - usec(self.training))
            state.trained_to = iso(begin)
        with _CACHE_LOCK:
            _CACHE[key] = state
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return state

    def _alerts(
        self,
        events: pd.DataFrame,
        times: np.ndarray,
        windows: Windows,
        hot: np.ndarray,
        score: np.ndarray,
        threshold: np.ndarray,
        block_of_row: np.ndarray,
        states: dict[int, ModelState],
        first_scorable: int,
    ) -> list[Alert]:
        table = windows.table
        bucket = usec(self.bucket)
        codes = table["code"].to_numpy()[hot]
        buckets = table["bucket"].to_numpy()[hot]
        new = np.ones(len(hot), dtype=bool)
        new[1:] = (codes[1:] != codes[:-1]) | (buckets[1:] - buckets[:-1] > MERGE_BUCKETS)
        episode = np.cumsum(new) - 1
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)
        event_bucket = np.floor_divide(times, bucket)
        alerts = []
        for ep in range(int(episode[-1]) + 1):
            members = hot[episode == ep]
            first_bucket = int(table["bucket"].iat[members[0]])
            last_bucket = int(table["bucket"].iat[members[-1]])
            # A bucket within merging reach before the first hot one was not scored in this run: the
            # episode may have begun there, so only a run that saw that bucket may report it (with
            # the start, and so the alert id, every run agrees on).
            if (first_bucket - MERGE_BUCKETS) * bucket < first_scorable:
                continue
            # One odd bucket of a busy customer is everyday noise; a taken-over credential stays odd.
            # Later runs see the episode grow and report it with the same first bucket (same id).
            if len(members) < self.min_hot_buckets:
                continue
            ratio = score[members] / threshold[members]
            peak = members[int(np.argmax(ratio))]
            code = int(table["code"].iat[peak])
            kind, entity = self.entity(str(windows.labels[code]))
            state = states[0] if self.model_ is not None else states[int(block_of_row[peak])]
            in_episode = np.flatnonzero(
                windows.keep & (windows.codes == code)
                & (event_bucket >= first_bucket) & (event_bucket <= last_bucket)
            )
            in_episode = in_episode[np.argsort(times[in_episode], kind="stable")]
            alerts.append(
                self._alert(
                    kind, entity, table, peak, state, float(score[peak]), float(ratio.max()),
                    first_bucket, last_bucket, len(members), events.iloc[in_episode],
                    times[in_episode], event_ids[in_episode],
                )
            )
        return sorted(alerts, key=lambda a: (a.window_start, str(a.entity_kind), a.entity))

    def _alert(
        self,
        kind: EntityKind,
        entity: str,
        table: pd.DataFrame,
        peak: int,
        state: ModelState,
        peak_score: float,
        ratio: float,
        first_bucket: int,
        last_bucket: int,
        hot_buckets: int,
        members: pd.DataFrame,
        member_times: np.ndarray,
        member_ids: np.ndarray,
    ) -> Alert:
        bucket = usec(self.bucket)
        row = table.iloc[peak]
        values = {name: float(row[name]) for name in self.features}
        usual, baseline = self._usual(table, peak, state)
        standing = self._standing_out(values, usual, state)
        new_entity = values.get("first_seen", 0.0) >= 1.0
        word = "usual" if baseline == "own" else "typical"
        reasons = ", ".join(
            f"{name} {_fmt(name, values[name])} ({word} {_fmt(name, usual[name])})" for name in standing
        )
        title = f"{self.what(kind, entity)}{' (new)' if new_entity else ''}: unusual {self.bucket_words()} — {reasons}"
        sample = spread_sample(0, len(members) - 1) if len(members) else np.zeros(0, dtype=np.int64)
        evidence: dict[str, Any] = {
            "model": "trained" if self.model_ is not None else "self-fit",
            "trained_from": state.trained_from,
            "trained_to": state.trained_to,
            "score": round(peak_score, 4),
            "threshold": round(float(state.threshold), 4),
            "peak_bucket": iso(int(row["bucket"]) * bucket),
            "bucket_seconds": int(self.bucket.total_seconds()),
            "hot_buckets": hot_buckets,
            "baseline": baseline,
            "history_seconds": int(self.history.total_seconds()),
            "new_entity": bool(new_entity),
            "standing_out": list(standing),
            "features": {name: _plain(values[name]) for name in self.features},
            word: {name: _plain(usual[name]) for name in self.features},
            "requests": int(len(members)),
            "first_seen": iso(int(member_times[0])) if len(member_times) else None,
            "last_seen": iso(int(member_times[-1])) if len(member_times) else None,
            **self.extra_evidence(members),
            "sample_event_ids": [e for e in member_ids[sample] if e is not None],
        }
        return Alert(
            detector=self.name,
            severity=self.severity,
            entity_kind=kind,
            entity=entity,
            window_start=to_timestamp(first_bucket * bucket).to_pydatetime(),
            window_end=to_timestamp((last_bucket + 1) * bucket).to_pydatetime(),
            score=round(ratio, 4),
            title=title,
            evidence=evidence,
            mitre=getattr(self, "mitre", None),
        )

    def bucket_words(self) -> str:
        minutes = int(self.bucket.total_seconds() // 60)
        return f"{minutes} min" if minutes % 60 else f"{minutes // 60} h"

    def _usual(self, table: pd.DataFrame, peak: int, state: ModelState) -> tuple[dict[str, float], str]:
        """The entity's own median over the buckets of its history, else the population's."""
        code = table["code"].iat[peak]
        at = table["bucket"].iat[peak]
        history_buckets = usec(self.history) // usec(self.bucket)
        # Rows are sorted by (code, bucket): the entity's history is just before the peak row.
        lo = peak
        while lo > 0 and table["code"].iat[lo - 1] == code and table["bucket"].iat[lo - 1] >= at - history_buckets:
            lo -= 1
        if lo < peak:
            past = table.iloc[lo:peak]
            return {name: float(past[name].median()) for name in self.features}, "own"
        return {name: float(v) for name, v in zip(self.features, state.typical, strict=True)}, "population"

    def _standing_out(self, values: dict[str, float], usual: dict[str, float], state: ModelState) -> list[str]:
        """Up to three features furthest from usual, in units of the training spread."""
        distance = {}
        for i, name in enumerate(self.features):
            if name in NOT_EXPLAINED:
                continue
            a, b = values[name], usual[name]
            if name in LOG_FEATURES:
                a, b = np.log1p(a), np.log1p(b)
            distance[name] = abs(a - b) / float(state.spread[i])
        ranked = sorted(distance, key=lambda n: (-distance[n], n))
        chosen = [n for n in ranked[:3] if distance[n] >= 1.0]
        return chosen or ranked[:1]


def _fmt(name: str, value: float) -> str:
    if name in SHARE_FEATURES:
        return f"{value:.2f}"
    if name == "volume_vs_usual":
        return f"{value:.1f}"
    return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 else f"{value:,.1f}"


def _plain(value: float) -> float | int:
    """JSON-friendly: whole numbers as int, others rounded."""
    if abs(value - round(value)) < 1e-9:
        return int(round(value))
    return round(float(value), 4)


def _max_time(frame: pd.DataFrame) -> int:
    from detectors.features import micros

    times = micros(frame["ts"])
    valid = times[times != np.iinfo(np.int64).min]
    return int(valid.max()) if len(valid) else 0


def counts(values: pd.Series, top: int | None = None) -> dict[str, int]:
    """Value counts, most frequent first, ties by value: evidence that reads the same every run."""
    series = values.dropna().astype(str)
    if series.empty:
        return {}
    table = series.value_counts().rename_axis("value").reset_index(name="n")
    table = table.sort_values(["n", "value"], ascending=[False, True])
    if top is not None:
        table = table.head(top)
    return {str(v): int(n) for v, n in zip(table["value"], table["n"], strict=True)}
