"""`mailwarden ingest --follow` as a user runs it: lines appended while it runs are stored, and a
SIGTERM or Ctrl-C ends it cleanly with the same summary a one-shot ingest prints (exit codes 0 and
130, as the README gives them)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The tree under test: the subprocess runs elsewhere, where an installed copy would win.
ROOT = Path(__file__).resolve().parents[2]


def _line(i: int) -> str:
    return f'198.51.100.{i % 250 + 1} - - [02/Nov/2026:10:{i // 60 % 60:02d}:{i % 60:02d} +0000] "GET /v3/stats?n={i} HTTP/1.1" 200 5 "-" "t"\n'


@pytest.mark.parametrize(("stop_with", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_follow_stores_appended_lines_and_a_stop_signal_prints_the_summary(
    tmp_path: Path, stop_with: signal.Signals, code: int
) -> None:
    log = tmp_path / "access.log"
    log.write_text("".join(_line(i) for i in range(50)))
    db = tmp_path / "m.db"
    env = {**os.environ, "MAILWARDEN_PEPPER": "t", "MAILWARDEN_CONFIG": os.devnull, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", "--follow", str(log),
                             "--database-url", f"sqlite:///{db}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with log.open("a") as f:
            for i in range(50, 120):
                f.write(_line(i))
                f.flush()
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline and stored < 120:
            time.sleep(0.2)
            if db.exists():
                with sqlite3.connect(db) as conn:
                    try:
                        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
                    except sqlite3.OperationalError:
                        stored = 0
        assert stored == 120
        proc.send_signal(stop_with)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    if stop_with == signal.SIGINT:
        assert "interrupted: everything committed so far is kept" in err
    summary = {" ".join(line.split()[:-1]): line.split()[-1] for line in out.splitlines() if line.strip()}
    assert summary.get("events stored") == "120" and summary.get("lines read") == "120", out
    assert "combined x1" in out
