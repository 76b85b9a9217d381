"""Fast writer of big plain combined-format logs of a mail API, for benchmarks and volume tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

_PATHS = np.array(
    ["/v3/mail/send", "/v3/mail/send", "/v3/mail/send", "/v3/messages/{id}", "/v3/stats", "/v3/suppressions",
     "/v3/templates", "/v3/mail/batch", "/health", "/v3/api_keys"]
)
_METHODS = np.array(["POST", "POST", "POST", "GET", "GET", "GET", "GET", "POST", "GET", "GET"])
_STATUS = np.array([202, 202, 202, 202, 202, 200, 200, 401, 429, 400, 404, 500, 403])
_AGENTS = np.array(
    ["sendkit-python/4.2.1", "sendkit-node/7.1.0", "sendkit-go/1.9.3", "curl/8.5.0",
     "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36", "sendkit-java/3.0.2", "PHPMailer 6.9.1"]
)


def write_combined_log(path: Path, lines: int, seed: int = 1, start: datetime | None = None) -> Path:
    """Write `lines` combined-format lines (about 130 bytes each) spread over a day, in time order.

    Users are account ids with digits (`acct1234`), which some parsers reject and we must not.
    """
    rng = np.random.default_rng(seed)
    start = start or datetime(2026, 11, 2, tzinfo=timezone.utc)
    seconds = np.sort(rng.integers(0, 86_400, size=lines))
    clients = rng.integers(0, 5_000, size=lines)
    ips = [f"{(c % 200) + 20}.{(c // 200) % 250 + 1}.{(c * 7) % 250 + 1}.{(c * 13) % 250 + 1}" for c in clients.tolist()]
    users = np.where(rng.random(lines) < 0.3, np.char.add("acct", (clients % 900 + 100).astype(str)), "-")
    which = rng.integers(0, len(_PATHS), size=lines)
    status = _STATUS[rng.integers(0, len(_STATUS), size=lines)]
    size = rng.integers(20, 4000, size=lines)
    agent = _AGENTS[rng.integers(0, len(_AGENTS), size=lines)]
    msg_ids = rng.integers(10**9, 10**10, size=lines)
    stamps: dict[int, str] = {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        chunk: list[str] = []
        for i, second in enumerate(seconds.tolist()):
            stamp = stamps.get(second)
            if stamp is None:
                stamp = (start + timedelta(seconds=second)).strftime("%d/%b/%Y:%H:%M:%S +0000")
                stamps[second] = stamp
            req_path = _PATHS[which[i]].replace("{id}", str(msg_ids[i]))
            chunk.append(
                f'{ips[i]} - {users[i]} [{stamp}] "{_METHODS[which[i]]} {req_path} HTTP/1.1" {status[i]} '
                f'{size[i]} "-" "{agent[i]}"\n'
            )
            if len(chunk) >= 100_000:
                handle.write("".join(chunk))
                chunk.clear()
        handle.write("".join(chunk))
    return path
