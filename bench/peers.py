"""The peer tools bench/compare.py measures against: installing them offline, running them, reading what they flag."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Debian package -> the binary that shows it is there. `time` (GNU time) measures peak memory.
APT_PACKAGES = {"goaccess": "goaccess", "fail2ban": "fail2ban-regex", "crowdsec": "crowdsec", "time": "time"}

# Debian's crowdsec postinst registers with the online Central API unless this file already has content
# (README.Debian, "Local API and Central API"); with no network that registration fails the install.
CROWDSEC_CAPI_FILE = Path("/etc/crowdsec/online_api_credentials.yaml")
CROWDSEC_OFFLINE_HUB = Path("/usr/share/crowdsec/hub")
CROWDSEC_DATA = Path("/usr/share/crowdsec/data")
CROWDSEC_PATTERNS = Path("/etc/crowdsec/patterns")

# fail2ban's stock jail defaults (jail.conf [DEFAULT]): an IP is banned after maxretry failures
# within findtime seconds.
F2B_MAXRETRY = 5
F2B_FINDTIME = 600


@dataclass
class Measured:
    """One timed process: wall seconds, peak resident memory, exit code and where its output went."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: Path
    stderr: Path
    timed_out: bool = False
    # user + system CPU seconds: on a busy machine this moves less than wall time, and it shows
    # how many cores a tool kept busy (cpu / wall).
    cpu_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def tail(self, chars: int = 400) -> str:
        """The end of stderr (or stdout), one line, for a failure message."""
        for p in (self.stderr, self.stdout):
            try:
                text = p.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                return " | ".join(text[-chars:].splitlines()[-4:])
        return ""


TIME_BINARY = "/usr/bin/time"


def measure(cmd: list[str], out_dir: Path, name: str, *, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 3600.0) -> Measured:
    """Run `cmd` once and measure it from outside: wall time and its peak RSS.

    The peak comes from GNU time, not from our own wait4: a child forked from this (large) Python
    process starts with our resident set as its high-water mark and keeps it across exec, so every tool
    would show at least our size. GNU time is a few hundred kB and forks the real command itself.
    Output goes to files so a chatty tool cannot block on a full pipe.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr, usage = out_dir / f"{name}.out", out_dir / f"{name}.err", out_dir / f"{name}.time"
    usage.unlink(missing_ok=True)
    with open(stdout, "wb") as so, open(stderr, "wb") as se:
        started = time.perf_counter()
        # start_new_session: on timeout the whole group (time and the tool) is killed.
        proc = subprocess.Popen([TIME_BINARY, "-f", "%M %U %S", "-o", str(usage), *cmd], stdout=so, stderr=se,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        seconds = time.perf_counter() - started
    peak_kb = cpu = 0.0
    try:
        # The last line holds the figures; a killed command adds a "Command terminated by signal" line first.
        kb, user, system = usage.read_text().strip().splitlines()[-1].split()
        peak_kb, cpu = float(kb), float(user) + float(system)
    except (OSError, ValueError, IndexError):
        pass
    return Measured(seconds, peak_kb / 1024, proc.returncode, stdout, stderr, timed_out, cpu)


# ---------------------------------------------------------------------------------------------- install


def _dpkg_status(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "not-installed"


def _crowdsec_offline_prepare() -> None:
    # Must happen before the package's postinst runs (install or `dpkg --configure`).
    CROWDSEC_CAPI_FILE.parent.mkdir(parents=True, exist_ok=True)
    if not CROWDSEC_CAPI_FILE.exists() or CROWDSEC_CAPI_FILE.stat().st_size == 0:
        CROWDSEC_CAPI_FILE.write_text("# no thanks: offline benchmark machine, no Central API (README.Debian)\n")


def ensure_peers(wanted: list[str], log=print) -> dict[str, str]:
    """Install the wanted peers from Debian if missing; returns {peer: "ok" | reason it is unavailable}."""
    status: dict[str, str] = {}
    missing = []
    if not Path(TIME_BINARY).exists():
        missing.append("time")
    for peer in wanted:
        binary = APT_PACKAGES[peer]
        installed = _dpkg_status(peer)
        if shutil.which(binary) and installed == "install ok installed":
            status[peer] = "ok"
        else:
            missing.append(peer)
    if not missing:
        return status
    if os.geteuid() != 0:
        for peer in missing:
            status[peer] = f"not installed and not root: run `apt-get install -y {peer}` first"
        return status
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if "crowdsec" in missing:
        _crowdsec_offline_prepare()
    log(f"installing {', '.join(missing)} with apt-get (once)")
    update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
    if update.returncode != 0:
        log(f"apt-get update failed: {update.stderr.strip()[-300:]}")
    for peer in missing:
        done = subprocess.run(["apt-get", "install", "-y", peer], capture_output=True, text=True, env=env)
        if done.returncode != 0 and _dpkg_status(peer) != "install ok installed":
            # An earlier attempt may have left the package unpacked but not configured (the CAPI step).
            if peer == "crowdsec":
                _crowdsec_offline_prepare()
            subprocess.run(["dpkg", "--configure", peer], capture_output=True, text=True, env=env)
        if shutil.which(APT_PACKAGES[peer]) and _dpkg_status(peer) == "install ok installed":
            status[peer] = "ok"
        else:
            status[peer] = f"apt-get install {peer} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return status


def version_of(peer: str) -> str:
    cmd = {"goaccess": ["goaccess", "--version"], "fail2ban": ["fail2ban-regex", "--version"],
           "crowdsec": ["crowdsec", "-version"]}[peer]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = done.stdout + done.stderr
    # Upstream version only: Debian's "1.4.6-6~deb12u1+b1-debian" is "1.4.6".
    found = re.search(r"(?:version:\s*v?|GoAccess - |fail2ban-regex )([0-9]+(?:\.[0-9]+)*)", text)
    return found.group(1) if found else "?"


# --------------------------------------------------------------------------------------------- goaccess


def goaccess_cmd(log: Path, report: Path, log_format: str = "COMBINED") -> list[str]:
    # --no-global-config: only what is on the command line counts, whatever /etc/goaccess says.
    return ["goaccess", str(log), "--no-global-config", f"--log-format={log_format}", "-o", str(report)]


def goaccess_json_args() -> list[str]:
    """goaccess (>= 1.6) reading the mailapi JSON log: map our keys to its specifiers."""
    fmt = ('{"time": "%dT%t.%^", "client_ip": "%h", "method": "%m", "path": "%U", "status": "%s", '
           '"user_agent": "%u", "duration_ms": "%L", "bytes": "%b"}')
    return [f"--log-format={fmt}", "--date-format=%Y-%m-%d", "--time-format=%H:%M:%S"]


def goaccess_requests(report: Path) -> tuple[int, int]:
    """(valid, failed) request counts from goaccess's JSON report."""
    general = json.loads(report.read_text())["general"]
    return int(general.get("valid_requests", 0)), int(general.get("failed_requests", 0))


# --------------------------------------------------------------------------------------------- fail2ban

# One line, as the issue says: a combined-format request answered 401. The explicit datepattern keeps
# fail2ban from trying every built-in date template on every line (5x slower on a 100k-line file).
F2B_FILTER = """[Definition]
failregex = ^<HOST> \\S+ \\S+ \\[\\] "[^"]*" 401 
datepattern = ^[^\\[]*\\[({DATE})
"""

_F2B_ROW = re.compile(r"^\['([^']+)',\s*([0-9.]+)")


def fail2ban_filter(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mailapi-401.conf"
    path.write_text(F2B_FILTER)
    return path


def fail2ban_cmd(log: Path, filter_path: Path) -> list[str]:
    # `-o row` prints one [ip, epoch, ...] row per match: what a jail would count, without a jail.
    # The filter must be given as an absolute path, or fail2ban-regex takes it for a regex string.
    return ["fail2ban-regex", "-o", "row", str(log), str(filter_path.resolve())]


def fail2ban_flagged(rows_file: Path, maxretry: int = F2B_MAXRETRY, findtime: int = F2B_FINDTIME) -> tuple[int, set[str]]:
    """(matched lines, IPs a stock jail would ban): maxretry matches within findtime seconds."""
    times: dict[str, list[float]] = defaultdict(list)
    matched = 0
    with open(rows_file, encoding="utf-8", errors="replace") as handle:
        for text in handle:
            found = _F2B_ROW.match(text)
            if found:
                matched += 1
                times[found.group(1)].append(float(found.group(2)))
    banned = set()
    for ip, stamps in times.items():
        stamps.sort()
        for i in range(len(stamps) - maxretry + 1):
            if stamps[i + maxretry - 1] - stamps[i] < findtime:
                banned.add(ip)
                break
    return matched, banned


# --------------------------------------------------------------------------------------------- crowdsec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hub_items(index: dict, collection: str) -> list[tuple[str, str]]:
    """(kind, name) of every parser and scenario a collection pulls in, following sub-collections."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()

    def walk(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        item = index["collections"][name]
        for kind in ("parsers", "scenarios", "postoverflows"):
            for sub in item.get(kind) or []:
                found.append((kind, sub))
        for sub in item.get("collections") or []:
            walk(sub)

    walk(collection)
    return found


@dataclass
class CrowdsecSetup:
    """A private CrowdSec configuration in one folder: its own config dir, data dir, database and port."""

    root: Path
    config: Path
    database: Path
    items: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def crowdsec_setup(root: Path, collection: str = "crowdsecurity/nginx") -> CrowdsecSetup:
    """Configure CrowdSec from the package's offline hub only, without touching /etc/crowdsec.

    Parsers: the collection's (nginx-logs, http-logs) plus the base ones the `linux` collection normally
    brings (syslog-logs for non-syslog input, dateparse-enrich for replayed timestamps, whitelists).
    Scenarios: every scenario of the collection and its sub-collections (base-http-scenarios, http-cve).
    """
    root.mkdir(parents=True, exist_ok=True)
    index = json.loads((CROWDSEC_OFFLINE_HUB / ".index.json").read_text())
    wanted = _hub_items(index, collection) + [
        ("parsers", "crowdsecurity/syslog-logs"),
        ("parsers", "crowdsecurity/dateparse-enrich"),
        ("parsers", "crowdsecurity/whitelists"),
    ]
    conf = root / "etc"
    setup = CrowdsecSetup(root=root, config=root / "config.yaml", database=root / "crowdsec.db")
    for kind, name in wanted:
        item = index[kind].get(name)
        if item is None:
            setup.notes.append(f"{kind[:-1]} {name} is not in the offline hub")
            continue
        target = CROWDSEC_OFFLINE_HUB / item["path"]
        # CrowdSec wants <kind>/<stage>/<file> for parsers and <kind>/<file> for scenarios (no vendor dir).
        link_dir = conf / kind / item["stage"] if "stage" in item else conf / kind
        link_dir.mkdir(parents=True, exist_ok=True)
        link = link_dir / target.name
        if not link.exists():
            link.symlink_to(target)
        setup.items.append(name)
    (conf / "patterns").symlink_to(CROWDSEC_PATTERNS)
    data = root / "data"
    data.mkdir()
    for source in CROWDSEC_DATA.iterdir():
        (data / source.name).symlink_to(source)
    # Debian 1.4.6 ships path_traversal.txt but the scenario asks for http_path_traversal.txt; without it
    # CrowdSec logs a 12 kB error for every event, which would make it look far slower than it is.
    if not (data / "http_path_traversal.txt").exists() and (CROWDSEC_DATA / "path_traversal.txt").exists():
        (data / "http_path_traversal.txt").symlink_to(CROWDSEC_DATA / "path_traversal.txt")
        setup.notes.append("linked data file http_path_traversal.txt -> path_traversal.txt (Debian packaging gap)")
    (conf / "simulation.yaml").write_text("simulation: off\nexclusions: []\n")
    (conf / "profiles.yaml").write_text(
        'name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && Alert.GetScope() == "Ip"\n'
        "decisions:\n - type: ban\n   duration: 4h\non_success: break\n"
    )
    (root / "acquis.yaml").write_text("")
    port = _free_port()
    setup.config.write_text(
        f"""common:
  daemonize: false
  log_media: stdout
  log_level: warning
  working_dir: {root}
config_paths:
  config_dir: {conf}/
  data_dir: {data}/
  simulation_path: {conf}/simulation.yaml
  hub_dir: {CROWDSEC_OFFLINE_HUB}/
  index_path: {CROWDSEC_OFFLINE_HUB}/.index.json
  notification_dir: {conf}/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
crowdsec_service:
  acquisition_path: {root}/acquis.yaml
  parser_routines: 1
db_config:
  log_level: warning
  type: sqlite
  db_path: {setup.database}
  use_wal: true
api:
  client:
    insecure_skip_verify: false
    credentials_path: {root}/local_api_credentials.yaml
  server:
    log_level: warning
    listen_uri: 127.0.0.1:{port}
    profiles_path: {conf}/profiles.yaml
    trusted_ips:
      - 127.0.0.1
prometheus:
  enabled: false
  level: full
  listen_addr: 127.0.0.1
  listen_port: {_free_port()}
"""
    )
    # The agent logs in to the local API it starts itself; register that machine in this database.
    done = subprocess.run(
        ["cscli", "-c", str(setup.config), "machines", "add", "mailwarden-bench", "--password",
         os.urandom(12).hex(), "-f", str(root / "local_api_credentials.yaml"), "--force"],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cscli machines add failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return setup


def crowdsec_cmd(setup: CrowdsecSetup, log: Path) -> list[str]:
    # Replay ("time machine") of one file with its own local API in-process: -no-api would need a
    # separately running LAPI to receive the alerts. -no-capi: nothing leaves the machine.
    return ["crowdsec", "-c", str(setup.config), "-dsn", f"file://{log.resolve()}", "-type", "nginx", "-no-capi"]


def crowdsec_flagged(setup: CrowdsecSetup) -> tuple[set[str], dict[str, list[str]]]:
    """IPs CrowdSec raised alerts on, and the scenarios per IP, read from its own database."""
    import sqlite3

    conn = sqlite3.connect(f"file:{setup.database}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT scenario, source_value, source_scope FROM alerts").fetchall()
    finally:
        conn.close()
    per_ip: dict[str, list[str]] = defaultdict(list)
    for scenario, value, scope in rows:
        if value and (scope or "").lower() == "ip":
            per_ip[value].append(scenario)
    return set(per_ip), {ip: sorted(set(s)) for ip, s in per_ip.items()}


# CrowdSec's NGUSERNAME grok pattern: a $remote_user with any other character (digits!) fails the line.
_CROWDSEC_USER = re.compile(r"^\S+ \S+ (\S+) \[")
_NGUSER_OK = re.compile(r"^[a-zA-Z.@\-+_%]+$")


def crowdsec_unparseable_users(log: Path) -> int:
    """Lines whose $remote_user CrowdSec's nginx parser cannot match (counted here, not by CrowdSec)."""
    bad = 0
    with open(log, encoding="utf-8", errors="replace") as handle:
        for text in handle:
            found = _CROWDSEC_USER.match(text)
            if found and found.group(1) != "-" and not _NGUSER_OK.match(found.group(1)):
                bad += 1
    return bad
