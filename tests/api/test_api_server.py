"""The CLI (`apikey`, `serve`) and a real uvicorn server on 127.0.0.1 answering an authenticated call."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import typer
from alembic import command
from typer.testing import CliRunner

from api.auth import KeyRing, split_key
from api.cli import apikey_app, is_loopback, serve
from api.tables import audit_log
from pipeline.migrations import alembic_config, current_revision
from pipeline.schema import ConfigError
from pipeline.store import Store


def _cli() -> typer.Typer:
    # The shape pipeline.cli gives it: `mailwarden apikey …` and `mailwarden serve`.
    app = typer.Typer()
    app.add_typer(apikey_app, name="apikey")
    app.command("serve")(serve)
    return app


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MAILWARDEN_PEPPER": "server-test-pepper", "MAILWARDEN_DATA_DIR": str(tmp_path / "state")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_apikey_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    env = _env(tmp_path)
    created = runner.invoke(
        _cli(), ["apikey", "create", "--scope", "alerts:read", "--scope", "events:read", "--name", "grafana",
                 "--database-url", url], env=env,
    )
    assert created.exit_code == 0, created.output
    raw = created.stdout.strip()
    assert raw.startswith("mwk_") and "\n" not in raw  # stdout is the key alone, for scripts
    assert "shown only now" in created.stderr

    listed = runner.invoke(_cli(), ["apikey", "list", "--database-url", url], env=env)
    assert "grafana" in listed.stdout and raw not in listed.stdout
    assert "alerts:read events:read" in listed.stdout

    bad = runner.invoke(_cli(), ["apikey", "create", "--scope", "root", "--name", "x", "--database-url", url], env=env)
    assert isinstance(bad.exception, ConfigError) and "root" in str(bad.exception)

    revoked = runner.invoke(_cli(), ["apikey", "revoke", split_key(raw), "--database-url", url], env=env)
    assert revoked.exit_code == 0
    store = Store.open(url)
    assert KeyRing(store.engine).verify(raw) == (None, "revoked_key")
    store.close()


def test_serve_checks_tls_arguments(tmp_path: Path) -> None:
    runner = CliRunner()
    half = runner.invoke(_cli(), ["serve", "--tls-cert", str(tmp_path / "cert.pem")], env=_env(tmp_path))
    assert isinstance(half.exception, ConfigError) and "go together" in str(half.exception)
    missing = runner.invoke(
        _cli(), ["serve", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
        env=_env(tmp_path),
    )
    assert isinstance(missing.exception, ConfigError) and "does not exist" in str(missing.exception)


@pytest.mark.parametrize(
    "host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                       ("0.0.0.0", False), ("::", False), ("192.0.2.1", False), ("api.example.com", False)],
)
def test_non_loopback_hosts_are_told_apart(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.slow
def test_real_server_answers_an_authenticated_request(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'served.db'}"
    env = _env(tmp_path)
    created = CliRunner().invoke(
        _cli(), ["apikey", "create", "--scope", "alerts:read", "--name", "smoke", "--database-url", url], env=env
    )
    raw = created.stdout.strip()
    port = _free_port()
    script = "import typer; from api.cli import serve; typer.run(serve)"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--host", "127.0.0.1", "--port", str(port), "--database-url", url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "server did not start within 30 s"
            time.sleep(0.1)
        response = httpx.get(f"{base}/alerts", headers={"Authorization": f"Bearer {raw}"}, timeout=5)
        assert response.status_code == 200
        assert response.json() == {"items": [], "total": 0, "limit": 50, "offset": 0}
        assert "server" not in response.headers  # no version banner for scanners
        assert httpx.get(f"{base}/alerts", timeout=5).status_code == 401
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    assert "without TLS" not in stderr  # loopback needs no warning
    store = Store.open(url)
    with store.engine.connect() as conn:
        rows = conn.execute(audit_log.select().order_by(audit_log.c.audit_id)).all()
    store.close()
    assert [(r.path, r.status, r.key_name, r.client_ip) for r in rows if r.path == "/alerts"] == [
        ("/alerts", 200, "smoke", "127.0.0.1"),
        ("/alerts", 401, None, "127.0.0.1"),
    ]


def test_migration_0003_round_trips(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'm.db'}")
    api_tables = {"api_keys", "audit_log", "silences"}
    head = current_revision(store.engine)
    assert api_tables <= set(sa.inspect(store.engine).get_table_names())
    command.downgrade(alembic_config(store.engine), "0002")
    assert current_revision(store.engine) == "0002"
    assert not api_tables & set(sa.inspect(store.engine).get_table_names())
    store.upgrade()
    assert current_revision(store.engine) == head
    assert api_tables <= set(sa.inspect(store.engine).get_table_names())
    store.close()


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["serve", "run"])
@pytest.mark.parametrize("host", ["127.0.0.1", "999.1.1.1"])
def test_an_address_that_cannot_be_bound_is_one_error_line_before_any_banner(
    tmp_path: Path, command: str, host: str
) -> None:
    env = {k: v for k, v in _env(tmp_path).items() if k != "MAILWARDEN_CONFIG"} | {"MAILWARDEN_CONFIG": "/dev/null"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # cwd: this tree, so `-m pipeline` runs the code under test.
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", command, "--host", host, "--port", str(port),
             "--database-url", f"sqlite:///{tmp_path / 'b.db'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "mailwarden API on" not in done.stderr
    lines = done.stderr.strip().splitlines()
    expected = (f"error: port {port} on 127.0.0.1 is already in use" if host == "127.0.0.1"
                else "error: --host '999.1.1.1' is not an address to listen on")
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
