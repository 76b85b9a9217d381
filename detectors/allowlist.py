"""Allowlists: networks, API keys and accounts whose traffic no detector should alert on (pure, vectorised)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from detectors.features import as_mask
from pipeline.privacy import fingerprint
from pipeline.schema import Alert, ConfigError, EntityKind

# Per-detector entries in `[detectors.<name>]`, next to its parameters; the registry takes them out
# before the parameters reach the detector.
ALLOW_PARAMS = {"allow_cidrs": "cidrs", "allow_keys": "keys", "allow_accounts": "accounts"}

# What `fingerprint()` and the parsers store in `api_key_id`: 20 lowercase hex characters, or a key
# id the log itself gave, stored as `id:<value>`. Anything else in `keys` is a raw key.
_STORED_KEY = re.compile(r"^(?:[0-9a-f]{20}|id:.+)$")
_IPV4 = r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$"
_EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class Allowlist:
    """What to leave out: source IPs inside `cidrs`, events with one of `keys` or `accounts`.

    Networks are kept as merged [first, last] address ranges (IPv4 as int64, IPv6 as Python
    ints), so a membership test is one searchsorted per distinct address, however many networks.
    """

    cidrs: tuple[str, ...] = ()
    keys: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()
    _v4: np.ndarray = field(default_factory=lambda: _EMPTY_RANGES, repr=False, compare=False)
    _v6: tuple[tuple[int, int], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def build(
        cls,
        cidrs: Iterable[Any] = (),
        keys: Iterable[Any] = (),
        accounts: Iterable[Any] = (),
        pepper: bytes | None = None,
        where: str = "allowlist",
        prefix: str = "",
    ) -> Allowlist:
        """From config values; a bad entry is a ConfigError naming the setting (`where`, then
        `prefix` + cidrs/keys/accounts) and the entry.

        `keys` may hold fingerprints (as stored in `api_key_id`) or raw keys, which are
        fingerprinted with `pepper` here and never kept. Values may be pydantic SecretStr.
        """
        networks = []
        setting = f"{where}.{prefix}"
        for entry in _entries(cidrs, f"{setting}cidrs"):
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{setting}cidrs: {entry!r} is not an IP network such as 10.0.0.0/8") from None
        fingerprints = set()
        for entry in _entries(keys, f"{setting}keys"):
            entry = entry.strip()
            if _STORED_KEY.match(entry):
                fingerprints.add(entry)
            elif pepper is None:
                raise ConfigError(f"{setting}keys: a raw key needs the pepper to be fingerprinted")
            else:
                fingerprints.add(fingerprint(entry, pepper))
        names = {entry.strip() for entry in _entries(accounts, f"{setting}accounts")}
        v4 = [(int(n.network_address), int(n.broadcast_address)) for n in networks if n.version == 4]
        v6 = [(int(n.network_address), int(n.broadcast_address)) for n in networks if n.version == 6]
        return cls(
            cidrs=tuple(sorted({str(n) for n in networks})),
            keys=frozenset(fingerprints),
            accounts=frozenset(names),
            _v4=np.array(_merge(v4), dtype=np.int64).reshape(-1, 2),
            _v6=tuple(_merge(v6)),
        )

    @property
    def empty(self) -> bool:
        return not (self.cidrs or self.keys or self.accounts)

    def union(self, other: Allowlist) -> Allowlist:
        """Both lists at once: the global `[allowlist]` plus one detector's own entries."""
        if other.empty:
            return self
        if self.empty:
            return other
        v4 = [tuple(r) for r in self._v4.tolist()] + [tuple(r) for r in other._v4.tolist()]
        return Allowlist(
            cidrs=tuple(sorted(set(self.cidrs) | set(other.cidrs))),
            keys=self.keys | other.keys,
            accounts=self.accounts | other.accounts,
            _v4=np.array(_merge(v4), dtype=np.int64).reshape(-1, 2),
            _v6=tuple(_merge([*self._v6, *other._v6])),
        )

    # -- events ------------------------------------------------------------------------------

    def ip_mask(self, ips: pd.Series) -> np.ndarray:
        """True where the address lies in an allowlisted network; tested once per distinct value."""
        if not self.cidrs:
            return np.zeros(len(ips), dtype=bool)
        codes, uniques = pd.factorize(pd.Series(ips, dtype="string"), use_na_sentinel=True)
        inside = np.append(self._contains(np.asarray(uniques, dtype=object)), False)  # index -1: no address
        return inside[codes]

    def event_mask(self, events: pd.DataFrame) -> np.ndarray:
        """True for events to leave out: allowlisted source IP, API key or account."""
        mask = self.ip_mask(events["source_ip"])
        if self.keys:
            mask |= as_mask(events["api_key_id"].isin(self.keys))
        if self.accounts:
            mask |= as_mask(events["account"].isin(self.accounts))
        return mask

    def drop_events(self, events: pd.DataFrame) -> pd.DataFrame:
        """The events without the allowlisted ones (the same frame when nothing is allowlisted)."""
        if self.empty or events.empty:
            return events
        mask = self.event_mask(events)
        return events if not mask.any() else events[~mask]

    # -- alerts ------------------------------------------------------------------------------

    def allows(self, alert: Alert) -> bool:
        """True when the alert's entity is allowlisted (a network only when wholly inside one)."""
        kind = alert.entity_kind
        if kind is EntityKind.API_KEY:
            return alert.entity in self.keys
        if kind is EntityKind.ACCOUNT:
            return alert.entity in self.accounts
        if kind is EntityKind.IP:
            return bool(self._contains(np.array([alert.entity], dtype=object))[0])
        if kind is EntityKind.SUBNET and self.cidrs:
            try:
                network = ipaddress.ip_network(alert.entity, strict=False)
            except ValueError:
                return False
            ranges = self._v4.tolist() if network.version == 4 else self._v6
            low, high = int(network.network_address), int(network.broadcast_address)
            return any(lo <= low and high <= hi for lo, hi in ranges)
        return False

    def drop_alerts(self, alerts: list[Alert]) -> list[Alert]:
        if self.empty:
            return alerts
        return [alert for alert in alerts if not self.allows(alert)]

    # -- addresses ---------------------------------------------------------------------------

    def _contains(self, addresses: np.ndarray) -> np.ndarray:
        """Membership of distinct address strings: IPv4 parsed with vectorised integer maths, the
        rest (IPv6, odd spellings) with `ipaddress`. IPv4-mapped IPv6 addresses count as IPv4."""
        result = np.zeros(len(addresses), dtype=bool)
        if len(addresses) == 0:
            return result
        octets = pd.Series(addresses, dtype="string").str.extract(_IPV4).astype("Int64")
        is_v4 = as_mask(octets.notna().all(axis=1) & octets.le(255).all(axis=1))
        if is_v4.any() and len(self._v4):
            parts = octets[is_v4].to_numpy(dtype=np.int64)
            values = (parts[:, 0] << 24) | (parts[:, 1] << 16) | (parts[:, 2] << 8) | parts[:, 3]
            result[is_v4] = _in_ranges(values, self._v4)
        for i in np.flatnonzero(~is_v4):
            try:
                address = ipaddress.ip_address(str(addresses[i]))
            except ValueError:
                continue
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            ranges = self._v4.tolist() if address.version == 4 else self._v6
            value = int(address)
            result[i] = any(lo <= value <= hi for lo, hi in ranges)
        return result


def allowlist_from_config(source: Mapping[str, Any] | Any | None, pepper: bytes | None) -> Allowlist:
    """The `[allowlist]` table (a mapping, or the settings model with the same fields)."""
    if source is None:
        return Allowlist()
    fields = ("cidrs", "keys", "accounts")
    values = dict(source) if isinstance(source, Mapping) else {name: getattr(source, name) for name in fields}
    unknown = sorted(set(values) - {"cidrs", "keys", "accounts"})
    if unknown:
        raise ConfigError(f"allowlist: unknown setting(s) {', '.join(unknown)} (known: accounts, cidrs, keys)")
    return Allowlist.build(values.get("cidrs", ()), values.get("keys", ()), values.get("accounts", ()), pepper)


def _entries(values: Iterable[Any] | None, where: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"{where}: expected a list, got {values!r}")
    entries = []
    for value in values:
        secret = getattr(value, "get_secret_value", None)
        value = secret() if callable(secret) else value
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: expected non-empty text, got {value!r}")
        entries.append(value)
    return entries


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ranges covering the same addresses (adjacent ones joined)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _in_ranges(values: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """For sorted disjoint [low, high] rows: is each value inside one? The range that could hold a
    value is the last one starting at or before it."""
    at = np.searchsorted(ranges[:, 0], values, "right") - 1
    return (at >= 0) & (values <= ranges[np.maximum(at, 0), 1])
