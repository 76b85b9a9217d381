"""Password spraying: many source IPs each failing a few times, on one account or across an account list."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np
import pandas as pd

from detectors.base import Detector
from detectors.pushdown import Clause, Measure, Pushdown, Rows
from detectors.features import (
    KeySpace,
    Timeline,
    as_mask,
    counts_per_episode,
    entity_codes,
    episode_members,
    episodes,
    follow_ups,
    group_positions,
    spread_sample,
)
from detectors.history import credentials
from detectors.rules import (
    as_timedelta,
    bucket_ceil,
    bucket_floor,
    REPLAY_STEP,
    check_lookback,
    human,
    known_from,
    iso,
    positive_int,
    up_to_now,
    usec,
)
from pipeline.geo import Geo, default_geo
from pipeline.schema import Alert, EntityKind, Outcome, Severity

_NEVER = np.iinfo(np.int64).max
_SUCCESS_SAMPLE = 20


@dataclass
class PasswordSpraying(Detector):
    """Fires when many source IPs fail to log in, each only a few times, within `window` (default
    24 h): on one account or key (`min_ips` IPs), or across many accounts (`spread_min_ips` IPs on at
    least `spread_min_targets` accounts or keys).

    What fires: failed logins (`auth_failed`) that name an account or key, from addresses that had
    not logged in successfully earlier in the frame (`ignore_known_ips`: a customer's own server
    mistyping or retrying an old password is not a sprayer; "earlier" is the `window` before the
    failure). An IP counts toward a window only while
    it failed at most `max_attempts_per_ip` times in it (on that account for the per-account test, in
    all for the spread test): an address that keeps failing is a device with a stale password or a
    brute-forcer (auth_bruteforce's job), not one of a spray's thousand hands. Two tests, one alert
    per episode each (windows over the limit less than `window` apart):
    - per account or key: `min_ips` light IPs failed on it. Entity: the account or key.
    - spread: `spread_min_ips` light IPs failed on at least `spread_min_targets` different accounts
      or keys, each account seeing perhaps one or two of them (a low-and-slow spray walking a user
      list). Entity: the IP whose failure took the wave over the limit; evidence lists every IP.
    Severity HIGH, CRITICAL when one of the spraying IPs then logged in to an account it had tried.

    Why it matters: spraying tries one or two common passwords against many accounts from many
    addresses (botnets, residential proxies), slowly, so that no address and no account crosses a
    lockout or brute-force threshold (MITRE T1110.003). The per-IP rules never see it; only the sum
    over addresses does.

    Triage: `ips` lists every address involved (with `countries`), `heavy_ips` those that failed more
    than `max_attempts_per_ip` times; `accounts`/`api_keys` what was tried. Check `successes` first:
    those accounts probably have a guessed password (reset it, review what they sent since). Many
    residential IPs in many countries with one attempt each is a proxy network. A single account
    failing from a few IPs with many attempts each is a user with a stale password on a roaming phone
    and stays quiet by design.

    An episode is reported by the run that sees its start with three windows of history before it
    (the lookback is five days), so a live tick and a replay give it the same start and id; runs
    up to a day after its first hot window still extend it.

    Tuning: `window` (default 24 h, at most 24 h), `min_ips` (20) per account,
    `spread_min_ips` (50) and `spread_min_targets` (20) for the spread test; `max_attempts_per_ip`
    (5). Raise `spread_min_ips` where the submission port sees a lot of internet background guessing;
    set `ignore_known_ips = false` to count customers' own addresses too. Score is the peak count of
    light IPs / its threshold.
    """

    name: ClassVar[str] = "password_spraying"
    severity: ClassVar[Severity] = Severity.HIGH
    # Three windows to confirm an episode's start (see _confirmed), the day a replay step adds, and
    # a day more over which later runs still see (and extend) a spray they confirmed.
    lookback: ClassVar[timedelta] = timedelta(days=5)
    mitre: ClassVar[str] = "T1110.003"

    min_ips: int = 20
    window: timedelta = timedelta(hours=24)
    max_attempts_per_ip: int = 5
    spread_min_ips: int = 50
    spread_min_targets: int = 20
    ignore_known_ips: bool = True
    geo: Geo | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.min_ips = positive_int(self.min_ips, "min_ips")
        self.window = as_timedelta(self.window, "window")
        check_lookback(self.window, self.lookback)
        if self.window * 3 + 2 * REPLAY_STEP > self.lookback:
            raise ValueError(f"window: at most {human((self.lookback - 2 * REPLAY_STEP) / 3)}, got {human(self.window)}")
        self.max_attempts_per_ip = positive_int(self.max_attempts_per_ip, "max_attempts_per_ip")
        self.spread_min_ips = positive_int(self.spread_min_ips, "spread_min_ips")
        self.spread_min_targets = positive_int(self.spread_min_targets, "spread_min_targets")
        if not isinstance(self.ignore_known_ips, bool):
            raise ValueError(f"ignore_known_ips: expected true or false, got {self.ignore_known_ips!r}")
        if self.geo is not None and not isinstance(self.geo, Geo):
            raise ValueError("geo: set by the detect job from geo_city_mmdb/geo_asn_mmdb, not here")

    def pushdown(self) -> Pushdown:
        """Only IPs with a failure that could count. With `ignore_known_ips`, a failure is never
        counted when the same IP logged in during the window before it, which is sure when the IP
        logged in during one of the buckets (a 24th of the window) before the failure's, or earlier
        in the same bucket (its first login a whole second before its first failure there). An IP
        whose every failure is like that is left out: its logins only discount its own failures.
        The per-account and spread tests sum over the IPs that remain, all of whose rows are loaded."""
        named = (Clause("api_key_id", "notnull"), Clause("account", "notnull"))
        failed = Rows(all_of=(Clause("outcome", "eq", Outcome.AUTH_FAILED.value),), any_of=named)
        logged_in = Rows(all_of=(Clause("outcome", "eq", Outcome.OK.value),), any_of=named)
        seconds = int(self.window.total_seconds())
        parts = 24 if seconds % 24 == 0 and self.window.total_seconds() == seconds else 1
        width = seconds // parts

        def pick(table: pd.DataFrame) -> set:
            failing = table[table["failures"] > 0]
            if not self.ignore_known_ips:
                return set(failing["source_ip"])
            # A bucket that begins before the frame may hold logins the detector does not see.
            inside = table["bucket"] >= table.attrs.get("since", -np.inf)
            logins = table[(table["logins"] > 0) & inside]
            seen = set(zip(logins["source_ip"], logins["bucket"], strict=True))
            counted = set()
            first_login = failing["first_login"].where(inside[failing.index], np.nan)
            for ip, bucket, first_failure, login in zip(
                failing["source_ip"], failing["bucket"], failing["first_failure"], first_login, strict=True
            ):
                if first_failure > login:  # NaN (no login in the bucket) compares False
                    continue
                if not any((ip, bucket - k * width) in seen for k in range(1, parts)):
                    counted.add(ip)
            return counted

        measures = {"failures": Measure(failed), "logins": Measure(logged_in),
                    "first_failure": Measure(failed, first=True), "first_login": Measure(logged_in, first=True)}
        return Pushdown(by="source_ip", bucket=timedelta(seconds=width), pick=pick, measures=measures)

    def detect(self, events: pd.DataFrame, now: datetime) -> list[Alert]:
        events, times = up_to_now(events, now)
        if events.empty:
            return []
        credential, cred_labels, cred_kinds = credentials(events)
        ip_codes, ips = entity_codes(events["source_ip"])
        named = (credential >= 0) & (ip_codes >= 0)
        attempts = named & as_mask(events["outcome"].eq(Outcome.AUTH_FAILED))
        logins = named & as_mask(events["outcome"].eq(Outcome.OK))
        if self.ignore_known_ips and logins.any():
            # An address that logged in before is a customer's: its failures are typos and stale
            # passwords. "Before" is the `window` ahead of the failure, not the whole frame: a live
            # tick and a replay step hold different amounts of the past, and must agree.
            horizon = usec(self.window)
            space = KeySpace.covering(times, len(ips), horizon)
            seen = Timeline.build(ip_codes, times, logins, space)
            at = space.pack(np.maximum(ip_codes, 0), times)
            recent = np.searchsorted(seen.keys, at, "left") - np.searchsorted(seen.keys, at - space.width(horizon), "left")
            attempts &= recent == 0
        if attempts.sum() < min(self.min_ips, self.spread_min_ips):
            return []

        window_us = usec(self.window)
        confirmed_from = known_from(times, now, self.lookback) + 3 * window_us
        ctx = _Context(events, times, credential, cred_labels, cred_kinds, ip_codes, ips, logins, window_us,
                       confirmed_from)
        alerts = self._per_target(ctx, attempts) + self._spread(ctx, attempts)
        return sorted(alerts, key=lambda a: (a.window_start, str(a.entity_kind), a.entity))

    # ---- the two tests -------------------------------------------------------------------------

    def _per_target(self, ctx: _Context, attempts: np.ndarray) -> list[Alert]:
        space = KeySpace.covering(ctx.times, len(ctx.cred_labels), ctx.window_us)
        failures = Timeline.build(ctx.credential, ctx.times, attempts, space)
        items = ctx.ip_codes[failures.rows]
        light = failures.trailing_distinct(items, ctx.window_us) - _heavy(
            failures, items, self.max_attempts_per_ip, ctx.window_us
        )
        found = _confirmed(episodes(failures, light, light >= self.min_ips, ctx.window_us), failures, ctx)
        if found.empty:
            return []
        wave = self._wave(ctx, failures, found, items, ctx.credential)
        alerts = []
        for i, ep in enumerate(wave.found.to_dict("records")):
            code, peak = ep["code"], ep["peak"]
            entity = str(ctx.cred_labels[code])
            kind = ctx.cred_kinds[code]
            noun = "Key" if kind is EntityKind.API_KEY else "Account"
            evidence = wave.facts[i] | {"min_ips": self.min_ips}
            title = (
                f"{noun} {entity}: failed logins from {peak:,} IPs in {human(self.window)}, at most "
                f"{self.max_attempts_per_ip} each (threshold {self.min_ips:,})"
            )
            alerts.append(self._alert(kind, entity, failures.times, ep, peak / self.min_ips, title, evidence))
        return alerts

    def _spread(self, ctx: _Context, attempts: np.ndarray) -> list[Alert]:
        # One timeline for the whole service: every attempt belongs to entity 0.
        everyone = np.zeros(len(attempts), dtype=np.int64)
        space = KeySpace.covering(ctx.times, 1, ctx.window_us)
        failures = Timeline.build(everyone, ctx.times, attempts, space)
        items = ctx.ip_codes[failures.rows]
        light = failures.trailing_distinct(items, ctx.window_us) - _heavy(
            failures, items, self.max_attempts_per_ip, ctx.window_us
        )
        targets = failures.trailing_distinct(ctx.credential[failures.rows], ctx.window_us)
        hot = (light >= self.spread_min_ips) & (targets >= self.spread_min_targets)
        found = _confirmed(episodes(failures, light, hot, ctx.window_us), failures, ctx)
        if found.empty:
            return []
        # Logins after the wave began belong to it whatever they used: all owned by entity 0.
        wave = self._wave(ctx, failures, found, items, everyone)
        alerts = []
        for i, ep in enumerate(wave.found.to_dict("records")):
            # The address whose failure took the wave over the limit: one of its members, and fixed
            # once seen, so the alert id does not move as the wave goes on.
            ip = str(ctx.ips[items[ep["first_hot"]]])
            facts = wave.facts[i]
            evidence = facts | {
                "spread_min_ips": self.spread_min_ips,
                "spread_min_targets": self.spread_min_targets,
                "peak_targets": int(targets[ep["peak_pos"]]),
            }
            title = (
                f"IP {ip} and {facts['ip_count'] - 1:,} other IPs: password spray on "
                f"{facts['targets_tried']:,} accounts or keys, peak {ep['peak']:,} IPs in "
                f"{human(self.window)} (threshold {self.spread_min_ips:,})"
            )
            score = ep["peak"] / self.spread_min_ips
            alerts.append(self._alert(EntityKind.IP, ip, failures.times, ep, score, title, evidence))
        return alerts

    # ---- members and evidence ------------------------------------------------------------------

    def _wave(
        self, ctx: _Context, failures: Timeline, found: pd.DataFrame, items: np.ndarray, owner_codes: np.ndarray
    ) -> _Wave:
        """Episodes reduced to their light IPs, with the evidence of each.

        An episode starts at the first failure, in the window that first went over the limit, of an
        IP that was light at that moment: an unrelated brute-forcer hours earlier does not stretch the
        alert back to its first attempt. That moment is in the past of every later run, so the start
        (and the alert id) stays put. Members are the failures from there to the episode's last hot
        one, less the IPs that went over `max_attempts_per_ip` within a window (`heavy_ips`), except
        for their first `max_attempts_per_ip` tries (when they still counted as light).
        """
        starts = []
        for first, first_hot in zip(found["first"], found["first_hot"], strict=True):
            seen = items[first : first_hot + 1]
            values, counts = np.unique(seen, return_counts=True)
            light = np.isin(seen, values[counts <= self.max_attempts_per_ip])
            starts.append(first + int(np.argmax(light)))
        found = found.assign(first=np.asarray(starts, dtype=np.int64))
        episode, positions = episode_members(found)
        peak = _peak_per_member(episode, items[positions], failures.times[positions], ctx.window_us)
        light = peak <= self.max_attempts_per_ip
        heavy_ips = counts_per_episode(episode[~light], pd.Series(ctx.ips[items[positions[~light]]]), len(found))
        # A sprayer that keeps going one try an hour turns heavy after `max_attempts_per_ip` hours;
        # its first tries were light, counted towards the wave, and it stays one of the wave's IPs.
        tries = pd.Series(np.ones(len(positions))).groupby([episode, items[positions]]).cumsum().to_numpy()
        light |= tries <= self.max_attempts_per_ip
        episode, positions = episode[light], positions[light]
        facts = self._facts(ctx, failures, found, episode, positions, items, owner_codes)
        for i, heavy in enumerate(heavy_ips):
            facts[i]["heavy_ips"] = sorted(heavy)
        return _Wave(found, facts)

    def _facts(
        self,
        ctx: _Context,
        failures: Timeline,
        found: pd.DataFrame,
        episode: np.ndarray,
        positions: np.ndarray,
        items: np.ndarray,
        owner_codes: np.ndarray,
    ) -> list[dict]:
        """Evidence of each episode from its member failures (timeline positions, light IPs only)."""
        n = len(found)
        events = ctx.events
        rows = failures.rows[positions]
        per_ip = (
            pd.DataFrame({"episode": episode, "ip": items[positions], "at": failures.times[positions]})
            .groupby(["episode", "ip"], sort=False)
            .agg(first=("at", "min"), tries=("at", "size"))
            .reset_index()
            .sort_values(["episode", "first", "ip"])
        )
        ip_bounds = np.searchsorted(per_ip["episode"].to_numpy(), np.arange(n + 1), "left")
        ip_col, tries_col = per_ip["ip"].to_numpy(), per_ip["tries"].to_numpy()
        member_bounds = np.searchsorted(episode, np.arange(n + 1), "left")
        country_of_ip = (
            (self.geo or default_geo()).countries(pd.Series(ctx.ips, dtype="string")).to_numpy(dtype=object, na_value=None)
        )
        accounts = counts_per_episode(episode, events["account"].iloc[rows], n)
        api_keys = counts_per_episode(episode, events["api_key_id"].iloc[rows], n)
        services = counts_per_episode(episode, events["service"].iloc[rows], n)
        tried = pd.Series(ctx.credential[rows]).groupby(episode).nunique().reindex(range(n), fill_value=0)
        successes = self._successes(ctx, failures, found, episode, rows, owner_codes)
        event_ids = events["event_id"].to_numpy(dtype=object, na_value=None)

        facts = []
        for i in range(n):
            mine = positions[member_bounds[i] : member_bounds[i + 1]]
            members = ip_col[ip_bounds[i] : ip_bounds[i + 1]]
            tries = tries_col[ip_bounds[i] : ip_bounds[i + 1]]
            by_country = pd.Series([country_of_ip[c] for c in members], dtype=object).value_counts(dropna=True)
            got_in = events.iloc[successes[i][:_SUCCESS_SAMPLE]]
            sample = mine[spread_sample(0, len(mine) - 1)] if len(mine) else mine
            facts.append(
                {
                    "peak_ips": int(found["peak"].iat[i]),
                    "peak_at": iso(failures.times[found["peak_pos"].iat[i]]),
                    "window_seconds": int(self.window.total_seconds()),
                    "max_attempts_per_ip": self.max_attempts_per_ip,
                    "failures": len(mine),
                    "ip_count": len(members),
                    "ips": [str(ctx.ips[c]) for c in members],
                    "attempts_per_ip": {
                        str(k): int(v) for k, v in pd.Series(tries).value_counts().sort_index().items()
                    },
                    "countries": {
                        str(k): int(v) for k, v in sorted(by_country.items(), key=lambda kv: (-kv[1], kv[0]))
                    },
                    "targets_tried": int(tried.iat[i]),
                    "accounts": accounts[i],
                    "api_keys": api_keys[i],
                    "services": services[i],
                    "first_seen": iso(failures.times[mine[0]]) if len(mine) else None,
                    "last_seen": iso(failures.times[mine[-1]]) if len(mine) else None,
                    "followed_by_success": len(successes[i]) > 0,
                    "success_count": len(successes[i]),
                    "successes": [
                        {"at": iso(us), "ip": _plain(ip), "account": _plain(account), "api_key_id": _plain(key)}
                        for us, ip, account, key in zip(
                            ctx.times[successes[i][:_SUCCESS_SAMPLE]],
                            got_in["source_ip"],
                            got_in["account"],
                            got_in["api_key_id"],
                            strict=True,
                        )
                    ],
                    "sample_event_ids": [e for e in event_ids[failures.rows[sample]] if e is not None],
                }
            )
        return facts

    @staticmethod
    def _successes(
        ctx: _Context,
        failures: Timeline,
        found: pd.DataFrame,
        episode: np.ndarray,
        rows: np.ndarray,
        owner_codes: np.ndarray,
    ) -> list[np.ndarray]:
        """Per episode, frame positions of logins after it began by one of its IPs to a credential it
        tried (before the entity's next episode), in time order."""
        after, owner = follow_ups(failures, found, owner_codes, ctx.times, ctx.logins & (owner_codes >= 0))
        width = max(len(ctx.ips), len(ctx.cred_labels)) + 1

        def pairs(ep: np.ndarray, values: np.ndarray) -> np.ndarray:
            return ep.astype(np.int64) * width + values

        by_ip = np.isin(pairs(owner, ctx.ip_codes[after]), pairs(episode, ctx.ip_codes[rows]))
        by_target = np.isin(pairs(owner, ctx.credential[after]), pairs(episode, ctx.credential[rows]))
        keep = by_ip & by_target
        return group_positions(owner[keep], after[keep], ctx.times[after[keep]], len(found))

    def _alert(
        self, kind: EntityKind, entity: str, times: np.ndarray, ep: dict, score: float, title: str, evidence: dict
    ) -> Alert:
        followed = evidence["followed_by_success"]
        if followed:
            title += f", then {evidence['success_count']:,} login(s) from those IPs succeeded"
        return Alert(
            detector=self.name,
            severity=Severity.CRITICAL if followed else self.severity,
            entity_kind=kind,
            entity=entity,
            window_start=bucket_floor(times[ep["first"]]),
            window_end=bucket_ceil(times[ep["last"]]),
            score=score,
            title=title,
            evidence=evidence,
            mitre=self.mitre,
        )


@dataclass(frozen=True)
class _Wave:
    found: pd.DataFrame
    facts: list[dict]


@dataclass(frozen=True)
class _Context:
    events: pd.DataFrame
    times: np.ndarray
    credential: np.ndarray
    cred_labels: np.ndarray
    cred_kinds: np.ndarray
    ip_codes: np.ndarray
    ips: np.ndarray
    logins: np.ndarray
    window_us: int
    confirmed_from: int


def _confirmed(found: pd.DataFrame, failures: Timeline, ctx: _Context) -> pd.DataFrame:
    """Episodes whose start every run agrees on. Whether a failure at t is hot depends on the
    failures of (t - window, t] and on the logins of the window before each of those, and an
    episode begins with a hot failure with none in the window before it: its first hot failure
    needs three windows of history.
    A run whose frame is shorter than that before an episode may see it start later (and so give
    it another id): that episode is left to the earlier run that saw its start."""
    if found.empty:
        return found
    keep = failures.times[found["first_hot"].to_numpy()] >= ctx.confirmed_from
    return found[keep].reset_index(drop=True)


def _heavy(timeline: Timeline, items: np.ndarray, limit: int, window_us: int) -> np.ndarray:
    """At each event of the timeline: how many (entity, item) pairs have more than `limit` events in
    the window (t - window, t] of that entity.

    A pair has more than `limit` events in the window ending at t exactly when, for some event j of
    the pair, j <= t and event j - limit lies after t - window: t is in [t_j, t_(j-limit) + window).
    Clipped at the next such interval of the same pair, these intervals are disjoint, so, as in
    Timeline.trailing_distinct, a pair count is started intervals minus ended ones: two searchsorted
    calls, however many pairs and events.
    """
    if len(timeline) <= limit:
        return np.zeros(len(timeline), dtype=np.int64)
    width = timeline.space.width(window_us)
    order = np.lexsort((timeline.keys, items, timeline.codes))
    codes, pair_items, keys = timeline.codes[order], items[order], timeline.keys[order]
    same = (codes[limit:] == codes[:-limit]) & (pair_items[limit:] == pair_items[:-limit])
    starts = keys[limit:][same]
    ends = keys[:-limit][same] + width
    owner_code, owner_item = codes[limit:][same], pair_items[limit:][same]
    valid = ends > starts
    starts, ends, owner_code, owner_item = starts[valid], ends[valid], owner_code[valid], owner_item[valid]
    if len(starts) == 0:
        return np.zeros(len(timeline), dtype=np.int64)
    next_same = (owner_code[1:] == owner_code[:-1]) & (owner_item[1:] == owner_item[:-1])
    ends[:-1] = np.where(next_same, np.minimum(ends[:-1], starts[1:]), ends[:-1])
    started = np.searchsorted(np.sort(starts), timeline.keys, "right")
    ended = np.searchsorted(np.sort(ends), timeline.keys, "right")
    return started - ended


def _peak_per_member(episode: np.ndarray, items: np.ndarray, times: np.ndarray, window_us: int) -> np.ndarray:
    """For each member failure: the most failures its IP had within one window of the episode."""
    if len(episode) == 0:
        return np.zeros(0, dtype=np.int64)
    pair, _ = pd.factorize(episode.astype(np.int64) * (int(items.max()) + 1) + items)
    pair = pair.astype(np.int64)
    space = KeySpace.covering(times, int(pair.max()) + 1, window_us)
    timeline = Timeline.build(pair, times, None, space)
    counts = np.empty(len(pair), dtype=np.int64)
    counts[timeline.rows] = timeline.trailing_count(window_us)
    return pd.Series(counts).groupby(pair).transform("max").to_numpy()


def _plain(value: object) -> str | None:
    return None if pd.isna(value) else str(value)
