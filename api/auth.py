"""API keys (generated once, stored hashed, scoped) and the limiter that keeps brute force off them."""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import math
import secrets
import string
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from api.tables import api_keys
from pipeline.schema import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Scope(enum.StrEnum):
    ALERTS_READ = "alerts:read"
    ALERTS_WRITE = "alerts:write"
    EVENTS_READ = "events:read"
    INGEST = "ingest"
    # Prometheus scrapes with a key that can read nothing else.
    METRICS_READ = "metrics:read"
    ADMIN = "admin"


# Changing an alert means looking at it first; admin may do everything.
IMPLIED: dict[Scope, frozenset[Scope]] = {
    Scope.ALERTS_WRITE: frozenset({Scope.ALERTS_READ}),
    Scope.ADMIN: frozenset(Scope),
}


def parse_scopes(values: Iterable[str]) -> frozenset[Scope]:
    """Scope names (repeated or space/comma separated) to Scopes; an unknown name is a ConfigError."""
    names = [part for value in values for part in value.replace(",", " ").split()]
    known = {s.value: s for s in Scope}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown scope {unknown[0]!r} (known: {', '.join(known)})")
    if not names:
        raise ConfigError(f"a key needs at least one scope (known: {', '.join(known)})")
    return frozenset(known[n] for n in names)


def effective_scopes(granted: Iterable[Scope]) -> frozenset[Scope]:
    out: set[Scope] = set()
    for scope in granted:
        out.add(scope)
        out.update(IMPLIED.get(scope, ()))
    return frozenset(out)


# ---- keys ---------------------------------------------------------------------------------------

KEY_PREFIX = "mwk_"
KEY_ID_CHARS = 12
# 32 random bytes: far beyond guessing, so a plain SHA-256 of the key is enough at rest (a slow
# password hash protects low-entropy secrets; these are not), and no pepper has to be kept safe
# for keys to stay valid.
SECRET_BYTES = 32
_MAX_KEY_LEN = 128
_SECRET_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")
_HEX = frozenset("0123456789abcdef")
_SCOPE_NAMES = frozenset(s.value for s in Scope)
# Compared against when the key id is unknown, so a miss costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"mailwarden: no such key").hexdigest()
# last_used_at is refreshed at most this often: one write per key per minute, not per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def generate_key() -> tuple[str, str]:
    """A new key `mwk_<key id>_<secret>` and its key id (the part that may be shown later)."""
    key_id = secrets.token_hex(KEY_ID_CHARS // 2)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def split_key(raw: str) -> str | None:
    """The key id of a well-formed key, else None (nothing malformed reaches the database)."""
    if not raw.startswith(KEY_PREFIX) or len(raw) > _MAX_KEY_LEN:
        return None
    key_id = raw[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_ID_CHARS]
    rest = raw[len(KEY_PREFIX) + KEY_ID_CHARS :]
    if len(key_id) != KEY_ID_CHARS or not set(key_id) <= _HEX:
        return None
    if not rest.startswith("_") or len(rest) < 2 or not set(rest[1:]) <= _SECRET_ALPHABET:
        return None
    return key_id


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id and name and what it may do."""

    key_id: str
    name: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return scope in effective_scopes(self.scopes)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class KeyRing:
    """The api_keys table: create, verify (constant-time), list and revoke keys."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, name: str, scopes: Iterable[str | Scope], now: datetime | None = None) -> tuple[str, Principal]:
        """Store a new key; returns the raw key (shown once, never stored) and its principal."""
        if not name.strip():
            raise ConfigError("a key needs a name (who or what uses it)")
        granted = parse_scopes(str(s) for s in scopes)
        key_id, raw = generate_key()
        now = now or datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.insert().values(
                    key_id=key_id,
                    name=name.strip(),
                    key_hash=hash_key(raw),
                    scopes=" ".join(sorted(s.value for s in granted)),
                    created_at=now,
                )
            )
        return raw, Principal(key_id, name.strip(), granted)

    def verify(self, raw: str, now: datetime | None = None) -> tuple[Principal | None, str]:
        """(principal, "ok") for a valid key, else (None, "bad_key" | "revoked_key")."""
        key_id = split_key(raw)
        row = None
        if key_id is not None:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        stored = row.key_hash if row is not None else _DUMMY_HASH
        matches = hmac.compare_digest(stored.encode(), hash_key(raw).encode())
        if row is None or not matches:
            return None, "bad_key"
        if row.revoked_at is not None:
            return None, "revoked_key"
        now = now or datetime.now(timezone.utc)
        last = _utc(row.last_used_at)
        if last is None or now - last >= LAST_USED_RESOLUTION:
            with self.engine.begin() as conn:
                conn.execute(api_keys.update().where(api_keys.c.key_id == row.key_id).values(last_used_at=now))
        # A scope name this version does not know (written by a newer one) grants nothing.
        scopes = frozenset(Scope(s) for s in row.scopes.split() if s in _SCOPE_NAMES)
        return Principal(row.key_id, row.name, scopes), "ok"

    def list(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)).all()
        out = []
        for r in rows:
            item = {k: v for k, v in r._mapping.items() if k != "key_hash"}
            for col in ("created_at", "last_used_at", "revoked_at"):
                item[col] = _utc(item[col])
            item["scopes"] = item["scopes"].split()
            out.append(item)
        return out

    def revoke(self, key_id: str, now: datetime | None = None) -> bool:
        """Revoke a key by id; False when no active key has that id."""
        now = now or datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            result = conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return result.rowcount > 0


# ---- who is calling, and how often they failed ------------------------------------------------


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The caller's address: the peer, unless the peer is a trusted proxy; then the right-most
    X-Forwarded-For entry that is not itself a trusted proxy (left-most entries are client-made)."""
    peer = peer or "unknown"
    if not trusted or not forwarded_for or not _in_any(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a forged or garbled header: fall back to what we saw
        if not any(addr in net for net in trusted):
            return addr.compressed
    return peer


def _in_any(address: str, networks: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def client_bucket(address: str) -> str:
    """The unit failures are counted by: an IPv4 address, or the /64 of an IPv6 address (one host
    usually owns a whole /64, so counting single IPv6 addresses would be no limit at all)."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class FailureLimiter:
    """Failed authentications per client in a sliding window; at `max_failures` the client is
    refused (429) until its oldest failure leaves the window. In memory, per process."""

    def __init__(
        self,
        max_failures: int = 10,
        window_seconds: float = 60.0,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_failures < 1 or window_seconds <= 0:
            raise ValueError("max_failures and window_seconds must be positive")
        self.max_failures, self.window, self.max_clients = max_failures, window_seconds, max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int | None:
        """Seconds until this client may try again, or None when it may try now."""
        bucket = client_bucket(client)
        now = self._clock()
        with self._lock:
            times = self._failures.get(bucket)
            if times is None:
                return None
            self._expire(times, now)
            if not times:
                del self._failures[bucket]
                return None
            if len(times) < self.max_failures:
                return None
            return max(1, math.ceil(times[0] + self.window - now))

    def record_failure(self, client: str) -> None:
        bucket = client_bucket(client)
        now = self._clock()
        with self._lock:
            times = self._failures.setdefault(bucket, deque())
            self._expire(times, now)
            times.append(now)
            # Keep only what decides the block: older entries can never matter again.
            while len(times) > self.max_failures:
                times.popleft()
            self._failures.move_to_end(bucket)
            # Bounded memory under a spray from many addresses: forget the quietest clients first.
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()
