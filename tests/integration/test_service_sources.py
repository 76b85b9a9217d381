"""`mailwarden run` and its [[sources]]: refused at start-up when unusable, warned about when not
there yet, and a follower that fails later is one log line and a 503 from /health."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# The tree under test, also for the subprocess (its cwd is elsewhere, where an installed copy would win).
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(tmp_path: Path, paths: list[str], fmt: str, port: int) -> subprocess.Popen:
    config = tmp_path / "mailwarden.toml"
    config.write_text(f"[[sources]]\npaths = {json.dumps(paths)}\nformat = {json.dumps(fmt)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWARDEN_")} | {
        "MAILWARDEN_CONFIG": str(config),
        "MAILWARDEN_PEPPER": "sources-test-pepper",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--port", str(port), "--database-url", f"sqlite:///{tmp_path / 'm.db'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize(
    ("fmt", "make_path", "needle"),
    [
        ("weird", lambda tmp: tmp / "a.log", "sources[1].format: unknown format 'weird' (known: auto, combined, json"),
        ("combined", lambda tmp: tmp / "logs", "is a directory"),
    ],
)
def test_an_unusable_source_stops_the_start_with_one_line(tmp_path: Path, fmt: str, make_path, needle: str) -> None:
    (tmp_path / "a.log").write_text("")
    (tmp_path / "logs").mkdir()
    port = _free_port()
    proc = _start(tmp_path, [str(make_path(tmp_path))], fmt, port)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert "Traceback" not in err + out
    assert err.strip().splitlines() == [err.strip()] and needle in err, err
    assert "sources[1]" in err
    assert "mailwarden API on" not in err  # refused before serving


def test_a_missing_source_is_a_warning_and_a_follower_failing_later_shows_in_health(tmp_path: Path) -> None:
    later = tmp_path / "later.log"
    port = _free_port()
    proc = _start(tmp_path, [str(later)], "combined", port)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                first = httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "no /health in 120 s"
                time.sleep(0.2)
        assert first.status_code == 200 and first.json()["problems"] == []
        later.mkdir()  # the follower now finds a directory where it waits for the file
        deadline = time.monotonic() + 30
        while (answer := httpx.get(f"{base}/health", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "the dead follower never showed in /health"
            time.sleep(0.2)
        assert answer.status_code == 503
        body = answer.json()
        assert body["status"] == "error" and body["store"] == "ok"
        assert body["problems"] == ["sources[1] follower: stopped (SourceError); see the service log"]
        assert str(later) not in answer.text  # /health is open to all: no paths
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err + out, err
    assert f"sources[1].paths: '{later}' does not exist yet" in err
    stopped = [line for line in err.splitlines() if "sources[1] follower stopped" in line]
    assert stopped == [f"mailwarden: ERROR: sources[1] follower stopped: SourceError: cannot read {later}: Is a directory"]
