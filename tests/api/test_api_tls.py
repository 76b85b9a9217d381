"""`mailwarden serve` over real HTTPS with --tls-cert/--tls-key, and its warning on a clear-text public bind."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.auth import KeyRing
from pipeline.store import Store

IN_CI = os.environ.get("CI", "").lower() == "true"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        if IN_CI:
            pytest.fail("CI=true but the openssl command is missing")
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


def _serve(tmp_path: Path, url: str, *args: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {**os.environ, "MAILWARDEN_PEPPER": "tls-test-pepper", "MAILWARDEN_DATA_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--database-url", url, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, port


def _wait(get, proc: subprocess.Popen) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return get()
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "server did not start within 30 s"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    _, stderr = proc.communicate(timeout=15)
    return stderr


@pytest.mark.slow
def test_serve_speaks_https_with_the_given_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    url = f"sqlite:///{tmp_path / 'tls.db'}"
    store = Store.open(url)
    raw, _ = KeyRing(store.engine).create("tls", ["alerts:read"])
    store.close()
    proc, port = _serve(tmp_path, url, "--tls-cert", str(cert), "--tls-key", str(key))
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        health = _wait(lambda: httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted, timeout=2), proc)
        assert health.status_code == 200
        alerts = httpx.get(f"https://127.0.0.1:{port}/alerts", headers={"X-API-Key": raw}, verify=trusted, timeout=5)
        assert alerts.status_code == 200 and alerts.json()["total"] == 0
        # Clear text on the TLS port gets no answer, and a client that does not trust the
        # certificate refuses it: the key never crosses the wire unprotected.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/health", timeout=2)
    finally:
        stderr = _stop(proc)
    assert f"https://127.0.0.1:{port}" in stderr
    assert "without TLS" not in stderr


@pytest.mark.slow
def test_serve_warns_on_a_public_bind_without_tls(tmp_path: Path) -> None:
    proc, port = _serve(tmp_path, f"sqlite:///{tmp_path / 'open.db'}", "--host", "0.0.0.0")
    try:
        assert _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2), proc).status_code == 200
    finally:
        stderr = _stop(proc)
    assert "warning" in stderr and "serving on 0.0.0.0 without TLS" in stderr
    assert "Traceback" not in stderr
