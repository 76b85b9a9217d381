"""Seeded, labelled synthetic traffic of a mail-sending service, for demos, tests and evaluation."""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

DEFAULT_START = datetime(2026, 11, 2, tzinfo=timezone.utc)

API_FILE = "api.jsonl"
EDGE_FILE = "nginx.log"
SMTP_FILE = "maillog"
LABELS_FILE = "labels.csv"
KEYS_FILE = "keys.json"
REVOKED_FILE = "revoked_keys.txt"
LABEL_COLUMNS = ("attack_kind", "entity_kind", "entity", "first_ts", "last_ts", "ips", "file", "params")
# Label kinds with this prefix are benign events that look suspicious (campaign bursts, key
# rotations, moves to another region); evaluation counts alerts on them as false positives.
LEGIT_PREFIX = "legit_"

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# ---------------------------------------------------------------------------------------------
# The world: real public prefixes by country.
#
# Every prefix is registered (RIR delegation data, which is what iptocc ships) to the country it is
# listed under, so offline geo lookups give the country claimed here. Many cloud regions are
# registered to the provider's home country (AWS Frankfurt is "US"), so foreign clouds are listed
# under their registration country, not their region. tests/unit/test_generate.py checks them all.
# "cloud" prefixes host servers (AWS, Google Cloud, Azure, DigitalOcean, Linode, Hetzner, OVH,
# Scaleway), "isp" prefixes are access networks (homes and offices).
PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "US": (("3.80.0.0/12", "cloud"), ("54.160.0.0/12", "cloud"), ("34.16.0.0/12", "cloud"),
           ("20.36.0.0/14", "cloud"), ("104.131.0.0/16", "cloud"), ("45.33.0.0/17", "cloud"),
           ("2600:1f18::/33", "cloud"), ("73.0.0.0/8", "isp"), ("2601::/20", "isp")),
    "DE": (("88.198.0.0/16", "cloud"), ("78.46.0.0/15", "cloud"), ("136.243.0.0/16", "cloud"),
           ("85.214.0.0/15", "cloud"), ("2a01:4f8::/32", "cloud"), ("91.0.0.0/10", "isp"),
           ("79.192.0.0/10", "isp")),
    "FR": (("51.68.0.0/16", "cloud"), ("5.39.0.0/17", "cloud"), ("87.98.128.0/17", "cloud"),
           ("137.74.0.0/16", "cloud"), ("51.15.0.0/16", "cloud"), ("163.172.0.0/16", "cloud"),
           ("2001:41d0::/32", "cloud"), ("82.64.0.0/14", "isp")),
    "GB": (("51.140.0.0/14", "cloud"), ("86.128.0.0/10", "isp"), ("81.128.0.0/11", "isp"),
           ("82.0.0.0/14", "isp"), ("2.96.0.0/13", "isp"), ("5.64.0.0/13", "isp")),
    "NL": (("145.53.0.0/16", "cloud"), ("37.97.128.0/17", "cloud"), ("77.160.0.0/12", "isp"),
           ("84.104.0.0/14", "isp"), ("62.45.0.0/16", "isp")),
    "IE": (("86.40.0.0/13", "isp"), ("109.76.0.0/14", "isp")),
    "FI": (("87.92.0.0/14", "isp"), ("91.152.0.0/13", "isp"), ("84.248.0.0/14", "isp"),
           ("88.192.0.0/14", "isp")),
    "JP": (("133.242.0.0/16", "cloud"), ("106.128.0.0/13", "isp"), ("60.32.0.0/12", "isp"),
           ("219.96.0.0/11", "isp"), ("114.144.0.0/12", "isp")),
    "SG": (("139.59.96.0/19", "cloud"), ("116.14.0.0/15", "isp"), ("118.189.0.0/16", "isp"),
           ("202.156.0.0/16", "isp"), ("42.60.0.0/15", "isp"), ("101.127.0.0/16", "isp")),
    "BR": (("179.96.0.0/13", "isp"), ("191.176.0.0/12", "isp"), ("152.240.0.0/12", "isp")),
    "IN": (("122.160.0.0/12", "isp"), ("117.192.0.0/10", "isp"), ("106.192.0.0/11", "isp"),
           ("157.32.0.0/12", "isp"), ("223.176.0.0/12", "isp")),
    "AU": (("1.128.0.0/11", "isp"), ("101.160.0.0/11", "isp"), ("120.144.0.0/13", "isp")),
    "CA": (("70.24.0.0/13", "isp"), ("99.224.0.0/11", "isp"), ("174.88.0.0/13", "isp")),
    "ES": (("83.32.0.0/11", "isp"), ("88.0.0.0/12", "isp"), ("79.144.0.0/12", "isp")),
    "IT": (("79.0.0.0/10", "isp"), ("93.32.0.0/12", "isp")),
    "SE": (("78.64.0.0/12", "isp"), ("83.248.0.0/13", "isp")),
    "PL": (("83.0.0.0/11", "isp"), ("89.64.0.0/12", "isp")),
    "RU": (("95.24.0.0/13", "isp"), ("77.37.128.0/17", "isp"), ("176.59.0.0/16", "isp"),
           ("213.87.0.0/16", "isp")),
    "CN": (("47.92.0.0/14", "cloud"), ("114.80.0.0/12", "isp"), ("180.96.0.0/11", "isp"),
           ("61.128.0.0/10", "isp"), ("119.120.0.0/13", "isp")),
    "VN": (("113.160.0.0/11", "isp"), ("27.64.0.0/12", "isp"), ("14.160.0.0/11", "isp"),
           ("171.224.0.0/11", "isp")),
    "KR": (("175.192.0.0/10", "isp"), ("211.200.0.0/13", "isp"), ("121.128.0.0/10", "isp"),
           ("1.208.0.0/12", "isp")),
    "NG": (("105.112.0.0/12", "isp"), ("41.58.0.0/16", "isp"), ("102.88.0.0/14", "isp"),
           ("197.210.0.0/16", "isp")),
    "ID": (("36.64.0.0/11", "isp"), ("114.120.0.0/13", "isp"), ("182.0.0.0/12", "isp")),
    "UA": (("176.36.0.0/14", "isp"), ("178.150.0.0/15", "isp")),
    "TR": (("78.160.0.0/11", "isp"), ("88.224.0.0/11", "isp"), ("85.96.0.0/12", "isp")),
    "ZA": (("41.0.0.0/11", "isp"), ("105.0.0.0/12", "isp"), ("197.80.0.0/13", "isp")),
    "MX": (("189.128.0.0/10", "isp"), ("201.96.0.0/11", "isp")),
}

# Rough centre (lat, lon) and business-hours UTC offset per country: enough for "far apart" and
# for putting a customer's daily peak in its own working day.
COUNTRY_GEO: dict[str, tuple[float, float, int]] = {
    "US": (39.0, -98.0, -5), "DE": (51.0, 10.0, 1), "FR": (46.5, 2.5, 1), "GB": (54.0, -2.0, 0),
    "NL": (52.2, 5.3, 1), "IE": (53.2, -8.0, 0), "FI": (62.0, 26.0, 2), "JP": (36.0, 138.0, 9),
    "SG": (1.35, 103.8, 8), "BR": (-14.0, -51.0, -3), "IN": (21.0, 78.0, 5), "AU": (-25.0, 134.0, 10),
    "CA": (56.0, -106.0, -5), "ES": (40.0, -4.0, 1), "IT": (42.8, 12.8, 1), "SE": (62.0, 15.0, 1),
    "PL": (52.0, 19.0, 1), "RU": (55.8, 37.6, 3), "CN": (35.0, 105.0, 8), "VN": (16.0, 108.0, 7),
    "KR": (36.5, 127.8, 9), "NG": (9.0, 8.0, 1), "ID": (-2.0, 118.0, 7), "UA": (49.0, 32.0, 2),
    "TR": (39.0, 35.0, 3), "ZA": (-29.0, 24.0, 2), "MX": (23.0, -102.0, -6),
}

# Where the service's customers are (weights), and where attacks come from.
CUSTOMER_COUNTRIES: dict[str, float] = {
    "US": 0.28, "DE": 0.12, "GB": 0.09, "FR": 0.07, "NL": 0.05, "JP": 0.05, "BR": 0.05,
    "IN": 0.05, "AU": 0.04, "CA": 0.04, "IE": 0.03, "SG": 0.03, "ES": 0.03, "IT": 0.03,
    "FI": 0.02, "SE": 0.02, "PL": 0.02,
}
ATTACK_COUNTRIES = ("RU", "CN", "VN", "KR", "NG", "ID", "UA", "TR", "ZA", "MX", "BR", "IN")
# Rented servers abroad are where floods and scanners usually run from.
HOSTING_COUNTRIES = ("US", "DE", "FR", "NL", "CN", "SG")

SDK_AGENTS = (
    "sendkit-python/4.2.1", "sendkit-python/4.1.0", "sendkit-node/3.4.2", "sendkit-node/3.2.0",
    "sendkit-go/1.8.2", "sendkit-ruby/2.0.4", "sendkit-php/5.1.0", "sendkit-java/2.3.0",
    "sendkit-dotnet/1.6.1", "curl/8.5.0", "python-requests/2.32.3", "axios/1.7.7",
    "Go-http-client/2.0", "PostmanRuntime/7.42.0",
)
SDK_WEIGHTS = (0.16, 0.06, 0.15, 0.05, 0.08, 0.05, 0.1, 0.08, 0.05, 0.04, 0.07, 0.05, 0.04, 0.02)
BROWSER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
)
TOOL_AGENTS = ("python-requests/2.31.0", "curl/7.88.1", "Go-http-client/1.1", "python-httpx/0.27.2")
SCANNER_AGENTS = (
    "Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)",
    "gobuster/3.6", "Fuzz Faster U Fool v2.1.0-dev", "Mozilla/5.0 zgrab/0.x",
)

# Share of a customer's calls per local hour: quiet nights, office-hours plateau.
_DIURNAL = np.array([0.25, 0.2, 0.18, 0.18, 0.2, 0.3, 0.5, 0.8, 1.2, 1.5, 1.6, 1.6,
                     1.5, 1.5, 1.6, 1.5, 1.4, 1.2, 1.0, 0.9, 0.8, 0.6, 0.45, 0.35])
_DIURNAL_CDF = np.cumsum(_DIURNAL) / _DIURNAL.sum()

# API endpoints: (method, path or path prefix, success status, share of calls, dynamic part).
_ENDPOINTS = (
    ("POST", "/v3/mail/send", 202, 0.80, ""),
    ("GET", "/v3/messages/", 200, 0.06, "uuid"),
    ("GET", "/v3/stats?start_date=", 200, 0.04, "date"),
    ("GET", "/v3/suppressions/bounces?limit=100", 200, 0.03, ""),
    ("DELETE", "/v3/suppressions/bounces/", 204, 0.01, "email"),
    ("GET", "/v3/templates", 200, 0.03, ""),
    ("GET", "/v3/domains", 200, 0.02, ""),
    ("GET", "/v3/webhooks", 200, 0.01, ""),
)
_EP_SEND, _EP_MESSAGE, _EP_STATS, _EP_DELETE = 0, 1, 2, 4

_WEB_FIRST = (("GET", "/", 200, 5200), ("GET", "/login", 200, 4100))
_WEB_PAGES = (
    ("GET", "/dashboard", 200, 18000), ("GET", "/static/js/app.3f9c2a1b.js", 200, 251000),
    ("GET", "/static/css/app.8d1e4f02.css", 200, 42000), ("GET", "/favicon.ico", 200, 1150),
    ("GET", "/api/session", 200, 380), ("GET", "/dashboard/activity", 200, 9100),
    ("GET", "/dashboard/keys", 200, 7000), ("GET", "/settings/domains", 200, 6200),
    ("GET", "/docs/api", 200, 30500), ("POST", "/logout", 302, 0),
)
_PROBE_PATHS = ("/.env", "/wp-login.php", "/robots.txt", "/.git/config", "/phpmyadmin/",
                "/server-status", "/actuator/health", "/xmlrpc.php", "/admin/", "/sitemap.xml")
_ENUM_WORDS = (
    "admin", "backup", "backups", "old", "new", "test", "dev", "staging", "api", "v1", "v2", "v4",
    "internal", "private", "config", "debug", "console", "db", "sql", "dump", "export", "import",
    "upload", "uploads", "files", "logs", "log", "tmp", "temp", "cgi-bin", "wp-admin", "wp-content",
    "wp-includes", "phpinfo", "info", "status", "metrics", "swagger", "graphql", "env", "secret",
    "keys", "credentials", "users", "accounts", "billing", "invoices", "setup", "install", "shell",
)
_ENUM_SUFFIX = ("", ".php", ".bak", ".zip", ".json", ".old", ".sql", ".tar.gz", "/", ".txt")

_NAME_A = ("bright", "north", "blue", "swift", "green", "silver", "clear", "river", "stone", "maple",
           "harbor", "summit", "pixel", "cloud", "iron", "sunny", "oak", "coral", "atlas", "nova")
_NAME_B = ("lane", "works", "labs", "mart", "hub", "stack", "cart", "desk", "pay", "ship",
           "mail", "bit", "forge", "ware", "path", "box", "loop", "nest", "wave", "field")
_MAILBOXES = ("noreply", "notifications", "mailer", "billing", "smtp", "alerts", "no-reply", "app")
_FIRST = ("anna", "ben", "chen", "dina", "eric", "fatima", "george", "hana", "ivan", "julia",
          "kenji", "laura", "mohamed", "nina", "omar", "paula", "raj", "sofia", "tom", "yuki")
_LAST = ("smith", "mueller", "garcia", "tanaka", "rossi", "kowalski", "silva", "kumar", "martin",
         "jones", "nguyen", "kim", "ivanova", "dubois", "brown", "schmidt", "lopez", "sato")
_WEBMAIL = ("webmail.example", "inbox.example", "mailbox.example", "post.example")
_GUESSED = ("admin", "info", "test", "postmaster", "user", "sales", "support", "office", "contact",
            "webmaster")

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HEX = "0123456789abcdef"
_HEX_UPPER = "0123456789ABCDEF"


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class TrafficParams:
    """Normal traffic at scale 1; `scale` multiplies every volume (customers grow with its root)."""

    customers: int = 300
    api_calls_per_day: int = 80_000  # api.jsonl customers
    edge_calls_per_day: int = 34_000  # nginx.log customers (another edge, other customers)
    web_sessions_per_day: int = 700  # dashboard users on the nginx front, ~8 hits each
    smtp_sessions_per_day: int = 20_000
    scanner_ips_per_day: int = 30  # internet background: a few probes per IP
    smtp_noise_ips_per_day: int = 25  # internet background: 1-3 guesses per IP
    edge_share: float = 0.35
    smtp_share: float = 0.4
    weekend_factor: float = 0.45
    rotation_share: float = 0.06
    region_move_share: float = 0.04
    campaigns_per_day: float = 0.6
    campaign_calls: int = 30_000
    campaign_minutes: float = 20.0
    stale_password_clients: int = 2


@dataclass(frozen=True)
class IpFlood:
    enabled: bool = True
    requests: int = 3000
    minutes: float = 4.0


@dataclass(frozen=True)
class SmtpBruteforce:
    enabled: bool = True
    attempts: int = 600
    accounts: int = 3
    minutes: float = 40.0


@dataclass(frozen=True)
class CredentialStuffing:
    enabled: bool = True
    ips: int = 3
    accounts: int = 400
    hits: int = 3  # accounts whose leaked password still works
    minutes: float = 90.0


@dataclass(frozen=True)
class PasswordSprayingLowSlow:
    enabled: bool = True
    ips: int = 300
    accounts: int = 200
    hours: float = 24.0  # capped at 70% of the generated period
    max_tries_per_ip_hour: int = 2


@dataclass(frozen=True)
class LeakedKey:
    enabled: bool = True
    ips: int = 40
    countries: int = 5
    requests: int = 800
    hours: float = 3.0


@dataclass(frozen=True)
class ImpossibleTravel:
    enabled: bool = True
    minutes: float = 10.0
    requests_home: int = 4
    requests_far: int = 6
    min_km: float = 8000.0


@dataclass(frozen=True)
class RevokedKey:
    enabled: bool = True
    requests: int = 25
    minutes: float = 45.0


@dataclass(frozen=True)
class PlaintextHttp:
    enabled: bool = True
    requests: int = 60
    hours: float = 2.0


@dataclass(frozen=True)
class SpamVolumeSpike:
    enabled: bool = True
    factor: float = 20.0
    hours: float = 2.0
    min_calls: int = 40


@dataclass(frozen=True)
class PathEnumeration:
    enabled: bool = True
    paths: int = 400
    minutes: float = 6.0


@dataclass(frozen=True)
class SecretInUrl:
    enabled: bool = True
    requests: int = 20
    hours: float = 6.0


@dataclass(frozen=True)
class AttackParams:
    """One field per attack kind (the field name is the label's attack_kind)."""

    ip_flood: IpFlood = field(default_factory=IpFlood)
    smtp_bruteforce: SmtpBruteforce = field(default_factory=SmtpBruteforce)
    credential_stuffing: CredentialStuffing = field(default_factory=CredentialStuffing)
    password_spraying_low_slow: PasswordSprayingLowSlow = field(default_factory=PasswordSprayingLowSlow)
    leaked_key: LeakedKey = field(default_factory=LeakedKey)
    impossible_travel: ImpossibleTravel = field(default_factory=ImpossibleTravel)
    revoked_key: RevokedKey = field(default_factory=RevokedKey)
    plaintext_http: PlaintextHttp = field(default_factory=PlaintextHttp)
    spam_volume_spike: SpamVolumeSpike = field(default_factory=SpamVolumeSpike)
    path_enumeration: PathEnumeration = field(default_factory=PathEnumeration)
    secret_in_url: SecretInUrl = field(default_factory=SecretInUrl)

    def enabled_kinds(self) -> list[str]:
        return [name for name, p in vars(self).items() if p.enabled]


ATTACK_KINDS = tuple(AttackParams.__dataclass_fields__)


@dataclass
class GenerateSummary:
    out_dir: Path
    seed: int
    start: datetime
    end: datetime
    files: dict[str, int]  # data file name -> lines written
    labels: dict[str, int]  # attack_kind -> label rows

    @property
    def lines(self) -> int:
        return sum(self.files.values())


Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------
# Small vectorised helpers


def _tokens(rng: np.random.Generator, n: int, length: int, alphabet: str = _HEX) -> pl.Series:
    """n random strings, built as one byte matrix (a Python loop costs ~2x for a million)."""
    table = np.frombuffer(alphabet.encode(), dtype=np.uint8)
    chars = np.ascontiguousarray(table[rng.integers(0, len(table), (n, length), dtype=np.uint8)])
    return pl.Series(chars.view(f"S{length}").ravel()).cast(pl.String)


def _uuids(rng: np.random.Generator, n: int) -> pl.Series:
    raw = pl.DataFrame({"h": _tokens(rng, n, 32)})
    parts = [pl.col("h").str.slice(a, b - a) for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))]
    return raw.select(pl.concat_str(parts, separator="-").alias("u"))["u"]


def _pick(values: Sequence[Any], idx: np.ndarray, dtype: Any = pl.String) -> pl.Series:
    return pl.Series(values, dtype=dtype).gather(np.asarray(idx, dtype=np.int64))


def _diurnal_ts(rng: np.random.Generator, start_ms: int, day: np.ndarray, tz: np.ndarray,
                flat: np.ndarray) -> np.ndarray:
    """Timestamps inside each event's UTC day, peaking in the owner's local working hours."""
    n = len(day)
    local = np.searchsorted(_DIURNAL_CDF, rng.random(n), side="right")
    # Machine-driven senders (cron, queues) have no daily rhythm.
    hour = np.where(flat, rng.integers(0, 24, n), local)
    utc_hour = (hour - tz) % 24
    return start_ms + day * DAY_MS + utc_hour * HOUR_MS + rng.integers(0, HOUR_MS, n)


def _km(a: str, b: str) -> float:
    lat1, lon1, _ = COUNTRY_GEO[a]
    lat2, lon2, _ = COUNTRY_GEO[b]
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def _draw_ip(rng: np.random.Generator, cidr: str) -> str:
    net = ipaddress.ip_network(cidr)
    if net.version == 4:
        # Skip .0 and .255: they are rarely client addresses.
        blocks = net.num_addresses // 256
        offset = int(rng.integers(0, blocks)) * 256 + int(rng.integers(1, 255))
    else:
        subnets = net.num_addresses >> 64
        offset = (int.from_bytes(rng.bytes(8), "big") % subnets) << 64 | int.from_bytes(rng.bytes(8), "big")
    return str(net.network_address + offset)


def _fresh_ips(rng: np.random.Generator, used: set[str], countries: Sequence[str], n: int,
               kind: str | None = None, v4_only: bool = False) -> list[str]:
    """n addresses nobody else uses, cycling through `countries`; `used` is only tested, never iterated."""
    out: list[str] = []
    for i in range(n):
        country = countries[i % len(countries)]
        prefixes = [p for p, k in PREFIXES[country] if (kind is None or k == kind)
                    and not (v4_only and ":" in p)] or [p for p, _ in PREFIXES[country] if ":" not in p]
        while True:
            ip = _draw_ip(rng, prefixes[int(rng.integers(0, len(prefixes)))])
            if ip not in used:
                break
        used.add(ip)
        out.append(ip)
    return out


# ---------------------------------------------------------------------------------------------
# Row frames: one schema for HTTP files, one for the mail log.

_HTTP_SCHEMA: dict[str, Any] = {
    "ts": pl.Int64, "ip": pl.String, "method": pl.String, "path": pl.String, "status": pl.Int64,
    "key": pl.String, "account": pl.String, "recipients": pl.Int64, "scheme": pl.String,
    "ua": pl.String, "dur": pl.Int64, "bytes": pl.Int64, "xff": pl.String, "rid": pl.String,
}
_SMTP_SCHEMA: dict[str, Any] = {
    "ts": pl.Int64, "ip": pl.String, "rdns": pl.String, "ok": pl.Boolean, "user": pl.String,
    "mech": pl.String, "pid": pl.Int64, "host": pl.String, "qid": pl.String,
}


def _frame(schema: dict[str, Any], n: int, **cols: Any) -> pl.DataFrame:
    """A frame of n rows: columns given as arrays/lists/Series or scalars; missing ones are null."""
    data = {}
    for name, dtype in schema.items():
        value = cols.get(name)
        if value is None or isinstance(value, str | int | float | bool):
            data[name] = pl.repeat(value, n, dtype=dtype, eager=True)
        elif isinstance(value, pl.Series):
            data[name] = value.alias(name).cast(dtype)
        else:
            data[name] = pl.Series(name, value).cast(dtype)
    return pl.DataFrame(data).select([pl.col(c).alias(c) for c in schema])


def _durations(rng: np.random.Generator, status: np.ndarray) -> np.ndarray:
    """Duration in tenths of a millisecond: ~35 ms, quick 4xx, slow 5xx (502 is an upstream timeout)."""
    n = len(status)
    dur = np.exp(rng.normal(math.log(350), 0.6, n))
    dur = np.where((status >= 400) & (status < 500), dur * 0.15, dur)
    dur = np.where(status == 502, 300_000 + rng.integers(0, 2000, n), dur)
    dur = np.where((status == 500) | (status == 503), dur * 4, dur)
    return np.maximum(dur.astype(np.int64), 3)


def _http_bytes(rng: np.random.Generator, status: np.ndarray, method: np.ndarray) -> np.ndarray:
    n = len(status)
    get = np.exp(rng.normal(7.5, 1.0, n)).astype(np.int64) + 40
    small = rng.integers(58, 97, n)
    err = rng.integers(88, 181, n)
    out = np.where(method == "GET", get, small)
    out = np.where(status >= 400, err, out)
    return np.where(status == 204, 0, out)


def _api_status(rng: np.random.Generator, ep: np.ndarray) -> np.ndarray:
    """Everyday noise: bad payloads, missing keys, 404s on lookups, rate limits, rare 5xx."""
    n = len(ep)
    base = np.array([e[2] for e in _ENDPOINTS])[ep]
    u = rng.random(n)
    send = ep == _EP_SEND
    lookup = (ep == _EP_MESSAGE) | (ep == _EP_DELETE)
    conds = [u < 0.003, u < 0.005, u < 0.017, u < 0.021, u < 0.0222, u < 0.0226, u < 0.0234,
             send & (u < 0.0294), send & (u < 0.0299), lookup & (u < 0.0734)]
    codes = [401, 403, 400, 429, 500, 502, 503, 422, 413, 404]
    return np.select(conds, codes, default=base)


def _ok_status(method: pl.Expr) -> pl.Expr:
    return pl.when(method == "POST").then(202).when(method == "DELETE").then(204).otherwise(200)


def _retries(rng: np.random.Generator, frame: pl.DataFrame, w: _World) -> pl.DataFrame:
    """SDKs retry 429 and 5xx after a backoff; most retries succeed."""
    failed = frame.filter(pl.col("status").is_in([429, 500, 502, 503]))
    failed = failed.filter(pl.Series(rng.random(failed.height) < 0.85))
    n = failed.height
    status = failed["status"].to_numpy()
    delay = np.where(status == 429, rng.integers(1000, 8000, n), rng.integers(300, 3000, n))
    recovered = rng.random(n) < 0.9
    retried = failed.with_columns(
        ts=pl.Series(np.minimum(failed["ts"].to_numpy() + delay, w.end_ms - 1)),
        status=pl.when(pl.Series(recovered)).then(_ok_status(pl.col("method"))).otherwise(503).cast(pl.Int64),
        rid=_tokens(rng, n, 16),
    )
    retried = retried.with_columns(dur=pl.Series(_durations(rng, retried["status"].to_numpy())))
    # A retry that would land after its key was rotated away is dropped: the old key stops cleanly,
    # and only the revoked_key attack presents it again.
    rotated = w.key_new != w.key_old
    cutoff = pl.DataFrame({"key": [w.keys[i] for i in w.key_old[rotated]], "rot": w.rot_ms[rotated]},
                          schema={"key": pl.String, "rot": pl.Int64})
    return (retried.join(cutoff, on="key", how="left", maintain_order="left")
            .filter(pl.col("rot").is_null() | (pl.col("ts") < pl.col("rot"))).drop("rot"))


# ---------------------------------------------------------------------------------------------
# The world: customers, their keys, IPs, habits.


@dataclass
class _World:
    start_ms: int
    end_ms: int
    days: int
    day_factor: np.ndarray
    country: list[str]
    seg: np.ndarray  # 0 = api.jsonl customer, 1 = nginx.log customer
    tz: np.ndarray
    flat: np.ndarray
    w_api: np.ndarray
    w_smtp: np.ndarray
    has_smtp: np.ndarray
    ua: np.ndarray
    recip_scale: np.ndarray
    mech: list[str]
    xff: list[str | None]
    acct: list[str]
    domain: list[str]
    smtp_user: list[str | None]
    keys: list[str]
    key_old: np.ndarray
    key_new: np.ndarray
    rot_ms: np.ndarray
    ips: list[str]
    rdns: list[str]
    ip_old_off: np.ndarray
    ip_old_cnt: np.ndarray
    ip_new_off: np.ndarray
    ip_new_cnt: np.ndarray
    move_ms: np.ndarray
    used_ips: set[str]
    campaign_customers: np.ndarray

    @property
    def n(self) -> int:
        return len(self.acct)

    def customer_ips(self, c: int, at_ms: int) -> list[str]:
        off, cnt = ((self.ip_old_off[c], self.ip_old_cnt[c]) if at_ms < self.move_ms[c]
                    else (self.ip_new_off[c], self.ip_new_cnt[c]))
        return self.ips[off:off + cnt]

    def key_at(self, c: int, at_ms: int) -> str:
        return self.keys[self.key_old[c] if at_ms < self.rot_ms[c] else self.key_new[c]]


def _make_world(rng: np.random.Generator, start_ms: int, days: int, scale: float,
                tp: TrafficParams) -> _World:
    n = max(16, int(round(tp.customers * math.sqrt(scale))))
    period = days * DAY_MS
    end_ms = start_ms + period
    weekday0 = datetime.fromtimestamp(start_ms / 1000, tz=timezone.utc).weekday()
    day_factor = np.array([tp.weekend_factor if (weekday0 + d) % 7 >= 5 else 1.0 for d in range(days)])

    countries = list(CUSTOMER_COUNTRIES)
    cw = np.array(list(CUSTOMER_COUNTRIES.values()))
    country = [countries[i] for i in rng.choice(len(countries), n, p=cw / cw.sum())]
    seg = (rng.random(n) < tp.edge_share).astype(np.int8)
    # Both segments need enough members for the attacks that pick victims there.
    seg[:4] = 0
    seg[4:8] = 1
    tz = np.array([COUNTRY_GEO[c][2] for c in country])
    flat = rng.random(n) < 0.3
    # Heavy-tailed customer sizes: a few senders make most of the traffic.
    w_api = rng.lognormal(0.0, 1.4, n)
    w_smtp = rng.lognormal(0.0, 1.2, n)
    has_smtp = rng.random(n) < tp.smtp_share
    has_smtp[8:12] = True
    sdk_w = np.array(SDK_WEIGHTS)
    ua = rng.choice(len(SDK_AGENTS), n, p=sdk_w / sdk_w.sum())
    recip_scale = rng.lognormal(math.log(0.15), 1.5, n)
    mech = ["LOGIN" if x else "PLAIN" for x in rng.random(n) < 0.6]
    xff = [f"10.{int(rng.integers(0, 256))}.{int(rng.integers(0, 256))}.{int(rng.integers(1, 255))}"
           if x else None for x in rng.random(n) < 0.05]

    ids = rng.choice(90_000, n, replace=False) + 10_000
    acct = [f"acct_{i}" for i in ids]
    domain, seen = [], {}
    for a, b in zip(rng.integers(0, len(_NAME_A), n), rng.integers(0, len(_NAME_B), n), strict=True):
        name = _NAME_A[a] + _NAME_B[b]
        seen[name] = seen.get(name, 0) + 1
        domain.append(f"{name}{seen[name] if seen[name] > 1 else ''}.example")
    smtp_user = [f"{_MAILBOXES[int(rng.integers(0, len(_MAILBOXES)))]}@{d}" if s else None
                 for d, s in zip(domain, has_smtp, strict=True)]

    # Keys: one each; rotating customers get a second one and stop using the first.
    rotating = rng.random(n) < tp.rotation_share
    rotating[0] = True  # the revoked_key attack needs at least one api.jsonl rotation
    keys = [f"mk_live_{k}" for k in _tokens(rng, n + int(rotating.sum()), 32, _B62).to_list()]
    key_old = np.arange(n)
    key_new = key_old.copy()
    key_new[rotating] = n + np.arange(int(rotating.sum()))
    sentinel = np.iinfo(np.int64).max
    rot_ms = np.full(n, sentinel, dtype=np.int64)
    rot_ms[rotating] = start_ms + (rng.uniform(0.15, 0.5, int(rotating.sum())) * period).astype(np.int64)

    # IPs: 1-3 per customer, mostly servers in their own country; movers get a new set later.
    moving = rng.random(n) < tp.region_move_share
    moving[0] = False
    used: set[str] = set()
    ips: list[str] = []
    rdns: list[str] = []
    old_off, old_cnt = np.zeros(n, np.int64), np.zeros(n, np.int64)
    new_off, new_cnt = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for c in range(n):
        count = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        kind = "cloud" if rng.random() < 0.75 else "isp"
        named = rng.random() < 0.3
        for which in ("old", "new") if moving[c] else ("old",):
            off = len(ips)
            drawn = _fresh_ips(rng, used, [country[c]], count, kind)
            ips.extend(drawn)
            rdns.extend([f"mail{j + 1}.{domain[c].removesuffix('.example')}.example" if named else "unknown"
                         for j in range(count)])
            if which == "old":
                old_off[c], old_cnt[c] = off, count
            else:
                new_off[c], new_cnt[c] = off, count
        if not moving[c]:
            new_off[c], new_cnt[c] = old_off[c], old_cnt[c]
    move_ms = np.full(n, sentinel, dtype=np.int64)
    move_ms[moving] = start_ms + (rng.uniform(0.2, 0.8, int(moving.sum())) * period).astype(np.int64)

    # The biggest senders run scheduled campaigns (index 0 is kept for the revoked-key story).
    order = np.argsort(-w_api, kind="stable")
    campaign_customers = order[order != 0][: max(2, n // 40)]
    return _World(
        start_ms=start_ms, end_ms=end_ms, days=days, day_factor=day_factor, country=country, seg=seg,
        tz=tz, flat=flat, w_api=w_api, w_smtp=w_smtp, has_smtp=has_smtp, ua=ua, recip_scale=recip_scale,
        mech=mech, xff=xff, acct=acct, domain=domain, smtp_user=smtp_user, keys=keys, key_old=key_old,
        key_new=key_new, rot_ms=rot_ms, ips=ips, rdns=rdns, ip_old_off=old_off, ip_old_cnt=old_cnt,
        ip_new_off=new_off, ip_new_cnt=new_cnt, move_ms=move_ms, used_ips=used,
        campaign_customers=campaign_customers,
    )


def _customer_ip_idx(rng: np.random.Generator, w: _World, cust: np.ndarray, ts: np.ndarray) -> np.ndarray:
    moved = ts >= w.move_ms[cust]
    off = np.where(moved, w.ip_new_off[cust], w.ip_old_off[cust])
    cnt = np.where(moved, w.ip_new_cnt[cust], w.ip_old_cnt[cust])
    # The first address carries most traffic (primary server), the others less.
    slot = np.minimum((cnt * rng.random(len(cust)) ** 2).astype(np.int64), cnt - 1)
    return off + slot


def _recipients(rng: np.random.Generator, scale: np.ndarray) -> np.ndarray:
    """Mostly one recipient (transactional mail), a Pareto tail of batch sends up to 1000."""
    return np.minimum(1 + np.floor(scale * rng.pareto(1.5, len(scale))), 1000).astype(np.int64)


def _api_calls(rng: np.random.Generator, w: _World, cust: np.ndarray, ts: np.ndarray, ep: np.ndarray,
               status: np.ndarray) -> pl.DataFrame:
    """HTTP rows of customers' own API calls (normal traffic, campaigns, most key-based attacks)."""
    n = len(cust)
    key_idx = np.where(ts < w.rot_ms[cust], w.key_old[cust], w.key_new[cust])
    missing_key = status == 401  # the SDK sent no key: the service knows neither key nor account
    methods = np.array([e[0] for e in _ENDPOINTS])[ep]
    frame = _frame(
        _HTTP_SCHEMA, n, ts=ts, ip=_pick(w.ips, _customer_ip_idx(rng, w, cust, ts)),
        method=methods, status=status,
        key=_pick(w.keys, key_idx).set(pl.Series(missing_key), None),
        account=_pick(w.acct, cust).set(pl.Series(missing_key), None),
        recipients=np.where(ep == _EP_SEND, _recipients(rng, w.recip_scale[cust]), -1),
        scheme="https", ua=_pick(SDK_AGENTS, w.ua[cust]), dur=_durations(rng, status),
        bytes=_http_bytes(rng, status, methods), xff=_pick(w.xff, cust), rid=_tokens(rng, n, 16),
    )
    return frame.with_columns(
        recipients=pl.when(pl.col("recipients") >= 0).then(pl.col("recipients")),
        path=_api_paths(rng, ep, ts),
    )


def _api_paths(rng: np.random.Generator, ep: np.ndarray, ts: np.ndarray) -> pl.Series:
    path = _pick([e[1] for e in _ENDPOINTS], ep)
    dyn = pl.repeat("", len(ep), dtype=pl.String, eager=True)
    msg = np.flatnonzero(ep == _EP_MESSAGE)
    if len(msg):
        dyn = dyn.scatter(msg, _uuids(rng, len(msg)))
    stats = np.flatnonzero(ep == _EP_STATS)
    if len(stats):
        days = pl.Series(ts[stats] - 7 * DAY_MS).cast(pl.Datetime("ms")).dt.strftime("%Y-%m-%d")
        dyn = dyn.scatter(stats, days + "&aggregated_by=day")
    dele = np.flatnonzero(ep == _EP_DELETE)
    if len(dele):
        first = _pick(_FIRST, rng.integers(0, len(_FIRST), len(dele)))
        last = _pick(_LAST, rng.integers(0, len(_LAST), len(dele)))
        host = _pick(_WEBMAIL, rng.integers(0, len(_WEBMAIL), len(dele)))
        dyn = dyn.scatter(dele, first + "." + last + "%40" + host)
    return path + dyn


def _segment_traffic(rng: np.random.Generator, w: _World, seg: int, per_day: float) -> pl.DataFrame:
    members = np.flatnonzero(w.seg == seg)
    weights = w.w_api[members] / w.w_api[members].sum()
    lam = per_day * np.outer(w.day_factor, weights)
    counts = rng.poisson(lam).ravel()
    cust = np.repeat(np.tile(members, w.days), counts)
    day = np.repeat(np.repeat(np.arange(w.days), len(members)), counts)
    ts = _diurnal_ts(rng, w.start_ms, day, w.tz[cust], w.flat[cust])
    ep = rng.choice(len(_ENDPOINTS), len(cust), p=np.array([e[3] for e in _ENDPOINTS]))
    return _api_calls(rng, w, cust, ts, ep, _api_status(rng, ep))


def _campaigns(rng: np.random.Generator, w: _World, tp: TrafficParams, scale: float
               ) -> tuple[dict[int, list[pl.DataFrame]], list[dict[str, Any]]]:
    """Big customers' scheduled sends: tens of thousands of calls in minutes, from their usual IPs."""
    frames: dict[int, list[pl.DataFrame]] = {0: [], 1: []}
    labels = []
    count = max(1, int(rng.poisson(tp.campaigns_per_day * w.days)))
    for _ in range(count):
        c = int(w.campaign_customers[int(rng.integers(0, len(w.campaign_customers)))])
        calls = max(100, int(tp.campaign_calls * scale * rng.uniform(0.6, 1.3)))
        minutes = round(tp.campaign_minutes * rng.uniform(0.8, 1.2), 1)
        span = int(minutes * MINUTE_MS)
        # Launched on the hour in the customer's morning, on any day.
        day = int(rng.integers(0, w.days))
        hour = (int(rng.integers(8, 12)) - int(w.tz[c])) % 24
        t0 = min(w.start_ms + day * DAY_MS + hour * HOUR_MS, w.end_ms - span - MINUTE_MS)
        ts = t0 + np.sort(rng.integers(0, span, calls))
        cust = np.full(calls, c)
        ep = np.zeros(calls, dtype=np.int64)
        status = np.where(rng.random(calls) < 0.02, 429, 202)
        frame = _api_calls(rng, w, cust, ts, ep, status).with_columns(recipients=pl.lit(1, pl.Int64))
        frame = pl.concat([frame, _retries(rng, frame, w)])
        frames[int(w.seg[c])].append(frame)
        labels.append(_label(
            "legit_campaign", "account", w.acct[c], frame, API_FILE if w.seg[c] == 0 else EDGE_FILE,
            {"calls": calls, "minutes": minutes, "account": w.acct[c],
             "api_key": w.key_at(c, t0)}, ips=sorted(set(frame["ip"].to_list()))))
    return frames, labels


def _web_traffic(rng: np.random.Generator, w: _World, tp: TrafficParams, scale: float) -> pl.DataFrame:
    """People using the dashboard behind the same nginx, plus internet scanners' background probes."""
    sessions = rng.poisson(tp.web_sessions_per_day * scale * w.day_factor)
    s_total = int(sessions.sum())
    s_day = np.repeat(np.arange(w.days), sessions)
    s_country = rng.choice(len(w.country), s_total)
    s_cc = [w.country[i] for i in s_country]
    s_tz = np.array([COUNTRY_GEO[c][2] for c in s_cc], dtype=np.int64)
    s_start = _diurnal_ts(rng, w.start_ms, s_day, s_tz, np.zeros(s_total, bool))
    s_ip = [_fresh_ips(rng, w.used_ips, [cc], 1, "isp", v4_only=rng.random() < 0.8)[0] for cc in s_cc]
    s_ua = rng.integers(0, len(BROWSER_AGENTS), s_total)
    hits = 3 + rng.poisson(5, s_total)
    total = int(hits.sum())
    sess = np.repeat(np.arange(s_total), hits)
    first = np.concatenate([[0], np.cumsum(hits)[:-1]]) if s_total else np.zeros(0, np.int64)
    pos = np.arange(total) - np.repeat(first, hits)
    gaps = rng.exponential(25_000, total)
    gaps[first] = 0
    cum = np.cumsum(gaps)
    ts = s_start[sess] + (cum - np.repeat(cum[first], hits)).astype(np.int64) if total else np.zeros(0, np.int64)

    page = rng.integers(0, len(_WEB_PAGES), total)
    start_page = rng.integers(0, len(_WEB_FIRST), total)
    method = np.where(pos == 0, np.array([p[0] for p in _WEB_FIRST])[start_page],
                      np.where(pos == 1, "POST", np.array([p[0] for p in _WEB_PAGES])[page]))
    path = np.where(pos == 0, np.array([p[1] for p in _WEB_FIRST])[start_page],
                    np.where(pos == 1, "/login", np.array([p[1] for p in _WEB_PAGES])[page]))
    # A mistyped password now and then: the login form answers 401 once.
    login_fail = (pos == 1) & (rng.random(total) < 0.05)
    status = np.where(pos == 0, 200, np.where(pos == 1, np.where(login_fail, 401, 302),
                                              np.array([p[2] for p in _WEB_PAGES])[page]))
    size = np.where(pos == 0, np.array([p[3] for p in _WEB_FIRST])[start_page],
                    np.where(pos == 1, 0, np.array([p[3] for p in _WEB_PAGES])[page]))
    static = np.char.startswith(path.astype(str), "/static/")
    cached = static & (rng.random(total) < 0.4)
    status = np.where(cached, 304, status)
    size = np.where(cached, 0, size)
    # People who type the bare host name land on port 80 first and get redirected.
    plain_first = (pos == 0) & (rng.random(total) < 0.05)
    web = _frame(
        _HTTP_SCHEMA, total, ts=ts, ip=_pick(s_ip, sess), method=method, path=path, status=status,
        scheme=pl.Series(np.where(plain_first, "http", "https")), ua=_pick(BROWSER_AGENTS, s_ua[sess]),
        dur=_durations(rng, status), bytes=size,
    )
    redirect = pl.col("scheme") == "http"
    web = web.with_columns(status=pl.when(redirect).then(301).otherwise(pl.col("status")).cast(pl.Int64),
                           bytes=pl.when(redirect).then(162).otherwise(pl.col("bytes")).cast(pl.Int64))

    # Background scanners: every public server sees a few probes per IP per day.
    probes = rng.poisson(tp.scanner_ips_per_day * scale * w.days)
    rows = []
    for _ in range(int(probes)):
        ip = _fresh_ips(rng, w.used_ips, [ATTACK_COUNTRIES[int(rng.integers(0, len(ATTACK_COUNTRIES)))]], 1)[0]
        k = int(rng.integers(1, 5))
        t0 = int(rng.integers(w.start_ms, w.end_ms - MINUTE_MS))
        for j in range(k):
            rows.append((t0 + j * int(rng.integers(200, 4000)), ip,
                         _PROBE_PATHS[int(rng.integers(0, len(_PROBE_PATHS)))],
                         SCANNER_AGENTS[int(rng.integers(0, len(SCANNER_AGENTS)))]))
    if rows:
        ts_p, ip_p, path_p, ua_p = (list(x) for x in zip(*rows, strict=True))
        status_p = np.array([200 if p in ("/robots.txt", "/sitemap.xml") else 404 for p in path_p])
        scan = _frame(_HTTP_SCHEMA, len(rows), ts=ts_p, ip=ip_p, method="GET", path=path_p,
                      status=status_p, scheme="https", ua=ua_p, dur=_durations(rng, status_p),
                      bytes=rng.integers(150, 600, len(rows)))
        web = pl.concat([web, scan])
    # Sessions that began late on the last day would run past the period.
    return web.filter(pl.col("ts") < w.end_ms)


def _smtp_traffic(rng: np.random.Generator, w: _World, tp: TrafficParams, scale: float
                  ) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """Submission logins of SMTP customers, a typo now and then, stale passwords, internet guessing."""
    members = np.flatnonzero(w.has_smtp)
    weights = w.w_smtp[members] / w.w_smtp[members].sum()
    counts = rng.poisson(tp.smtp_sessions_per_day * scale * np.outer(w.day_factor, weights)).ravel()
    cust = np.repeat(np.tile(members, w.days), counts)
    day = np.repeat(np.repeat(np.arange(w.days), len(members)), counts)
    ts = _diurnal_ts(rng, w.start_ms, day, w.tz[cust], w.flat[cust])
    n = len(cust)
    ip_idx = _customer_ip_idx(rng, w, cust, ts)
    pid = rng.integers(1000, 99_999, n)
    host = _pick(("submit1", "submit2"), rng.integers(0, 2, n))
    ok = _frame(_SMTP_SCHEMA, n, ts=ts, ip=_pick(w.ips, ip_idx), rdns=_pick(w.rdns, ip_idx), ok=True,
                user=_pick(w.smtp_user, cust), mech=_pick(w.mech, cust), pid=pid, host=host,
                qid=_tokens(rng, n, 10, _HEX_UPPER))
    # Typos: a failure a few seconds before the successful login, same connection.
    typo = rng.random(n) < 0.004
    typos = ok.filter(pl.Series(typo)).with_columns(
        ts=pl.col("ts") - pl.Series(rng.integers(3000, 30_000, int(typo.sum()))), ok=pl.lit(False),
        qid=pl.lit(None, pl.String))
    frames = [ok, typos]
    labels = []

    # Stale passwords: a device keeps retrying an old password every few minutes for hours.
    for _ in range(tp.stale_password_clients if len(members) else 0):
        c = int(members[int(rng.integers(0, len(members)))])
        t0 = int(rng.integers(w.start_ms, max(w.start_ms + 1, w.end_ms - 12 * HOUR_MS)))
        hours = float(rng.uniform(2, 10))
        step = float(rng.uniform(5, 20)) * MINUTE_MS
        k = max(2, int(hours * HOUR_MS / step))
        tss = t0 + (np.arange(k) * step + rng.integers(0, 20_000, k)).astype(np.int64)
        tss = tss[tss < w.end_ms]
        ip = w.customer_ips(c, t0)[0]
        stale = _frame(_SMTP_SCHEMA, len(tss), ts=tss, ip=ip, rdns="unknown", ok=False,
                       user=w.smtp_user[c], mech=w.mech[c], pid=rng.integers(1000, 99_999, len(tss)),
                       host=_pick(("submit1", "submit2"), rng.integers(0, 2, len(tss))))
        frames.append(stale)
        labels.append(_label("legit_stale_password", "account", w.smtp_user[c], stale, SMTP_FILE,
                             {"attempts": len(tss), "every_minutes": round(step / MINUTE_MS, 1)}, ips=[ip]))

    # Internet background: random hosts guess a couple of obvious names and move on.
    noise_ips = int(rng.poisson(tp.smtp_noise_ips_per_day * scale * w.days))
    rows = []
    for _ in range(noise_ips):
        ip = _fresh_ips(rng, w.used_ips, [ATTACK_COUNTRIES[int(rng.integers(0, len(ATTACK_COUNTRIES)))]], 1)[0]
        t0 = int(rng.integers(w.start_ms, w.end_ms - MINUTE_MS))
        pid_i = int(rng.integers(1000, 99_999))
        for j in range(int(rng.integers(1, 4))):
            name = _GUESSED[int(rng.integers(0, len(_GUESSED)))]
            user = None if rng.random() < 0.3 else (
                name if rng.random() < 0.5 else f"{name}@{w.domain[int(rng.integers(0, w.n))]}")
            rows.append((t0 + j * int(rng.integers(1000, 9000)), ip, user, pid_i))
    if rows:
        ts_n, ip_n, user_n, pid_n = (list(x) for x in zip(*rows, strict=True))
        frames.append(_frame(_SMTP_SCHEMA, len(rows), ts=ts_n, ip=ip_n, rdns="unknown", ok=False,
                             user=pl.Series(user_n, dtype=pl.String), mech="LOGIN", pid=pid_n,
                             host=_pick(("submit1", "submit2"), rng.integers(0, 2, len(rows)))))
    return pl.concat(frames), labels


def _lifecycle_labels(w: _World) -> list[dict[str, Any]]:
    """Benign changes that look like compromise to naive rules: key rotations and region moves."""
    labels = []
    for c in range(w.n):
        file = API_FILE if w.seg[c] == 0 else EDGE_FILE
        if w.key_new[c] != w.key_old[c]:
            at = _iso(int(w.rot_ms[c]))
            labels.append(_label_row("legit_key_rotation", "api_key", w.keys[w.key_new[c]], at, at,
                                     w.customer_ips(c, int(w.rot_ms[c])), file,
                                     {"account": w.acct[c], "old_key": w.keys[w.key_old[c]]}))
        if w.move_ms[c] < w.end_ms:
            at = _iso(int(w.move_ms[c]))
            before = w.customer_ips(c, int(w.move_ms[c]) - 1)
            after = w.customer_ips(c, int(w.move_ms[c]))
            files = file if not w.has_smtp[c] else f"{file} {SMTP_FILE}"
            labels.append(_label_row("legit_region_move", "account", w.acct[c], at, at, before + after, files,
                                     {"country": w.country[c], "old_ips": before, "new_ips": after,
                                      "api_key": w.key_at(c, int(w.move_ms[c])),
                                      "smtp_username": w.smtp_user[c]}))
    return labels


# ---------------------------------------------------------------------------------------------
# Labels


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_SECOND_RESOLUTION = {EDGE_FILE, SMTP_FILE}


def _label_row(kind: str, entity_kind: str, entity: str, first: str, last: str, ips: Sequence[str],
               file: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"attack_kind": kind, "entity_kind": entity_kind, "entity": entity, "first_ts": first,
            "last_ts": last, "ips": " ".join(ips), "file": file,
            "params": json.dumps(params, sort_keys=True, separators=(",", ":"))}


def _label(kind: str, entity_kind: str, entity: str, frame: pl.DataFrame, file: str,
           params: dict[str, Any], ips: Sequence[str] | None = None) -> dict[str, Any]:
    """Label for the rows of one attack; times as written (whole seconds in nginx and syslog files)."""
    ts = frame["ts"]
    first, last = int(ts.min()), int(ts.max())
    if file in _SECOND_RESOLUTION:
        first, last = first - first % SECOND_MS, last - last % SECOND_MS
    if ips is None:
        ips = list(dict.fromkeys(frame["ip"].to_list()))
    return _label_row(kind, entity_kind, entity, _iso(first), _iso(last), ips, file, params)


# ---------------------------------------------------------------------------------------------
# Attacks


class _Attacks:
    """Injects each enabled attack into the data frames; victims are real customers of the world."""

    def __init__(self, rng: np.random.Generator, w: _World, tp: TrafficParams, scale: float):
        self.rng, self.w, self.tp, self.scale = rng, w, tp, scale
        self.period = w.end_ms - w.start_ms
        self.victims: list[int] = []
        self.frames: dict[str, list[pl.DataFrame]] = {API_FILE: [], EDGE_FILE: [], SMTP_FILE: []}
        self.labels: list[dict[str, Any]] = []

    # -- helpers --------------------------------------------------------------------------------
    def _window(self, duration_ms: int, earliest: float = 0.3, after_ms: int | None = None) -> int:
        """Start of an attack window lying inside the period, late enough to have a baseline."""
        duration_ms = min(duration_ms, int(self.period * 0.9))
        lo = self.w.start_ms + int(self.period * earliest)
        if after_ms is not None:
            lo = max(lo, after_ms)
        hi = max(lo + 1, self.w.end_ms - duration_ms - MINUTE_MS)
        return int(self.rng.integers(min(lo, hi - 1), hi))

    def _victim(self, ok: np.ndarray) -> int:
        mask = ok.copy()
        mask[np.array(self.victims, dtype=np.int64)] = False
        mask[self.w.campaign_customers] = False
        # Relax the wish list rather than fail on a tiny world.
        candidates = next(np.flatnonzero(m) for m in (mask, ok, np.ones_like(ok)) if m.any())
        # Prefer customers with real traffic so their baseline exists.
        weights = self.w.w_api[candidates] + self.w.w_smtp[candidates]
        c = int(candidates[int(self.rng.choice(len(candidates), p=weights / weights.sum()))])
        self.victims.append(c)
        return c

    def _ips(self, countries: Sequence[str], n: int, kind: str | None = None) -> list[str]:
        return _fresh_ips(self.rng, self.w.used_ips, list(countries), n, kind, v4_only=True)

    def _spread(self, t0: int, span_ms: int, n: int) -> np.ndarray:
        return t0 + np.sort(self.rng.integers(0, max(1, span_ms), n))

    def _emit(self, file: str, frame: pl.DataFrame, label: dict[str, Any]) -> None:
        self.frames[file].append(frame)
        self.labels.append(label)

    def _send_rows(self, n: int, ts: np.ndarray, ip: Any, key: Any, account: Any, ua: Any,
                   status: Any, recipients: Any, scheme: str = "https", method: str = "POST",
                   path: Any = "/v3/mail/send") -> pl.DataFrame:
        status_arr = np.broadcast_to(np.asarray(status), (n,)).copy()
        methods = np.full(n, method)
        return _frame(_HTTP_SCHEMA, n, ts=ts, ip=ip, method=method, path=path, status=status_arr,
                      key=key, account=account, recipients=recipients, scheme=scheme, ua=ua,
                      dur=_durations(self.rng, status_arr), bytes=_http_bytes(self.rng, status_arr, methods),
                      rid=_tokens(self.rng, n, 16))

    def _smtp_rows(self, ts: np.ndarray, ips: Any, users: Any, ok: Any, mech: str = "LOGIN",
                   pid: Any = None) -> pl.DataFrame:
        n = len(ts)
        if pid is None:
            pid = self.rng.integers(1000, 99_999, n)
        ok_arr = np.broadcast_to(np.asarray(ok), (n,))
        qid = _tokens(self.rng, n, 10, _HEX_UPPER).set(pl.Series(~ok_arr), None)
        return _frame(_SMTP_SCHEMA, n, ts=ts, ip=ips, rdns="unknown", ok=ok_arr, user=users, mech=mech,
                      pid=pid, host=_pick(("submit1", "submit2"), self.rng.integers(0, 2, n)), qid=qid)

    def _country_of(self, c: int) -> str:
        return self.w.country[c]

    # -- attacks --------------------------------------------------------------------------------
    def ip_flood(self, p: IpFlood) -> None:
        rng = self.rng
        span = int(p.minutes * MINUTE_MS)
        t0 = self._window(span, earliest=0.1)
        (ip,) = self._ips([HOSTING_COUNTRIES[int(rng.integers(0, len(HOSTING_COUNTRIES)))]], 1, "cloud")
        n = p.requests
        ts = self._spread(t0, span, n)
        # Invalid keys are refused until the limiter notices, then everything gets 429.
        status = np.where(ts - t0 < min(30 * SECOND_MS, span // 10), 401, 429)
        bogus = [f"mk_live_{k}" for k in _tokens(rng, 8, 32, _B62).to_list()]
        frame = self._send_rows(n, ts, ip, _pick(bogus, rng.integers(0, len(bogus), n)), None,
                                TOOL_AGENTS[0], status, 1)
        self._emit(API_FILE, frame, _label("ip_flood", "ip", ip, frame, API_FILE, asdict(p)))

    def smtp_bruteforce(self, p: SmtpBruteforce) -> None:
        rng, w = self.rng, self.w
        targets = [w.smtp_user[self._victim(w.has_smtp)] for _ in range(p.accounts)]
        span = int(p.minutes * MINUTE_MS)
        t0 = self._window(span, earliest=0.1)
        (ip,) = self._ips([ATTACK_COUNTRIES[int(rng.integers(0, len(ATTACK_COUNTRIES)))]], 1)
        ts = self._spread(t0, span, p.attempts)
        users = _pick(targets, np.arange(p.attempts) * len(targets) // p.attempts)
        # A few guesses per connection before smtpd drops it.
        pid = np.repeat(rng.integers(1000, 99_999, p.attempts // 3 + 1), 3)[: p.attempts]
        frame = self._smtp_rows(ts, ip, users, False, "LOGIN", pid)
        params = asdict(p) | {"targets": targets}
        self._emit(SMTP_FILE, frame, _label("smtp_bruteforce", "ip", ip, frame, SMTP_FILE, params))

    def credential_stuffing(self, p: CredentialStuffing) -> None:
        rng, w = self.rng, self.w
        real = [w.smtp_user[c] for c in np.flatnonzero(w.has_smtp)]
        n_real = min(len(real), max(p.hits, p.accounts // 10))
        real_idx = rng.choice(len(real), n_real, replace=False)
        accounts = [real[i] for i in real_idx]
        while len(accounts) < p.accounts:
            accounts.append(f"{_FIRST[int(rng.integers(0, len(_FIRST)))]}.{_LAST[int(rng.integers(0, len(_LAST)))]}"
                            f"{int(rng.integers(1, 999))}@{_WEBMAIL[int(rng.integers(0, len(_WEBMAIL)))]}")
        accounts = list(dict.fromkeys(accounts))
        tries = np.where(rng.random(len(accounts)) < 0.3, 2, 1)
        users = np.repeat(np.arange(len(accounts)), tries)
        rng.shuffle(users)
        n = len(users)
        ips = self._ips([ATTACK_COUNTRIES[int(rng.integers(0, len(ATTACK_COUNTRIES)))]
                         for _ in range(p.ips)], p.ips, "isp")
        # Most of the list goes through the main host; the others take a share.
        ip_idx = np.where(rng.random(n) < 0.6, 0, rng.integers(0, p.ips, n))
        span = int(p.minutes * MINUTE_MS)
        ts = self._spread(self._window(span, earliest=0.2), span, n)
        hits = [accounts[i] for i in range(min(p.hits, n_real))]
        ok = np.zeros(n, bool)
        for h in range(len(hits)):
            ok[np.flatnonzero(users == h)[-1]] = True
        frame = self._smtp_rows(ts, _pick(ips, ip_idx), _pick(accounts, users), ok, "LOGIN")
        params = asdict(p) | {"distinct_accounts": len(accounts), "compromised": hits}
        self._emit(SMTP_FILE, frame, _label("credential_stuffing", "ip", ips[0], frame, SMTP_FILE,
                                            params, ips=ips))

    def password_spraying_low_slow(self, p: PasswordSprayingLowSlow) -> None:
        rng, w = self.rng, self.w
        hours = max(1, min(int(round(p.hours)), int(self.period * 0.7 / HOUR_MS)))
        real = [w.smtp_user[c] for c in np.flatnonzero(w.has_smtp)]
        targets = [real[i] for i in rng.choice(len(real), min(len(real), p.accounts // 2), replace=False)]
        while len(targets) < p.accounts:
            targets.append(f"{_GUESSED[int(rng.integers(0, len(_GUESSED)))]}@{w.domain[int(rng.integers(0, w.n))]}")
        targets = list(dict.fromkeys(targets))
        pool = list(PREFIXES)
        ips = self._ips([pool[int(rng.integers(0, len(pool)))] for _ in range(p.ips)], p.ips, "isp")
        t0 = self._window(hours * HOUR_MS, earliest=0.2)
        rows_ip, rows_ts = [], []
        for i in range(p.ips):
            # Each address is active in one hour (rarely two) and tries once or twice then.
            active = rng.choice(hours, 1 if rng.random() < 0.9 or hours < 2 else 2, replace=False)
            for h in active:
                k = int(rng.integers(1, p.max_tries_per_ip_hour + 1))
                rows_ip.extend([i] * k)
                rows_ts.extend((t0 + int(h) * HOUR_MS + rng.integers(0, HOUR_MS, k)).tolist())
        order = np.argsort(np.array(rows_ts), kind="stable")
        ts = np.array(rows_ts, dtype=np.int64)[order]
        ip_idx = np.array(rows_ip)[order]
        # Spraying walks the account list: each account sees only a try or two.
        users = np.arange(len(ts)) % len(targets)
        frame = self._smtp_rows(ts, _pick(ips, ip_idx), _pick(targets, users), False,
                                rng.choice(["LOGIN", "PLAIN"]).item())
        params = asdict(p) | {"hours_used": hours, "attempts": len(ts), "distinct_accounts": len(targets)}
        self._emit(SMTP_FILE, frame, _label("password_spraying_low_slow", "ip", ips[0], frame, SMTP_FILE,
                                            params, ips=ips))

    def leaked_key(self, p: LeakedKey) -> None:
        rng, w = self.rng, self.w
        c = self._victim((w.seg == 0) & (w.key_old == w.key_new) & (w.move_ms == np.iinfo(np.int64).max))
        home = self._country_of(c)
        pool = [x for x in ATTACK_COUNTRIES if x != home]
        countries = [pool[i] for i in rng.choice(len(pool), min(p.countries, len(pool)), replace=False)]
        ips = self._ips([countries[i % len(countries)] for i in range(p.ips)], p.ips)
        span = int(p.hours * HOUR_MS)
        ts = self._spread(self._window(span, earliest=0.4), span, p.requests)
        n = p.requests
        status = np.where(rng.random(n) < 0.03, 429, 202)
        # Spam runs: big recipient lists per call.
        recipients = np.minimum(1 + np.floor(20 * rng.pareto(1.3, n)), 1000).astype(np.int64)
        frame = self._send_rows(n, ts, _pick(ips, rng.integers(0, len(ips), n)), w.keys[w.key_old[c]],
                                w.acct[c], _pick(TOOL_AGENTS, rng.integers(0, len(TOOL_AGENTS), n)),
                                status, recipients)
        params = asdict(p) | {"account": w.acct[c], "home_country": home, "new_countries": countries}
        self._emit(API_FILE, frame, _label("leaked_key", "api_key", w.keys[w.key_old[c]], frame, API_FILE,
                                           params, ips=ips))

    def impossible_travel(self, p: ImpossibleTravel) -> None:
        rng, w = self.rng, self.w
        c = self._victim((w.seg == 1) & (w.key_old == w.key_new) & (w.move_ms == np.iinfo(np.int64).max))
        home = self._country_of(c)
        far = [x for x in PREFIXES if _km(home, x) >= p.min_km] or \
              [max(PREFIXES, key=lambda x: _km(home, x))]
        dest = far[int(rng.integers(0, len(far)))]
        span = int(p.minutes * MINUTE_MS)
        t0 = self._window(span, earliest=0.3)
        home_ip = w.customer_ips(c, t0)[0]
        (far_ip,) = self._ips([dest], 1)
        key, ua = w.keys[w.key_old[c]], SDK_AGENTS[w.ua[c]]
        ts_home = self._spread(t0, 2 * MINUTE_MS, p.requests_home)
        ts_far = self._spread(t0 + span - 2 * MINUTE_MS, 2 * MINUTE_MS, p.requests_far)
        ts = np.concatenate([ts_home, ts_far])
        ips = [home_ip] * p.requests_home + [far_ip] * p.requests_far
        n = len(ts)
        frame = self._send_rows(n, ts, ips, key, w.acct[c], ua, 202, _recipients(rng, np.full(n, 0.3)))
        params = asdict(p) | {"home_country": home, "far_country": dest, "km": round(_km(home, dest)),
                              "account": w.acct[c]}
        self._emit(EDGE_FILE, frame, _label("impossible_travel", "api_key", key, frame, EDGE_FILE, params,
                                            ips=[home_ip, far_ip]))

    def revoked_key(self, p: RevokedKey) -> None:
        rng, w = self.rng, self.w
        rotated = (w.seg == 0) & (w.key_old != w.key_new)
        c = self._victim(rotated)
        old = w.keys[w.key_old[c]]
        span = int(p.minutes * MINUTE_MS)
        t0 = self._window(span, earliest=0.55, after_ms=int(w.rot_ms[c]) + HOUR_MS)
        # A forgotten server of the customer's, in its home country, still has the old key.
        (ip,) = self._ips([self._country_of(c)], 1, "cloud")
        ts = self._spread(t0, span, p.requests)
        frame = self._send_rows(p.requests, ts, ip, old, None, SDK_AGENTS[w.ua[c]], 401, 1)
        params = asdict(p) | {"account": w.acct[c], "revoked_at": _iso(int(w.rot_ms[c]))}
        self._emit(API_FILE, frame, _label("revoked_key", "api_key", old, frame, API_FILE, params))

    def plaintext_http(self, p: PlaintextHttp) -> None:
        w = self.w
        c = self._victim((w.seg == 1) & (w.key_old == w.key_new))
        span = int(p.hours * HOUR_MS)
        t0 = self._window(span, earliest=0.2)
        ips = w.customer_ips(c, t0)
        ts = self._spread(t0, span, p.requests)
        key = w.keys[w.key_old[c]]
        frame = self._send_rows(p.requests, ts, _pick(ips, self.rng.integers(0, len(ips), p.requests)), key,
                                w.acct[c], SDK_AGENTS[w.ua[c]], 202,
                                _recipients(self.rng, np.full(p.requests, 0.3)), scheme="http")
        params = asdict(p) | {"account": w.acct[c]}
        self._emit(EDGE_FILE, frame, _label("plaintext_http", "api_key", key, frame, EDGE_FILE, params))

    def spam_volume_spike(self, p: SpamVolumeSpike) -> None:
        rng, w = self.rng, self.w
        c = self._victim((w.seg == 0) & (w.key_old == w.key_new))
        members = w.seg == 0
        share = w.w_api[c] / w.w_api[members].sum()
        usual_calls_per_hour = self.tp.api_calls_per_day * self.scale * share * _ENDPOINTS[0][3] / 24
        span = int(p.hours * HOUR_MS)
        n = max(p.min_calls, int(round(p.factor * usual_calls_per_hour * p.hours)))
        t0 = self._window(span, earliest=0.4)
        ips = w.customer_ips(c, t0)
        ts = self._spread(t0, span, n)
        recipients = _recipients(rng, np.full(n, w.recip_scale[c]))
        frame = self._send_rows(n, ts, _pick(ips, rng.integers(0, len(ips), n)), w.keys[w.key_old[c]],
                                w.acct[c], SDK_AGENTS[w.ua[c]], 202, recipients)
        params = asdict(p) | {"account": w.acct[c], "calls": n,
                              "usual_calls_per_hour": round(usual_calls_per_hour, 2),
                              "recipients": int(recipients.sum())}
        self._emit(API_FILE, frame, _label("spam_volume_spike", "api_key", w.keys[w.key_old[c]], frame,
                                           API_FILE, params))

    def path_enumeration(self, p: PathEnumeration) -> None:
        rng = self.rng
        words = [f"/{a}{s}" for a in _ENUM_WORDS for s in _ENUM_SUFFIX]
        words += [f"/{a}/{b}{s}" for a in _ENUM_WORDS[:12] for b in _ENUM_WORDS[12:] for s in _ENUM_SUFFIX[:3]]
        n = min(p.paths, len(words))
        paths = [words[i] for i in rng.choice(len(words), n, replace=False)]
        span = int(p.minutes * MINUTE_MS)
        (ip,) = self._ips([HOSTING_COUNTRIES[int(rng.integers(0, len(HOSTING_COUNTRIES)))]], 1, "cloud")
        ts = self._spread(self._window(span, earliest=0.1), span, n)
        status = np.where(rng.random(n) < 0.05, 403, 404)
        frame = _frame(_HTTP_SCHEMA, n, ts=ts, ip=ip, method="GET", path=paths, status=status, scheme="https",
                       ua=SCANNER_AGENTS[int(rng.integers(0, len(SCANNER_AGENTS)))],
                       dur=_durations(rng, status), bytes=rng.integers(150, 600, n))
        self._emit(EDGE_FILE, frame, _label("path_enumeration", "ip", ip, frame, EDGE_FILE, asdict(p)))

    def secret_in_url(self, p: SecretInUrl) -> None:
        rng, w = self.rng, self.w
        c = self._victim((w.seg == 1) & (w.key_old == w.key_new))
        span = int(p.hours * HOUR_MS)
        t0 = self._window(span, earliest=0.2)
        ips = w.customer_ips(c, t0)
        key = w.keys[w.key_old[c]]
        ts = self._spread(t0, span, p.requests)
        dates = pl.Series(ts - DAY_MS).cast(pl.Datetime("ms")).dt.strftime("%Y-%m-%d")
        paths = "/v3/stats?api_key=" + key + "&start_date=" + dates
        frame = self._send_rows(p.requests, ts, _pick(ips, rng.integers(0, len(ips), p.requests)), None,
                                w.acct[c], SDK_AGENTS[w.ua[c]], 200, None, method="GET", path=paths)
        params = asdict(p) | {"account": w.acct[c]}
        self._emit(EDGE_FILE, frame, _label("secret_in_url", "api_key", key, frame, EDGE_FILE, params))


# ---------------------------------------------------------------------------------------------
# Formatting


def _time(fmt: str) -> pl.Expr:
    return pl.from_epoch(pl.col("ts"), time_unit="ms").dt.strftime(fmt)


def _json_lines(frame: pl.DataFrame) -> pl.DataFrame:
    """mailapi JSON access log lines (field order as the service writes them)."""

    def opt(name: str, col: str, quoted: bool = True) -> pl.Expr:
        q = '"' if quoted else ""
        value = pl.concat_str([pl.lit(f', "{name}": {q}'), pl.col(col).cast(pl.String), pl.lit(q)])
        return pl.when(pl.col(col).is_null()).then(pl.lit("")).otherwise(value)

    ok = pl.col("status") < 300
    return frame.with_columns(
        recipients=pl.when(ok).then(pl.col("recipients")).otherwise(pl.col("recipients") * 0),
        dur_s=pl.concat_str([(pl.col("dur") // 10).cast(pl.String), pl.lit("."), (pl.col("dur") % 10).cast(pl.String)]),
    ).select(pl.concat_str([
        pl.lit('{"time": "'), _time("%Y-%m-%dT%H:%M:%S%.3fZ"),
        pl.lit('", "client_ip": "'), pl.col("ip"), pl.lit('"'),
        opt("forwarded_for", "xff"),
        pl.lit(', "method": "'), pl.col("method"),
        pl.lit('", "path": "'), pl.col("path"),
        pl.lit('", "status": '), pl.col("status").cast(pl.String),
        opt("api_key", "key"), opt("account", "account"), opt("recipients", "recipients", quoted=False),
        pl.lit(', "scheme": "'), pl.col("scheme"),
        pl.lit('", "user_agent": "'), pl.col("ua"),
        pl.lit('", "duration_ms": '), pl.col("dur_s"),
        pl.lit(', "bytes": '), pl.col("bytes").cast(pl.String),
        pl.lit(', "request_id": "'), pl.col("rid"), pl.lit('"}'),
    ]).alias("line"))


def _nginx_lines(frame: pl.DataFrame) -> pl.DataFrame:
    """nginx log_format preset "mailapi" lines."""
    ms = pl.col("dur") // 10
    # Browsers speak HTTP/2 over TLS; SDKs and plain-HTTP requests stay on 1.1.
    browser = pl.col("ua").str.starts_with("Mozilla/5.0 (") & (pl.col("scheme") == "https")
    proto = pl.when(browser).then(pl.lit("HTTP/2.0")).otherwise(pl.lit("HTTP/1.1"))
    return frame.select(pl.concat_str([
        pl.col("ip"), pl.lit(" - - ["), _time("%d/%b/%Y:%H:%M:%S +0000"), pl.lit('] "'),
        pl.col("method"), pl.lit(" "), pl.col("path"), pl.lit(" "), proto, pl.lit('" '),
        pl.col("status").cast(pl.String), pl.lit(" "), pl.col("bytes").cast(pl.String),
        pl.lit(' "-" "'), pl.col("ua"), pl.lit('" '),
        (ms // 1000).cast(pl.String), pl.lit("."), (ms % 1000).cast(pl.String).str.zfill(3),
        pl.lit(" "), pl.col("scheme"), pl.lit(' "'), pl.col("key").fill_null("-"), pl.lit('" "'),
        pl.col("xff").fill_null("-"), pl.lit('"'),
    ]).alias("line"))


def _syslog_lines(frame: pl.DataFrame) -> pl.DataFrame:
    """Postfix submission smtpd lines (RFC 3164 header, no year, UTC)."""
    head = pl.concat_str([_time("%b %e %H:%M:%S"), pl.lit(" "), pl.col("host"),
                          pl.lit(" postfix/submission/smtpd["), pl.col("pid").cast(pl.String), pl.lit("]: ")])
    client = pl.concat_str([pl.col("rdns"), pl.lit("["), pl.col("ip"), pl.lit("]")])
    success = pl.concat_str([pl.col("qid"), pl.lit(": client="), client, pl.lit(", sasl_method="),
                             pl.col("mech"), pl.lit(", sasl_username="), pl.col("user")])
    # Postfix 3.x appends the user name to failures when the client sent one.
    reason = pl.when(pl.col("mech") == "LOGIN").then(pl.lit("UGFzc3dvcmQ6")).otherwise(pl.lit("authentication failure"))
    user = pl.when(pl.col("user").is_null()).then(pl.lit("")).otherwise(pl.lit(", sasl_username=") + pl.col("user"))
    failure = pl.concat_str([pl.lit("warning: "), client, pl.lit(": SASL "), pl.col("mech"),
                             pl.lit(" authentication failed: "), reason, user])
    return frame.select(pl.concat_str([head, pl.when(pl.col("ok")).then(success).otherwise(failure)]).alias("line"))


def _write(path: Path, frames: list[pl.DataFrame], schema: dict[str, Any],
           fmt: Callable[[pl.DataFrame], pl.DataFrame]) -> int:
    frame = pl.concat([f.select(list(schema)) for f in frames]) if frames else pl.DataFrame(schema=schema)
    # Stable sort: rows with the same instant keep their generation order, so output is reproducible.
    lines = fmt(frame.sort("ts", maintain_order=True))
    lines.write_csv(path, include_header=False, quote_style="never")
    return lines.height


def _write_labels(path: Path, labels: list[dict[str, Any]]) -> None:
    rows = sorted(labels, key=lambda r: (r["first_ts"], r["attack_kind"], r["entity"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _write_keys(out_dir: Path, w: _World, seed: int) -> int:
    customers = []
    revoked = []
    for c in range(w.n):
        keys = [{"key": w.keys[w.key_old[c]], "status": "active", "created": None, "revoked_at": None}]
        if w.key_new[c] != w.key_old[c]:
            at = _iso(int(w.rot_ms[c]))
            keys[0] |= {"status": "revoked", "revoked_at": at}
            keys.append({"key": w.keys[w.key_new[c]], "status": "active", "created": at, "revoked_at": None})
            revoked.append((int(w.rot_ms[c]), w.keys[w.key_old[c]]))
        ips = w.ips[w.ip_old_off[c]:w.ip_old_off[c] + w.ip_old_cnt[c]]
        if w.move_ms[c] < w.end_ms:
            ips = ips + w.ips[w.ip_new_off[c]:w.ip_new_off[c] + w.ip_new_cnt[c]]
        customers.append({
            "account": w.acct[c], "country": w.country[c], "front": API_FILE if w.seg[c] == 0 else EDGE_FILE,
            "smtp_username": w.smtp_user[c], "ips": ips, "user_agent": SDK_AGENTS[w.ua[c]], "keys": keys,
        })
    doc = {"seed": seed, "start": _iso(w.start_ms), "end": _iso(w.end_ms), "customers": customers}
    (out_dir / KEYS_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    # `KEY TIME` lines, the format `mailwarden keys revoke --file` reads: the time keeps the key's
    # ordinary life before its rotation out of the findings.
    (out_dir / REVOKED_FILE).write_text(
        "".join(f"{k} {_iso(at)}\n" for at, k in sorted(revoked)), encoding="utf-8"
    )
    return len(revoked)


# ---------------------------------------------------------------------------------------------
# Entry point


def generate(
    out_dir: Path,
    days: int,
    seed: int,
    attacks: bool = True,
    start: datetime | None = None,
    scale: float = 1.0,
    progress: Progress | None = None,
    *,
    traffic: TrafficParams | None = None,
    attack_params: AttackParams | None = None,
) -> GenerateSummary:
    """Write api.jsonl, nginx.log, maillog, labels.csv, keys.json and revoked_keys.txt into out_dir.

    Same arguments, same bytes. Normal traffic does not depend on `attacks`: turning attacks off
    removes exactly the attack lines. `progress(stage, done, total)` is called after each stage.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    if scale <= 0:
        raise ValueError("scale must be positive")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    tp = traffic or TrafficParams()
    ap = attack_params or AttackParams()
    start = (start or DEFAULT_START)
    start = start.replace(tzinfo=timezone.utc) if start.tzinfo is None else start.astimezone(timezone.utc)
    start_ms = int(start.timestamp() * 1000)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    stages = ["customers", "api traffic", "edge traffic", "smtp traffic", "attacks", "write files"]
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(stages[done - 1], done, len(stages))

    # Independent streams: the world and normal traffic never see the attack stream.
    world_ss, api_ss, edge_ss, smtp_ss, attack_ss = np.random.SeedSequence(seed).spawn(5)
    w = _make_world(np.random.default_rng(world_ss), start_ms, days, scale, tp)
    step()

    rng = np.random.default_rng(api_ss)
    campaign_frames, labels = _campaigns(rng, w, tp, scale)
    api = _segment_traffic(rng, w, 0, tp.api_calls_per_day * scale)
    api = pl.concat([api, _retries(rng, api, w), *campaign_frames[0]])
    step()
    rng = np.random.default_rng(edge_ss)
    edge = _segment_traffic(rng, w, 1, tp.edge_calls_per_day * scale)
    edge = pl.concat([edge, _retries(rng, edge, w), *campaign_frames[1], _web_traffic(rng, w, tp, scale)])
    step()
    smtp, smtp_labels = _smtp_traffic(np.random.default_rng(smtp_ss), w, tp, scale)
    labels += smtp_labels + _lifecycle_labels(w)
    step()

    frames: dict[str, list[pl.DataFrame]] = {API_FILE: [api], EDGE_FILE: [edge], SMTP_FILE: [smtp]}
    if attacks:
        injector = _Attacks(np.random.default_rng(attack_ss), w, tp, scale)
        for kind in ATTACK_KINDS:
            params = getattr(ap, kind)
            if params.enabled:
                getattr(injector, kind)(params)
        for file, extra in injector.frames.items():
            frames[file].extend(extra)
        labels += injector.labels
    step()

    files = {
        API_FILE: _write(out_dir / API_FILE, frames[API_FILE], _HTTP_SCHEMA, _json_lines),
        EDGE_FILE: _write(out_dir / EDGE_FILE, frames[EDGE_FILE], _HTTP_SCHEMA, _nginx_lines),
        SMTP_FILE: _write(out_dir / SMTP_FILE, frames[SMTP_FILE], _SMTP_SCHEMA, _syslog_lines),
    }
    _write_labels(out_dir / LABELS_FILE, labels)
    _write_keys(out_dir, w, seed)
    step()

    counts: dict[str, int] = {}
    for row in labels:
        counts[row["attack_kind"]] = counts.get(row["attack_kind"], 0) + 1
    end = datetime.fromtimestamp(w.end_ms / 1000, tz=timezone.utc)
    # Syslog lines carry no year: readers infer it from the file's mtime, so make that the end of
    # the generated period rather than the day the generator ran.
    for name in files:
        os.utime(out_dir / name, (end.timestamp(), end.timestamp()))
    return GenerateSummary(out_dir=out_dir, seed=seed, start=start, end=end, files=files,
                           labels=dict(sorted(counts.items())))
