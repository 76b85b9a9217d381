"""Token buckets per destination, sized so no window ever exceeds the platform's published rate.

Pure: time is always a parameter. The outbox stores bucket levels between runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Limit:
    """`count` messages per `seconds`, as a platform documents it."""

    count: int
    seconds: float

    def bucket_shape(self) -> tuple[float, float]:
        """(capacity, refill per second). A bucket of capacity C refilling at r can spend C + r*w in
        any window w; C = r*w = count/2 keeps that at `count`. DingTalk mutes a robot for 10 minutes
        after its 21st message in a minute, so "about the rate" is not good enough.
        A 1-per-window limit (Slack) cannot be halved: it gets capacity 1, i.e. short bursts of 2,
        which Slack documents as tolerated."""
        capacity = max(1, self.count // 2)
        refill = max(self.count - capacity, 1) / self.seconds
        return float(capacity), refill


# Published limits per webhook. Teams: about 4 requests per second per connector; Discord: 5 per
# 2 s per webhook (its rate-limit headers); Feishu: 5 per second and 100 per minute per bot;
# DingTalk and WeCom: 20 per minute per robot; Slack: 1 per second with short bursts.
PLATFORM_LIMITS: dict[str, tuple[Limit, ...]] = {
    "slack": (Limit(1, 1.0),),
    "teams": (Limit(4, 1.0),),
    "feishu": (Limit(5, 1.0), Limit(100, 60.0)),
    "lark": (Limit(5, 1.0), Limit(100, 60.0)),
    "dingtalk": (Limit(20, 60.0),),
    "wecom": (Limit(20, 60.0),),
    "discord": (Limit(5, 2.0),),
    # Our own receivers: generous, but a runaway loop must not flood them either.
    "generic": (Limit(20, 1.0),),
}


@dataclass
class TokenBucket:
    capacity: float
    refill_per_second: float
    tokens: float
    updated: datetime

    @classmethod
    def full(cls, limit: Limit, now: datetime) -> TokenBucket:
        capacity, refill = limit.bucket_shape()
        return cls(capacity, refill, capacity, now)

    def _refill(self, now: datetime) -> None:
        # A clock that steps back (replays, NTP) must not mint or burn tokens.
        elapsed = max(0.0, (now - self.updated).total_seconds())
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_per_second)
        self.updated = max(now, self.updated)

    def available(self, now: datetime) -> float:
        self._refill(now)
        return self.tokens

    def take(self, now: datetime, n: float = 1.0) -> bool:
        self._refill(now)
        if self.tokens + 1e-9 < n:
            return False
        self.tokens -= n
        return True

    def pause(self, seconds: float, now: datetime) -> None:
        """The destination said "wait": drop below zero so the next token exists exactly then."""
        self._refill(now)
        self.tokens = min(self.tokens, 1.0 - seconds * self.refill_per_second)


class DestinationLimiter:
    """All buckets of one destination: a message needs a token from each."""

    def __init__(self, buckets: Sequence[TokenBucket]):
        self.buckets = list(buckets)
        # Whether a token was spent or a pause set: untouched state need not be written back.
        self.changed = False

    @classmethod
    def fresh(cls, platform: str, now: datetime) -> DestinationLimiter:
        return cls([TokenBucket.full(limit, now) for limit in PLATFORM_LIMITS[platform]])

    def available(self, now: datetime) -> int:
        """Whole messages that may go out right now."""
        return max(0, math.floor(min(b.available(now) for b in self.buckets) + 1e-9))

    def take(self, now: datetime) -> bool:
        if self.available(now) < 1:
            return False
        for bucket in self.buckets:
            bucket.take(now)
        self.changed = True
        return True

    def pause(self, seconds: float, now: datetime) -> None:
        for bucket in self.buckets:
            bucket.pause(seconds, now)
        self.changed = True

    def next_token_in(self, now: datetime) -> float:
        """Seconds until one more message may go."""
        waits = []
        for b in self.buckets:
            missing = 1.0 - b.available(now)
            waits.append(0.0 if missing <= 0 else missing / b.refill_per_second)
        return max(waits)


def plan_messages(groups: Sequence[Sequence[str]], available: int) -> tuple[list[list[str]], bool]:
    """Decide what goes out now. One message per group while tokens last; a burst bigger than the
    tokens is folded into a single digest (one token), so chat sees one summary instead of a
    throttled trickle. Returns (messages as lists of item ids, whether it is a digest)."""
    groups = [list(g) for g in groups if g]
    if not groups or available < 1:
        return [], False
    if len(groups) <= available:
        return groups, False
    return [[item for g in groups for item in g]], True
