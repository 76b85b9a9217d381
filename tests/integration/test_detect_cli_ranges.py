"""`mailwarden detect` over ranges reaching far beyond the stored events: cut to the stored span."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LINE = '203.0.113.5 - - [03/Nov/2026:{hh}:00:00 +0000] "POST /v1/send HTTP/1.1" 401 12 "-" "curl"\n'


@pytest.fixture
def small_store(tmp_path: Path) -> str:
    log = tmp_path / "access.log"
    log.write_text("".join(LINE.format(hh=f"{h:02d}") for h in range(10, 14)))
    url = f"sqlite:///{tmp_path / 'm.db'}"
    _run("ingest", "--database-url", url, str(log), cwd=tmp_path)
    return url


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAILWARDEN_PEPPER": "p", "COLUMNS": "200", "MAILWARDEN_DATA_DIR": str(cwd / "state")}
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


@pytest.mark.parametrize("args", [
    ["--since", "2026-11-02", "--until", "2199-12-31T23:59:59.999999Z"],
    ["--since", "1970-01-01T00:00:00Z"],
])
def test_a_range_of_centuries_detects_over_the_stored_span_only(small_store: str, tmp_path: Path, args) -> None:
    # Before, these stepped through every day to 2199 (28 s for 4 events) or from 1970; years beyond
    # 1970-2199 are refused as options (tests/integration/test_cli_errors.py).
    done = _run("detect", "--database-url", small_store, *args, cwd=tmp_path)
    assert "detected over 2026-11-03 10:00 .. 2026-11-03 13:00 UTC (4 events" in done.stdout, done.stdout


@pytest.mark.parametrize("args", [
    ["--since", "2199-12-31T23:59:59Z"],
    ["--until", "1999-01-01"],
    ["--since", "1970-01-01", "--until", "1970-01-02"],
])
def test_a_range_outside_the_stored_span_says_so(small_store: str, tmp_path: Path, args) -> None:
    done = _run("detect", "--database-url", small_store, *args, cwd=tmp_path)
    assert done.stdout.strip() == "no stored events in that range: the store holds 2026-11-03 10:00 .. 2026-11-03 13:00 UTC"


def test_an_empty_revocation_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "revoked.txt"
    empty.write_text("# nothing revoked yet\n\n")
    env = {**os.environ, "MAILWARDEN_PEPPER": "p", "COLUMNS": "200", "MAILWARDEN_DATA_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "keys", "revoke", "--file", str(empty),
                           "--database-url", f"sqlite:///{tmp_path / 'm.db'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{empty} holds no keys" in " ".join(done.stderr.split())
