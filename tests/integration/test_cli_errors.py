"""The CLI under hostile use: Ctrl-C, closed stdin, unusable store paths, unknown options.

Each must end with one clear line and a non-zero exit code, never a traceback, and an interrupted
ingest must resume to the exact count.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.samples import write_combined_log


# The tree under test: the commands run in a temporary directory, where an installed copy of
# mailwarden would otherwise be imported instead of this one.
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "MAILWARDEN_PEPPER": "p", "COLUMNS": "200", "PYTHONPATH": path}


def _cli(*args: str, cwd: Path, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=_env(), stdin=stdin,
                          capture_output=True, text=True, timeout=300)


def _assert_one_clear_line(done: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert needle in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, as the README says


def _events(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]


@pytest.mark.slow
def test_ctrl_c_during_ingest_exits_130_and_a_rerun_completes_the_exact_count(tmp_path: Path) -> None:
    log = write_combined_log(tmp_path / "big.log", 400_000)
    db = tmp_path / "int.db"
    cmd = [sys.executable, "-m", "pipeline", "ingest", str(log), "--database-url", f"sqlite:///{db}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt once the first batches are committed, well before the end.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                if _events(db) > 0:
                    break
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("ingest finished before it could be interrupted; make the file bigger")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err + out
    kept = _events(db)
    assert 0 < kept < 400_000

    rerun = _cli("ingest", str(log), "--database-url", f"sqlite:///{db}", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert _events(db) == 400_000


def test_closed_stdin_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os, sys; os.close(0); sys.stdin = None; "
                           "sys.argv = ['mailwarden', 'ingest', '-']; from pipeline.cli import main; main()"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    _assert_one_clear_line(done, 2, "standard input is closed")


@pytest.mark.parametrize(
    ("database", "needle"),
    [
        ("{tmp}/a-file.log/x.db", "error:"),          # a parent that is a file
        ("{tmp}/a-file.log", "the store cannot be used"),  # a file that is not a database
        ("/proc/nope/x.db", "No such file or directory"),
    ],
)
def test_unusable_sqlite_paths_are_one_line_errors(tmp_path: Path, database: str, needle: str) -> None:
    (tmp_path / "a-file.log").write_text("not a database\n" * 10)
    url = "sqlite:///" + database.format(tmp=tmp_path)
    done = _cli("ingest", str(tmp_path / "a-file.log"), "--database-url", url, cwd=tmp_path)
    _assert_one_clear_line(done, 2, needle)


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    done = _cli("alerts", "--since", "foo", cwd=tmp_path)
    _assert_one_clear_line(done, 2, "No such option: --since")
    assert "internal error" not in done.stderr


def test_generate_into_an_existing_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    done = _cli("generate", "--days", "1", "--out", str(target), cwd=tmp_path)
    _assert_one_clear_line(done, 2, "error:")
    assert "internal error" not in done.stderr


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    env = {**_env(), "MAILWARDEN_CONFIG": str(tmp_path / "nope.toml")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "alerts"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    _assert_one_clear_line(done, 2, "nope.toml")


def test_a_config_directory_is_refused_but_dev_null_is_an_empty_config(tmp_path: Path) -> None:
    env = {**_env(), "MAILWARDEN_CONFIG": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "alerts"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    _assert_one_clear_line(done, 2, "not a readable file")
    env = {**_env(), "MAILWARDEN_CONFIG": "/dev/null"}
    made = subprocess.run([sys.executable, "-m", "pipeline", "db", "upgrade"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    done = subprocess.run([sys.executable, "-m", "pipeline", "alerts"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "0 alerts" in done.stdout


def test_read_only_commands_do_not_create_a_store_at_a_mistyped_path(tmp_path: Path) -> None:
    typo = tmp_path / "nowhere" / "mailwarden.db"
    for command in (["alerts"], ["detect"], ["report", "--out", str(tmp_path / "r.html")], ["apikey", "list"]):
        done = _cli(*command, "--database-url", f"sqlite:///{typo}", cwd=tmp_path)
        _assert_one_clear_line(done, 2, f"no store at {typo}")
    assert not typo.parent.exists()


def test_detect_with_since_after_until_is_refused(tmp_path: Path) -> None:
    done = _cli("detect", "--since", "2026-12-01", "--until", "2026-11-01", cwd=tmp_path)
    _assert_one_clear_line(done, 2, "is not before --until")


def test_a_misspelt_detector_fails_detect_even_before_anything_is_stored(tmp_path: Path) -> None:
    config = tmp_path / "mailwarden.toml"
    config.write_text("[detectors.ip_brust]\nthreshold = 5\n")
    env = {**_env(), "MAILWARDEN_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "detect", "--database-url", f"sqlite:///{tmp_path / 'e.db'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    # The brackets are the message's, not markup to be swallowed.
    _assert_one_clear_line(done, 2, "unknown detector(s) ip_brust in [detectors]")


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ('timezone = "Mars/Olympus"', "error: timezone: unknown time zone 'Mars/Olympus'"),
        ('trusted_proxies = ["10.0.0.0/8", "10.0.0.0/33"]', "error: trusted_proxies: entry 2, '10.0.0.0/33', is not"),
        ('json_mapping = "nope"', "error: json_mapping: unknown mapping 'nope' (built-in: mailapi, apigateway, traefik"),
        ('json_mapping = {ts = "time"}', "error: json_mapping: source_ip must be mapped"),
    ],
)
def test_settings_a_parser_needs_are_checked_when_the_settings_load(tmp_path: Path, setting: str, needle: str) -> None:
    # `alerts` uses no parser: the setting is refused all the same, not only once a parser runs.
    (tmp_path / "bad.toml").write_text(setting + "\n")
    env = {**_env(), "MAILWARDEN_CONFIG": str(tmp_path / "bad.toml")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "alerts"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    _assert_one_clear_line(done, 2, needle)


def test_the_json_mappings_a_parser_takes_still_load(tmp_path: Path) -> None:
    from pipeline.config import load_settings

    for value in ("Traefik", {"ts": "time", "source_ip": ["ip", "client.ip"]}, None):
        assert load_settings(json_mapping=value, timezone="Europe/Berlin", trusted_proxies=["::1", "10.0.0.0/8"]).json_mapping == value


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["detect", "--since", "0001-01-01", "--until", "0001-01-02"], "error: --since: '0001-01-01' is outside the years 1970 to 2200"),
        (["detect", "--until", "9999-12-31"], "error: --until: '9999-12-31' is outside the years 1970 to 2200"),
        (["alerts", "--limit", "99999999999999999999"], "--limit': Input should be less than or equal to 500"),
    ],
)
def test_out_of_range_times_and_limits_are_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert _cli("db", "upgrade", "--database-url", db, cwd=tmp_path).returncode == 0
    done = _cli(*args, "--database-url", db, cwd=tmp_path)
    _assert_one_clear_line(done, 2, needle)
    assert "internal error" not in done.stderr


def test_alerts_limit_at_the_api_maximum_is_accepted(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert _cli("db", "upgrade", "--database-url", db, cwd=tmp_path).returncode == 0
    done = _cli("alerts", "--limit", "500", "--database-url", db, cwd=tmp_path)
    assert done.returncode == 0 and "0 alerts" in done.stdout, done.stderr


def test_alerts_status_typo_is_an_error_naming_the_statuses(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 's.db'}"
    assert _cli("db", "upgrade", "--database-url", db, cwd=tmp_path).returncode == 0
    done = _cli("alerts", "--status", "bogus", "--database-url", db, cwd=tmp_path)
    _assert_one_clear_line(done, 2, "error: --status: unknown status 'bogus' (one of: open, acknowledged, resolved, silenced)")
    assert _cli("alerts", "--status", "resolved", "--database-url", db, cwd=tmp_path).returncode == 0


def test_a_path_that_is_no_regular_file_is_named_as_such(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    db = f"sqlite:///{tmp_path / 'n.db'}"
    for path in ("/dev/null", str(fifo)):
        done = _cli("ingest", path, "--database-url", db, cwd=tmp_path)
        _assert_one_clear_line(done, 2, f"error: '{path}' is not a regular file; give a log file, or - for standard input")
    done = _cli("ingest", str(tmp_path / "absent.log"), "--database-url", db, cwd=tmp_path)
    _assert_one_clear_line(done, 2, "no file matches")  # a missing file keeps its own message


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://u:secret@db.example/m", "error: unsupported database 'mysql' in mysql://u:***@db.example/m: mailwarden "
                                          "stores in SQLite (sqlite:///path/mailwarden.db) or PostgreSQL"),
        ("sqlite:///{tmp}/adir", "error: {tmp}/adir is a directory: name a database file, e.g. sqlite:///{tmp}/adir/mailwarden.db"),
    ],
)
def test_database_urls_mailwarden_cannot_use_say_why(tmp_path: Path, url: str, needle: str) -> None:
    (tmp_path / "adir").mkdir()
    done = _cli("db", "upgrade", "--database-url", url.format(tmp=tmp_path), cwd=tmp_path)
    _assert_one_clear_line(done, 2, needle.format(tmp=tmp_path))
    assert "secret" not in done.stderr and "MySQLdb" not in done.stderr
