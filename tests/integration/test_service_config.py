"""The documented example configuration loads with the real loaders: settings, routes and detectors."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import pytest

from detectors.registry import build_detectors
from pipeline.config import load_settings
from pipeline.notify import load_routes
from pipeline.schema import ConfigError, Severity

EXAMPLE = Path(__file__).resolve().parents[2] / "mailwarden.example.toml"
ROUTE_ENV = {
    "MAILWARDEN_FEISHU_URL": "https://open.feishu.cn/open-apis/bot/v2/hook/example-token",
    "MAILWARDEN_FEISHU_SECRET": "feishu-example-secret",
    "MAILWARDEN_DINGTALK_URL": "https://oapi.dingtalk.com/robot/send?access_token=example",
    "MAILWARDEN_DINGTALK_SECRET": "SECexample",
    "MAILWARDEN_SIEM_URL": "https://siem.example.net/hooks/mailwarden",
    "MAILWARDEN_SIEM_SECRET": "whsec_" + base64.b64encode(bytes(range(32))).decode(),
    "MAILWARDEN_SLACK_URL": "https://hooks.slack.com/services/T000/B000/example",
}


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    import os

    for name in list(os.environ):
        if name.startswith("MAILWARDEN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MAILWARDEN_CONFIG", str(EXAMPLE))
    for name, value in ROUTE_ENV.items():
        monkeypatch.setenv(name, value)
    return ROUTE_ENV


def test_the_example_file_loads_with_the_real_settings_loader(example_env: dict[str, str]) -> None:
    settings = load_settings()
    raw = tomllib.loads(EXAMPLE.read_text())
    assert settings.database_url == raw["database_url"]
    assert [(s.paths, s.format) for s in settings.sources] == [(s["paths"], s["format"]) for s in raw["sources"]]
    assert settings.schedule.detect_seconds == 60 and settings.schedule.train_hours == 24
    detectors = {d.name: d for d in build_detectors(settings.detectors)}
    assert detectors["auth_bruteforce"].threshold == raw["detectors"]["auth_bruteforce"]["threshold"]
    assert detectors["auth_bruteforce"].window.total_seconds() == 600

    routes = {r.name: r for r in load_routes(settings.routes)}
    assert set(routes) == {r["name"] for r in raw["routes"]}
    assert routes["soc-feishu"].min_severity == Severity.HIGH
    assert routes["siem"].repeat_interval == 0 and routes["oncall-dingtalk"].repeat_interval == 3600
    # Credentials came from the environment and stay out of the file and of the route's dump.
    for route in routes.values():
        assert route.url.get_secret_value() == example_env[route.url_env]
        assert route.url.get_secret_value() not in EXAMPLE.read_text()
        assert route.url.get_secret_value() not in route.model_dump_json()


def test_the_example_environment_override_wins(example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILWARDEN_SCHEDULE__DETECT_SECONDS", "2")
    assert load_settings().schedule.detect_seconds == 2


def test_a_typo_in_a_copy_of_the_example_is_one_clear_error(
    example_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "mailwarden.toml"
    broken.write_text(EXAMPLE.read_text().replace("detect_seconds = 60", "detect_secnods = 60"))
    monkeypatch.setenv("MAILWARDEN_CONFIG", str(broken))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "schedule.detect_secnods" in str(caught.value) and "\n" not in str(caught.value)
