"""Window features shared by rules, models and notebooks: per-entity counts over time, vectorised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.schema import EVENT_COLUMNS, Outcome, pandas_dtypes

US_PER_SECOND = 1_000_000
# Alert windows are reported on whole minutes: readable, and the same burst read by a live run and by a
# replay lands on the same window_start (and so the same alert id).
BUCKET_US = 60 * US_PER_SECOND
_INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------
# Frames


def conform_events(frame: pd.DataFrame) -> pd.DataFrame:
    """The event columns in schema order and dtypes; columns the frame lacks become nulls.

    For frames built by hand (tests, notebooks, generated data); the store already returns this shape.
    """
    dtypes = pandas_dtypes()
    columns = {}
    for name, dtype in dtypes.items():
        if name not in frame.columns:
            columns[name] = pd.Series(pd.NA, index=frame.index, dtype=dtype)
        elif name == "ts":
            columns[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601").astype(dtype)
        else:
            columns[name] = frame[name].astype(dtype)
    return pd.DataFrame(columns, index=frame.index)[list(EVENT_COLUMNS)]


def micros(ts: pd.Series) -> np.ndarray:
    """Microseconds since the epoch (UTC) of a tz-aware datetime column, as int64."""
    array = ts.array
    if getattr(array, "unit", "us") != "us":
        array = array.as_unit("us")
    return np.asarray(array.asi8, dtype=np.int64)


def as_mask(values: pd.Series) -> np.ndarray:
    """A nullable boolean column as a plain numpy mask (null counts as False)."""
    return values.to_numpy(dtype=bool, na_value=False)


def to_timestamp(us: int) -> pd.Timestamp:
    return pd.Timestamp(int(us), unit="us", tz="UTC")


def bucket_counts(
    events: pd.DataFrame, by: str, freq: str = "1min", where: pd.Series | None = None
) -> pd.DataFrame:
    """Events per (entity, time bucket): columns `by`, `bucket`, `events`; empty buckets absent."""
    frame = events if where is None else events[as_mask(where)]
    return (
        frame.groupby([frame[by], frame["ts"].dt.floor(freq).rename("bucket")], observed=True)
        .size()
        .rename("events")
        .reset_index()
    )


def window_features(events: pd.DataFrame, by: str = "source_ip", freq: str = "10min") -> pd.DataFrame:
    """One row per (entity, time bucket) with the counts models and notebooks start from.

    Columns: `by`, `bucket`, requests, auth_failures, failure_ratio, distinct_accounts,
    distinct_api_keys, distinct_paths, distinct_ips. Buckets are aligned to the epoch (floor), so
    the same events always fall into the same buckets whatever window the caller loaded.
    """
    frame = events.assign(
        bucket=events["ts"].dt.floor(freq),
        failed=as_mask(events["outcome"].eq(Outcome.AUTH_FAILED)),
    )
    features = (
        frame.groupby([by, "bucket"], observed=True, sort=True)
        .agg(
            requests=("ts", "size"),
            auth_failures=("failed", "sum"),
            distinct_accounts=("account", "nunique"),
            distinct_api_keys=("api_key_id", "nunique"),
            distinct_paths=("path", "nunique"),
            distinct_ips=("source_ip", "nunique"),
        )
        .reset_index()
    )
    return features.assign(failure_ratio=features["auth_failures"] / features["requests"])


# ---------------------------------------------------------------------------------------------
# Sliding windows over exact event times
#
# A rolling sum over 1-minute buckets misses bursts that straddle bucket edges (600 requests from
# 10:02:30 to 10:07:30 never put 600 into five whole minutes), and resampling per entity is slow.
# Instead every event gets one int64 key packing (entity, time); after one sort, np.searchsorted
# answers "how many events of the same entity in (t - w, t]" for every event of every entity at once.


@dataclass(frozen=True)
class KeySpace:
    """Packs (entity code, time) into one int64 that sorts by entity, then time.

    Each entity owns the key range [code * span, (code + 1) * span); times are offset by `pad` so
    that `key - window` and `key + window` stay inside the entity's range. `tick` is the time
    resolution in microseconds: 1 unless so many entities are present that keys would overflow.
    """

    origin: int
    pad: int
    span: int
    tick: int

    @classmethod
    def covering(cls, times_us: np.ndarray, n_codes: int, max_window_us: int) -> KeySpace:
        low = int(times_us.min()) if len(times_us) else 0
        high = int(times_us.max()) if len(times_us) else 0
        for tick in (1, 1_000, US_PER_SECOND):
            pad = -(-max_window_us // tick) + 1
            span = (high - low) // tick + 2 * pad + 1
            if span * (max(n_codes, 1) + 1) < _INT64_MAX:
                return cls(origin=low, pad=pad, span=span, tick=tick)
        raise ValueError(f"{n_codes} entities over {(high - low) / 86_400e6:.0f} days: too many to key")

    def pack(self, codes: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        return codes.astype(np.int64) * self.span + ((times_us - self.origin) // self.tick + self.pad)

    def width(self, window_us: int) -> int:
        return -(-window_us // self.tick)


@dataclass(frozen=True)
class Timeline:
    """Events of one entity kind sorted by (entity, time); positions refer back to the frame."""

    rows: np.ndarray  # iloc positions in the source frame, in sorted order
    codes: np.ndarray  # entity code of each sorted event
    times: np.ndarray  # µs since the epoch of each sorted event
    keys: np.ndarray  # packed (entity, time), ascending
    space: KeySpace

    @classmethod
    def build(
        cls, codes: np.ndarray, times_us: np.ndarray, mask: np.ndarray | None, space: KeySpace
    ) -> Timeline:
        """Timeline of the events where `mask` holds and the entity is known (code >= 0)."""
        keep = codes >= 0 if mask is None else mask & (codes >= 0)
        rows = np.flatnonzero(keep)
        keys = space.pack(codes[rows], times_us[rows])
        # Stable, so events with equal keys keep their frame order and reruns give the same evidence.
        order = np.argsort(keys, kind="stable")
        return cls(rows=rows[order], codes=codes[rows][order], times=times_us[rows][order],
                   keys=keys[order], space=space)

    def __len__(self) -> int:
        return len(self.rows)

    def trailing_count(self, window_us: int, at: np.ndarray | None = None) -> np.ndarray:
        """Events of this timeline in (t - window, t] of the same entity, at each packed key of `at`
        (default: at each of its own events, so the event itself is counted)."""
        at = self.keys if at is None else at
        width = self.space.width(window_us)
        return np.searchsorted(self.keys, at, "right") - np.searchsorted(self.keys, at - width, "right")

    def trailing_distinct(self, items: np.ndarray, window_us: int) -> np.ndarray:
        """Distinct `items` (int codes per sorted event, >= 0) of the same entity in (t - window, t],
        at each of this timeline's events.

        An occurrence at t is inside the windows ending in [t, t + w). Clipping each occurrence's
        span at the next occurrence of the same (entity, item) makes the spans of one pair disjoint,
        so the number of spans covering a point is the number of distinct items there: started spans
        minus ended spans, two searchsorted calls.
        """
        width = self.space.width(window_us)
        order = np.lexsort((self.keys, items, self.codes))
        codes, pair_items, keys = self.codes[order], items[order], self.keys[order]
        starts = keys
        ends = keys + width
        same_pair_next = (codes[1:] == codes[:-1]) & (pair_items[1:] == pair_items[:-1])
        ends[:-1] = np.where(same_pair_next, np.minimum(ends[:-1], keys[1:]), ends[:-1])
        started = np.searchsorted(np.sort(starts), self.keys, "right")
        ended = np.searchsorted(np.sort(ends), self.keys, "right")
        return started - ended

    def window_start(self, positions: np.ndarray, window_us: int) -> np.ndarray:
        """Position of the first event in the window (t - window, t] ending at each position."""
        return np.searchsorted(self.keys, self.keys[positions] - self.space.width(window_us), "right")


def entity_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer code per row (-1 for null) and the entity label of each code."""
    codes, labels = pd.factorize(values, use_na_sentinel=True)
    return codes.astype(np.int64), np.asarray(labels, dtype=object)


def episodes(
    timeline: Timeline, value: np.ndarray, hot: np.ndarray, window_us: int, known_us: int | None = None
) -> pd.DataFrame:
    """Group the hot events of each entity into episodes, one row per episode.

    Hot events of one entity belong to the same episode while less than a window apart. An episode
    starts at the first event of the first window that went over the threshold and ends at its last
    hot event, so a later `now` that still sees the episode gives the same start (and alert id).
    With `known_us` (the start of what the frame is known to hold, see detectors.rules.known_from),
    only episodes whose first hot event has two windows of known time before it are kept: a hot
    event in the window before it, which would make it a continuation, depends on the window
    before that. An attack running since before the frame then keeps the start (and id) an earlier
    run gave it, instead of appearing to begin where the frame does.
    Columns: code, first, first_hot, last, peak, peak_pos (positions in timeline order).
    """
    found = _episodes(timeline, value, hot, window_us)
    if known_us is None or found.empty:
        return found
    confirmed = timeline.times[found["first_hot"].to_numpy()] - 2 * window_us >= known_us
    return found[confirmed].reset_index(drop=True)


def _episodes(timeline: Timeline, value: np.ndarray, hot: np.ndarray, window_us: int) -> pd.DataFrame:
    positions = np.flatnonzero(hot)
    if len(positions) == 0:
        return pd.DataFrame(
            {c: pd.Series(dtype=np.int64) for c in ("code", "first", "first_hot", "last", "peak", "peak_pos")}
        )
    codes = timeline.codes[positions]
    keys = timeline.keys[positions]
    new = np.ones(len(positions), dtype=bool)
    new[1:] = (codes[1:] != codes[:-1]) | (keys[1:] - keys[:-1] >= timeline.space.width(window_us))
    episode = np.cumsum(new) - 1
    values = value[positions]
    # Highest value per episode, earliest on ties: sort by (episode, -value, position).
    best = np.lexsort((positions, -values, episode))
    best_first = best[np.r_[True, episode[best][1:] != episode[best][:-1]]]
    first_hot = positions[new]
    last = positions[np.r_[new[1:], True]]
    return pd.DataFrame(
        {
            "code": codes[new],
            "first": timeline.window_start(first_hot, window_us),
            "first_hot": first_hot,
            "last": last,
            "peak": values[best_first].astype(np.int64),
            "peak_pos": positions[best_first],
        }
    )


def episode_members(found: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(episode number, timeline position) for every event from `first` to `last` of each episode."""
    lengths = (found["last"] - found["first"] + 1).to_numpy()
    episode = np.repeat(np.arange(len(found)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return episode, np.repeat(found["first"].to_numpy(), lengths) + offsets


def follow_ups(
    timeline: Timeline, found: pd.DataFrame, codes: np.ndarray, times_us: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Frame positions of the events (where `mask` holds) that came after an episode began, and the
    episode each belongs to: the latest episode of the same entity that began before it.

    Giving each event to one episode keeps the work linear however many episodes an entity had.
    Events of entities without an episode, or before their first one, are left out. `codes` must be
    the codes the timeline was built with, and its KeySpace must cover `times_us`.
    """
    candidates = np.flatnonzero(mask & np.isin(codes, found["code"].to_numpy()))
    starts = timeline.keys[found["first"].to_numpy()]  # ascending: episodes come in (entity, time) order
    owner = np.searchsorted(starts, timeline.space.pack(codes[candidates], times_us[candidates]), "left") - 1
    mine = (owner >= 0) & (found["code"].to_numpy()[np.maximum(owner, 0)] == codes[candidates])
    return candidates[mine], owner[mine]


def group_positions(
    owner: np.ndarray, positions: np.ndarray, order_by: np.ndarray, n: int
) -> list[np.ndarray]:
    """Split `positions` by `owner` (0..n-1), each group sorted by `order_by` then position."""
    order = np.lexsort((positions, order_by, owner))
    owner, positions = owner[order], positions[order]
    bounds = np.searchsorted(owner, np.arange(n + 1), "left")
    return [positions[bounds[i] : bounds[i + 1]] for i in range(n)]


def counts_per_episode(
    episode: np.ndarray, values: pd.Series, n_episodes: int, top: int | None = None
) -> list[dict[str, int]]:
    """Value counts of `values` (aligned with `episode`) for each episode, most frequent first.

    One groupby over all episodes at once; nulls are left out; ties are ordered by value so the
    evidence is the same on every run.
    """
    frame = pd.DataFrame({"episode": episode, "value": values.to_numpy(dtype=object, na_value=None)})
    counts = (
        frame.dropna()
        .groupby(["episode", "value"], sort=False)
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["episode", "n", "value"], ascending=[True, False, True])
    )
    if top is not None:
        counts = counts.groupby("episode", sort=False).head(top)
    result: list[dict[str, int]] = [{} for _ in range(n_episodes)]
    for ep, value, n in zip(counts["episode"], counts["value"], counts["n"], strict=True):
        result[ep][str(value)] = int(n)
    return result


def spread_sample(start: int, stop: int, size: int = 20) -> np.ndarray:
    """Up to `size` positions spread evenly over [start, stop], both ends included."""
    count = stop - start + 1
    if count <= size:
        return np.arange(start, stop + 1)
    return np.unique(np.linspace(start, stop, size).round().astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Networks


def subnets(ips: np.ndarray, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> np.ndarray:
    """The network (`a.b.c.0/24`, `2001:db8::/64`) of each address; None where it is not an IP.

    Meant for distinct addresses (factorize first): IPv4 is handled with vectorised integer maths,
    the rarer IPv6 addresses with `ipaddress`. IPv4-mapped IPv6 addresses count as IPv4.
    """
    import ipaddress

    series = pd.Series(ips, dtype="string")
    parts = series.str.extract(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$").astype("Int64")
    is_v4 = as_mask(parts.notna().all(axis=1) & parts.le(255).all(axis=1))
    result = np.full(len(ips), None, dtype=object)
    if is_v4.any():
        octets = parts[is_v4].to_numpy(dtype=np.int64)
        value = (octets[:, 0] << 24) | (octets[:, 1] << 16) | (octets[:, 2] << 8) | octets[:, 3]
        value &= (0xFFFFFFFF << (32 - ipv4_prefix)) & 0xFFFFFFFF
        text = (
            pd.Series(value >> 24).astype(str) + "." + pd.Series((value >> 16) & 255).astype(str) + "."
            + pd.Series((value >> 8) & 255).astype(str) + "." + pd.Series(value & 255).astype(str)
            + f"/{ipv4_prefix}"
        )
        result[is_v4] = text.to_numpy(dtype=object)
    for i in np.flatnonzero(~is_v4):
        try:
            address = ipaddress.ip_address(str(ips[i]))
        except ValueError:
            continue
        if address.version == 6 and address.ipv4_mapped is not None:
            result[i] = str(ipaddress.ip_network(f"{address.ipv4_mapped}/{ipv4_prefix}", strict=False))
        elif address.version == 6:
            result[i] = str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
        else:  # dotted forms the regex did not take; let ipaddress decide
            result[i] = str(ipaddress.ip_network(f"{address}/{ipv4_prefix}", strict=False))
    return result


# ---------------------------------------------------------------------------------------------
# Model windows
#
# The isolation-forest detectors score one row per (entity, time bucket). Buckets are aligned to the
# epoch, and every history feature looks only at the `history` right before its own bucket, so a row
# is the same whichever frame it was computed from, as long as that frame holds its history: a live
# tick and a replay of the same hour score identical rows.

HOUR_US = 3_600 * US_PER_SECOND


def bucket_index(times_us: np.ndarray, bucket_us: int) -> np.ndarray:
    """Index of the epoch-aligned bucket holding each time (floor, also before 1970)."""
    return np.floor_divide(times_us, bucket_us)


def entity_windows(
    events: pd.DataFrame,
    times_us: np.ndarray,
    codes: np.ndarray,
    bucket_us: int,
    history_us: int,
    *,
    keep: np.ndarray | None = None,
    distinct: dict[str, str] | None = None,
    new_share_of: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per (entity code, bucket) that has events, sorted by code then bucket.

    Columns: `code`, `bucket` (index since the epoch), requests, ok_requests, failure_ratio
    (auth_failed share), error_ratio (share refused otherwise: forbidden, rate limited, other 4xx),
    recipients and bytes (sums), one `distinct_<x>` per
    entry of `distinct` ({feature name: event column}), hour (UTC hour of the bucket start), and the
    history features over the `history` before the bucket: history_requests, history_buckets (buckets
    with events), first_seen (1 when there were none), volume_vs_usual ((requests + 1) over (mean
    requests per bucket of the history + 1)) and, per entry of `new_share_of` ({feature name: event
    column}), the share of requests whose value (an IP, say) the entity did not use in its history.
    Only events where `keep` holds and the code is known (>= 0) count.
    """
    if history_us % bucket_us:
        raise ValueError("history must be a whole number of buckets")
    history_buckets = history_us // bucket_us
    use = codes >= 0 if keep is None else keep & (codes >= 0)
    rows = np.flatnonzero(use)
    code = codes[rows]
    bucket = bucket_index(times_us[rows], bucket_us)
    columns: dict[str, np.ndarray] = {}
    if len(rows) == 0:
        names = ["code", "bucket", "requests", "ok_requests", "failure_ratio", "error_ratio", "recipients", "bytes",
                 *(distinct or {}), "hour", "history_requests", "history_buckets", "first_seen",
                 "volume_vs_usual", *(new_share_of or {})]
        return pd.DataFrame({name: np.zeros(0, dtype=np.float64) for name in names}).astype(
            {"code": np.int64, "bucket": np.int64}
        )

    low, high = int(bucket.min()), int(bucket.max())
    span = high - low + history_buckets + 2
    packed = code * span + (bucket - low)
    # `group` numbers the (code, bucket) pairs in sorted order: np.unique sorts.
    unique_packed, group = np.unique(packed, return_inverse=True)
    n_groups = len(unique_packed)
    group_code = unique_packed // span
    group_bucket = unique_packed % span + low

    outcome = events["outcome"].iloc[rows]
    failed = as_mask(outcome.eq(Outcome.AUTH_FAILED))
    errors = as_mask(outcome.isin([Outcome.FORBIDDEN, Outcome.RATE_LIMITED, Outcome.CLIENT_ERROR]))
    requests = np.bincount(group, minlength=n_groups).astype(np.float64)
    columns["requests"] = requests
    columns["ok_requests"] = np.bincount(group, weights=as_mask(outcome.eq(Outcome.OK)), minlength=n_groups)
    columns["failure_ratio"] = np.bincount(group, weights=failed, minlength=n_groups) / requests
    columns["error_ratio"] = np.bincount(group, weights=errors, minlength=n_groups) / requests
    for name in ("recipients", "bytes"):
        values = events[name].iloc[rows].to_numpy(dtype=np.float64, na_value=0.0)
        columns[name] = np.bincount(group, weights=values, minlength=n_groups)
    for name, column in (distinct or {}).items():
        items, _ = entity_codes(events[column].iloc[rows])
        columns[name] = _distinct_per_group(group, items, n_groups).astype(np.float64)
    columns["hour"] = ((group_bucket * bucket_us) // HOUR_US % 24).astype(np.float64)

    # History: the groups of the same code whose bucket lies in [bucket - history, bucket).
    first = np.searchsorted(unique_packed, unique_packed - history_buckets, "left")
    before = np.arange(n_groups) - first
    total = np.concatenate([[0.0], np.cumsum(requests)])
    history_requests = total[np.arange(n_groups)] - total[first]
    columns["history_requests"] = history_requests
    columns["history_buckets"] = before.astype(np.float64)
    columns["first_seen"] = (before == 0).astype(np.float64)
    columns["volume_vs_usual"] = (requests + 1.0) / (history_requests / history_buckets + 1.0)
    for name, column in (new_share_of or {}).items():
        items, _ = entity_codes(events[column].iloc[rows])
        new = _new_requests(group, group_code, group_bucket, items, history_buckets, n_groups)
        columns[name] = new / requests

    table = pd.DataFrame({"code": group_code.astype(np.int64), "bucket": group_bucket.astype(np.int64)})
    for name, values in columns.items():
        table[name] = values
    return table


def _distinct_per_group(group: np.ndarray, items: np.ndarray, n_groups: int) -> np.ndarray:
    """Distinct known items (code >= 0) per group."""
    known = items >= 0
    n_items = int(items.max()) + 1 if known.any() else 1
    pairs = np.unique(group[known].astype(np.int64) * n_items + items[known])
    return np.bincount(pairs // n_items, minlength=n_groups)


def _new_requests(
    group: np.ndarray,
    group_code: np.ndarray,
    group_bucket: np.ndarray,
    items: np.ndarray,
    history_buckets: int,
    n_groups: int,
) -> np.ndarray:
    """Requests per group whose item the same code did not use in the history before the bucket.

    An unknown item (null) counts as new: an entity suddenly sending without, say, an address is as
    unusual as one sending from a new address.
    """
    n_items = int(items.max()) + 2 if len(items) else 2
    pairs, counts = np.unique(group.astype(np.int64) * n_items + (items + 1), return_counts=True)
    pair_group = pairs // n_items
    pair_item = pairs % n_items
    pair_code = group_code[pair_group]
    pair_bucket = group_bucket[pair_group]
    order = np.lexsort((pair_bucket, pair_item, pair_code))
    c, i, b = pair_code[order], pair_item[order], pair_bucket[order]
    seen = np.zeros(len(order), dtype=bool)
    seen[1:] = (c[1:] == c[:-1]) & (i[1:] == i[:-1]) & (b[1:] - b[:-1] <= history_buckets) & (i[1:] > 0)
    new = ~seen
    return np.bincount(pair_group[order][new], weights=counts[order][new], minlength=n_groups)


@dataclass(frozen=True)
class Windows:
    """Model windows of one entity kind: the rows (see `entity_windows`), the entity of each code,
    and for every event of the frame its code (-1: none) and whether it counted."""

    table: pd.DataFrame
    labels: np.ndarray
    codes: np.ndarray
    keep: np.ndarray


def ip_windows(events: pd.DataFrame, times_us: np.ndarray, bucket_us: int, history_us: int) -> Windows:
    """Model windows per source IP, with distinct_paths, distinct_keys, distinct_accounts and
    distinct_user_agents."""
    codes, ips = entity_codes_sorted(events["source_ip"])
    keep = codes >= 0
    table = entity_windows(
        events, times_us, codes, bucket_us, history_us,
        keep=keep,
        distinct={
            "distinct_paths": "path",
            "distinct_keys": "api_key_id",
            "distinct_accounts": "account",
            "distinct_user_agents": "user_agent",
        },
    )
    return Windows(table, ips, codes, keep)


CREDENTIAL_SEPARATOR = "\x1f"


def credential_windows(events: pd.DataFrame, times_us: np.ndarray, bucket_us: int, history_us: int) -> Windows:
    """Model windows per credential (the API key fingerprint, else the account), counting only the
    events it was accepted on (anything but `auth_failed`), and only buckets where it got at least one
    `ok`: a key nobody could use (a flood's made-up keys are refused, then rate limited) is the
    business of the IP-side detectors, not a customer whose key behaves oddly.

    Adds distinct_paths, distinct_ips, distinct_user_agents and new_ip_share (share of requests from
    addresses the credential did not use in its history). Labels are `api_key<US>fingerprint` or
    `account<US>name` (US = CREDENTIAL_SEPARATOR).
    """
    credential = ("api_key" + CREDENTIAL_SEPARATOR + events["api_key_id"]).fillna(
        "account" + CREDENTIAL_SEPARATOR + events["account"]
    )
    codes, labels = entity_codes_sorted(credential)
    keep = (codes >= 0) & ~as_mask(events["outcome"].eq(Outcome.AUTH_FAILED))
    table = entity_windows(
        events, times_us, codes, bucket_us, history_us,
        keep=keep,
        distinct={
            "distinct_paths": "path",
            "distinct_ips": "source_ip",
            "distinct_user_agents": "user_agent",
        },
        new_share_of={"new_ip_share": "source_ip"},
    )
    table = table[table["ok_requests"].to_numpy() > 0].reset_index(drop=True)
    return Windows(table, labels, codes, keep)


def entity_codes_sorted(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Like `entity_codes`, but codes follow the sorted values: the same entities get the same order
    whatever the row order, which keeps anything trained on rows sorted by code reproducible."""
    codes, labels = pd.factorize(values, use_na_sentinel=True, sort=True)
    return codes.astype(np.int64), np.asarray(labels, dtype=object)
