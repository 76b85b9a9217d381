"""Inputs for bench/compare.py: a combined log with known attackers merged in, its slice, and a mailapi JSON log."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from pipeline.samples import write_combined_log

# write_combined_log spreads its lines over this day; the attacks happen inside it, at 06:00 UTC.
DAY_START = datetime(2026, 11, 2, tzinfo=timezone.utc)
ATTACK_AT = DAY_START + timedelta(hours=6)
STAMP_FORMAT = "%d/%b/%Y:%H:%M:%S +0000"


@dataclass(frozen=True)
class Attacker:
    """One injected attacker: what a detector is expected to flag, and why."""

    ip: str
    kind: str
    lines: int
    first: str
    last: str
    what: str


# Addresses from the documentation ranges: the background generator never produces them
# (its first octet is 20..219 but its second octet stays below 30), so every line from them is an attack.
BRUTE_FORCE = Attacker(
    ip="203.0.113.77",
    kind="credential guessing",
    lines=300,
    first=ATTACK_AT.isoformat(),
    last=(ATTACK_AT + timedelta(minutes=10)).isoformat(),
    what="300 POST /v3/mail/send answered 401 in 10 min (a key being guessed)",
)
BURST = Attacker(
    ip="198.51.100.23",
    kind="request flood",
    lines=5_000,
    first=(ATTACK_AT + timedelta(minutes=3)).isoformat(),
    last=(ATTACK_AT + timedelta(minutes=6)).isoformat(),
    what="5,000 requests in 3 min: 80% POST /v3/mail/send (202), 20% GET /v3/messages/<id> (a leaked key drained)",
)
ATTACKERS = (BRUTE_FORCE, BURST)
ATTACK_LINES = sum(a.lines for a in ATTACKERS)


@dataclass
class CombinedWorkload:
    path: Path
    lines: int
    attackers: list[dict]
    # 0-based index of the first attacker line: where the slice for slow peers starts from.
    first_attack_line: int


def _attack_lines(seed: int) -> list[tuple[float, str]]:
    """(epoch seconds, line) of every attacker request, in time order."""
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []

    def line(ip: str, when: datetime, request: str, status: int, size: int, agent: str) -> str:
        # `-` user: a guesser has no account yet, and a drained key is used without basic auth.
        return f'{ip} - - [{when.strftime(STAMP_FORMAT)}] "{request} HTTP/1.1" {status} {size} "-" "{agent}"\n'

    start = datetime.fromisoformat(BRUTE_FORCE.first)
    span = (datetime.fromisoformat(BRUTE_FORCE.last) - start).total_seconds()
    for i in range(BRUTE_FORCE.lines):
        # Evenly spaced with jitter: about one guess every 2 s, the pace of a scripted guesser.
        offset = min(span - 1, (i + rng.random()) * span / BRUTE_FORCE.lines)
        when = start + timedelta(seconds=int(offset))
        out.append((when.timestamp(), line(BRUTE_FORCE.ip, when, "POST /v3/mail/send", 401, 61, "python-requests/2.31.0")))

    start = datetime.fromisoformat(BURST.first)
    span = (datetime.fromisoformat(BURST.last) - start).total_seconds()
    for i in range(BURST.lines):
        offset = min(span - 1, (i + rng.random()) * span / BURST.lines)
        when = start + timedelta(seconds=int(offset))
        if rng.random() < 0.8:
            request, status, size = "POST /v3/mail/send", 202, rng.randint(80, 200)
        else:
            request, status, size = f"GET /v3/messages/{rng.randint(10**9, 10**10 - 1)}", 200, rng.randint(300, 3000)
        out.append((when.timestamp(), line(BURST.ip, when, request, status, size, "sendkit-python/4.2.1")))
    out.sort(key=lambda pair: pair[0])
    return out


def write_combined_with_attacks(path: Path, lines: int, seed: int = 1) -> CombinedWorkload:
    """`lines` combined-format lines in time order: background traffic plus the ATTACKERS."""
    if lines < 2 * ATTACK_LINES:
        raise ValueError(f"--lines must be at least {2 * ATTACK_LINES:,} (the attacks alone are {ATTACK_LINES:,})")
    path = Path(path)
    background = path.with_name(path.name + ".background")
    write_combined_log(background, lines - ATTACK_LINES, seed=seed, start=DAY_START)
    attacks = _attack_lines(seed)
    epoch_of: dict[str, float] = {}
    first_attack = -1
    k = 0
    written = 0
    try:
        with open(background, encoding="utf-8") as src, open(path, "w", encoding="utf-8", newline="\n") as dst:
            out: list[str] = []
            for text in src:
                # Parse each distinct second once: a day has 86,400 of them, the file a million lines.
                stamp = text[text.index("[") + 1 : text.index("]")]
                when = epoch_of.get(stamp)
                if when is None:
                    when = datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=timezone.utc).timestamp()
                    epoch_of[stamp] = when
                while k < len(attacks) and attacks[k][0] < when:
                    if first_attack < 0:
                        first_attack = written
                    out.append(attacks[k][1])
                    k += 1
                    written += 1
                out.append(text)
                written += 1
                if len(out) >= 100_000:
                    dst.write("".join(out))
                    out.clear()
            if k < len(attacks) and first_attack < 0:
                first_attack = written
            out.extend(a[1] for a in attacks[k:])
            written += len(attacks) - k
            dst.write("".join(out))
    finally:
        background.unlink(missing_ok=True)
    return CombinedWorkload(path, written, [asdict(a) for a in ATTACKERS], first_attack)


def write_slice(src: Path, dst: Path, start: int, count: int) -> int:
    """Copy lines [start, start + count) of `src` to `dst`; returns how many were copied."""
    copied = 0
    with open(src, encoding="utf-8") as inp, open(dst, "w", encoding="utf-8", newline="\n") as out:
        for i, text in enumerate(inp):
            if i < start:
                continue
            if copied >= count:
                break
            out.write(text)
            copied += 1
    return copied


_JSON_PATHS = np.array(
    ["/v3/mail/send", "/v3/mail/send", "/v3/mail/send", "/v3/mail/send", "/v3/messages/{id}", "/v3/stats",
     "/v3/suppressions", "/v3/templates", "/v3/mail/batch", "/v3/api_keys"]
)
_JSON_METHODS = np.array(["POST", "POST", "POST", "POST", "GET", "GET", "GET", "GET", "POST", "GET"])
_JSON_STATUS = np.array([202, 202, 202, 202, 202, 202, 200, 200, 401, 429, 400, 404, 500, 403])
_JSON_AGENTS = np.array(
    ["sendkit-python/4.2.1", "sendkit-node/7.1.0", "sendkit-go/1.9.3", "curl/8.5.0", "sendkit-java/3.0.2",
     "PHPMailer 6.9.1", "sendkit-ruby/2.4.0"]
)


def write_mailapi_json(path: Path, lines: int, seed: int = 1) -> Path:
    """`lines` mailapi JSON access-log lines (the shape in docs/HELPERS_BRIEF.md), in time order, over a day."""
    rng = np.random.default_rng(seed)
    micros = np.sort(rng.integers(0, 86_400_000_000, size=lines))
    clients = rng.integers(0, 4_000, size=lines)
    ips = [f"{(c % 180) + 30}.{(c // 180) % 200 + 20}.{(c * 11) % 250 + 1}.{(c * 17) % 250 + 1}" for c in clients.tolist()]
    # About one key per client pair; a few clients send an already-computed key id instead of the key.
    keys = [f"mk_live_{(c // 2) * 2654435761 % (1 << 64):016x}{c % 2:08x}" for c in clients.tolist()]
    by_key_id = rng.random(lines) < 0.05
    proxied = rng.random(lines) < 0.1
    which = rng.integers(0, len(_JSON_PATHS), size=lines)
    status = _JSON_STATUS[rng.integers(0, len(_JSON_STATUS), size=lines)]
    recipients = rng.integers(1, 50, size=lines)
    duration = np.round(rng.gamma(2.0, 20.0, size=lines), 1)
    size = rng.integers(60, 6_000, size=lines)
    agent = _JSON_AGENTS[rng.integers(0, len(_JSON_AGENTS), size=lines)]
    plain_http = rng.random(lines) < 0.01
    msg_ids = rng.integers(10**9, 10**10, size=lines)
    request_ids = rng.integers(0, 1 << 62, size=lines)
    base = DAY_START.timestamp()
    stamps: dict[int, str] = {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        chunk: list[str] = []
        for i, us in enumerate(micros.tolist()):
            second = us // 1_000_000
            stamp = stamps.get(second)
            if stamp is None:
                stamp = datetime.fromtimestamp(base + second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
                stamps[second] = stamp
            c = int(clients[i])
            key = f'"key_id": "kid_{c:05d}"' if by_key_id[i] else f'"api_key": "{keys[i]}"'
            forwarded = f'"forwarded_for": "{ips[i]}, 10.0.{c % 250}.2", ' if proxied[i] else ""
            client_ip = f"10.0.{c % 250}.2" if proxied[i] else ips[i]
            req_path = _JSON_PATHS[which[i]].replace("{id}", str(msg_ids[i]))
            chunk.append(
                f'{{"time": "{stamp}.{(us // 1000) % 1000:03d}Z", "client_ip": "{client_ip}", {forwarded}'
                f'"method": "{_JSON_METHODS[which[i]]}", "path": "{req_path}", "status": {status[i]}, {key}, '
                f'"account": "acct_{c % 1500 + 1000}", "recipients": {recipients[i]}, '
                f'"scheme": "{"http" if plain_http[i] else "https"}", "user_agent": "{agent[i]}", '
                f'"duration_ms": {duration[i]}, "bytes": {size[i]}, "request_id": "{request_ids[i]:016x}"}}\n'
            )
            if len(chunk) >= 100_000:
                handle.write("".join(chunk))
                chunk.clear()
        handle.write("".join(chunk))
    return path
