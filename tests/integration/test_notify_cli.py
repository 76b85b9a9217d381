"""`mailwarden notify test ROUTE` against a real receiver, with routes from a real mailwarden.toml."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from typer.testing import CliRunner
from werkzeug import Request, Response

from pipeline.notify.cli import notify_app
from pipeline.notify.signing import feishu_verify
from pipeline.schema import ConfigError, NotifyError

SECRET = "feishu-cli-test-key"


@pytest.fixture(scope="module")
def _server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def receiver(_server: HTTPServer) -> Iterator[HTTPServer]:
    _server.clear()
    yield _server
    _server.clear()


@pytest.fixture
def configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: HTTPServer) -> HTTPServer:
    config = tmp_path / "mailwarden.toml"
    config.write_text(
        "[[routes]]\n"
        'name = "secops"\n'
        'platform = "feishu"\n'
        'url_env = "MW_TEST_FEISHU_URL"\n'
        'secret_env = "MW_TEST_FEISHU_SECRET"\n'
        'min_severity = "critical"\n'
        "\n[[routes]]\n"
        'name = "broken"\n'
        'platform = "slack"\n'
        'url_env = "MW_TEST_BROKEN_URL"\n'
    )
    monkeypatch.setenv("MAILWARDEN_CONFIG", str(config))
    monkeypatch.setenv("MW_TEST_FEISHU_URL", receiver.url_for("/open-apis/bot/v2/hook/tok-123456"))
    monkeypatch.setenv("MW_TEST_FEISHU_SECRET", SECRET)
    monkeypatch.setenv("MW_TEST_BROKEN_URL", receiver.url_for("/services/broken-7890"))
    return receiver


def test_notify_test_sends_a_signed_sample_alert(configured: HTTPServer) -> None:
    bodies: list[bytes] = []

    def handler(request: Request) -> Response:
        bodies.append(request.get_data())
        return Response('{"code":0,"msg":"success","data":{}}', content_type="application/json")

    configured.expect_request("/open-apis/bot/v2/hook/tok-123456", method="POST").respond_with_handler(handler)
    result = CliRunner().invoke(notify_app, ["test", "secops"])
    assert result.exit_code == 0, result.output
    assert "sample alert delivered, HTTP 200" in result.output
    (body,) = bodies
    payload = json.loads(body)
    assert feishu_verify(SECRET, payload["timestamp"], payload["sign"])
    # The route wants only critical alerts; the test message bypasses that filter on purpose.
    assert "Test alert from mailwarden" in json.dumps(payload, ensure_ascii=False)
    assert "tok-123456" not in result.output


def test_notify_test_reports_a_failing_receiver_without_the_url(configured: HTTPServer) -> None:
    configured.expect_request("/services/broken-7890", method="POST").respond_with_data("no_service", status=404)
    result = CliRunner().invoke(notify_app, ["test", "broken"])
    assert isinstance(result.exception, NotifyError)
    assert not result.exception.retryable
    assert "HTTP 404" in str(result.exception) and "broken-7890" not in str(result.exception)


def test_notify_test_names_the_known_routes(configured: HTTPServer) -> None:
    result = CliRunner().invoke(notify_app, ["test", "nope"])
    assert isinstance(result.exception, ConfigError)
    assert "broken, secops" in str(result.exception)
