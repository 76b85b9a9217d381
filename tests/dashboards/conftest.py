"""Dashboard fixtures: the labelled demo store, a copy of it served by a real uvicorn on 127.0.0.1,
and headless Debian Chromium through playwright (skipped with a reason where none is installed)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.demo_store import SampleStore, make_demo_key, sample_store
from pipeline.store import Store

# Without the background-networking flags Chromium keeps dialling out, and this closed network
# refuses every attempt.
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
CHROMIUM = os.environ.get("MAILWARDEN_TEST_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> SampleStore:
    """Two days of generated traffic with injected attacks, ingested and detected (built once)."""
    return sample_store(tmp_path_factory.getbasetemp() / "demo-store")


@pytest.fixture
def demo_copy(demo_store: SampleStore, tmp_path: Path) -> SampleStore:
    """A private copy of the demo store, for tests that change alerts or add keys."""
    copy = SampleStore(tmp_path / "store")
    shutil.copytree(demo_store.folder, copy.folder)
    return copy


@dataclass
class Served:
    base_url: str
    key: str
    store: SampleStore


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(demo_copy: SampleStore) -> Iterator[Served]:
    """The API and dashboard on a copy of the demo store, served by uvicorn on 127.0.0.1."""
    import uvicorn

    from api.main import create_app

    store = Store.open(demo_copy.url)
    try:
        key = make_demo_key(store)
    finally:
        store.close()
    app = create_app(demo_copy.settings())
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-dashboard-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start on 127.0.0.1")
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", key, demo_copy)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Debian's Chromium: skipped with the reason outside CI where none is installed, failed in CI."""
    if not Path(CHROMIUM).is_file():
        if IN_CI:
            pytest.fail(f"CI=true but no Chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium to run the browser tests")
    return CHROMIUM


# Module scope: playwright's sync API keeps an event loop of its own, so it lives no longer than
# the browser tests that need it.
@pytest.fixture(scope="module")
def chromium(chromium_binary: str) -> Iterator[object]:
    """A headless Chromium driven by playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_binary, args=BROWSER_FLAGS)
        try:
            yield browser
        finally:
            browser.close()
