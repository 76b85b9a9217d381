"""In headless Debian Chromium: the dashboard on the demo store (key, alerts, plots, acknowledge) and
the offline report (renders with no network request at all)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from pipeline.cli import _mount_subcommands, app

pytestmark = pytest.mark.slow

# Long enough for a loaded 2-core CI machine; a wait ends as soon as its condition holds.
WAIT_MS = 60_000


def _figures_with_data(page) -> list[str]:
    """Names of the figures drawn by plotly.js with at least one data point and not the empty note."""
    return page.eval_on_selector_all(
        "div.figure[data-state='ready']",
        """divs => divs.filter(d => d.dataset.empty === 'false' && Number(d.dataset.points) > 0
                                && d.querySelector('svg.main-svg') !== null
                                && d.querySelectorAll('g.trace path, g.hm image').length > 0)
                   .map(d => d.dataset.figure)""",
    )


def test_dashboard_key_alerts_plots_and_acknowledge(served, chromium) -> None:
    context = chromium.new_context(viewport={"width": 1366, "height": 900}, timezone_id="Europe/Berlin")
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    page = context.new_page()
    try:
        page.goto(served.base_url + "/")
        # The key is asked for before anything is shown.
        page.wait_for_selector("#key-dialog:not([hidden])", timeout=WAIT_MS)
        page.fill("#key-input", "mwk_not_a_real_key_at_all")
        page.click("#key-submit")
        page.wait_for_function(
            "() => document.getElementById('key-error').textContent.includes('not valid')", timeout=WAIT_MS
        )
        page.fill("#key-input", served.key)
        page.click("#key-submit")
        page.wait_for_selector("#key-dialog[hidden]", state="attached", timeout=WAIT_MS)

        # The demo store's alerts, as the API lists them for the range the page asked for.
        page.select_option("#range-preset", "all")
        page.wait_for_selector("#alerts tbody tr", timeout=WAIT_MS)
        page.wait_for_function("() => document.body.dataset.loading === 'false'", timeout=WAIT_MS)
        rows = page.eval_on_selector_all("#alerts tbody tr", "trs => trs.map(tr => tr.dataset.alertId)")
        listed = httpx.get(served.base_url + "/alerts", params={"status": "open", "limit": 500},
                           headers={"X-API-Key": served.key}).json()
        assert len(rows) == listed["total"] > 0
        assert set(rows) == {a["alert_id"] for a in listed["items"]}

        # The overview figures are drawn by plotly.js, with data in them.
        page.wait_for_function(
            "() => document.querySelectorAll(\"div.figure[data-state='loading']\").length === 0", timeout=WAIT_MS
        )
        drawn = _figures_with_data(page)
        assert len(drawn) >= 4, drawn
        assert {"requests_over_time", "top_ips"} <= set(drawn)

        # Refresh without reloading: the page's own state survives, the load counter moves on.
        page.evaluate("() => { window.__notReloaded = true; }")
        loads = int(page.evaluate("() => document.body.dataset.loads"))
        page.click("#refresh")
        page.wait_for_function(f"() => Number(document.body.dataset.loads) > {loads}", timeout=WAIT_MS)
        assert page.evaluate("() => window.__notReloaded") is True

        # Open the first alert: its page shows the evidence and the entity's activity plot.
        alert_id = rows[0]
        page.click(f"#alerts tr[data-alert-id='{alert_id}'] td:nth-child(4) a")
        page.wait_for_selector(f"#alert-page[data-alert-id='{alert_id}']", timeout=WAIT_MS)
        page.wait_for_selector("#fig-alert_activity[data-state='ready']", timeout=WAIT_MS)
        assert "alert_activity" in _figures_with_data(page)
        evidence_keys = page.eval_on_selector_all("#evidence > dt", "dts => dts.map(d => d.textContent)")
        stored = httpx.get(f"{served.base_url}/alerts/{alert_id}", headers={"X-API-Key": served.key}).json()
        assert evidence_keys == list(stored["evidence"])
        assert stored["status"] == "open"

        page.click("#alert-page button[data-action='ack']")
        page.wait_for_selector(f"#alert-page[data-alert-id='{alert_id}'][data-status='acknowledged']",
                               timeout=WAIT_MS)
        after = httpx.get(f"{served.base_url}/alerts/{alert_id}", headers={"X-API-Key": served.key}).json()
        assert after["status"] == "acknowledged"

        # The key and the range are kept for the tab: a reload asks for neither again.
        page.reload()
        page.wait_for_selector(f"#alert-page[data-alert-id='{alert_id}']", timeout=WAIT_MS)
        assert page.is_hidden("#key-dialog") and page.input_value("#range-preset") == "all"

        # The isolation forest's scores with its threshold, on their own page.
        page.click("#nav-model")
        page.wait_for_selector("#fig-score_distribution[data-state='ready']", timeout=WAIT_MS)
        assert "score_distribution" in _figures_with_data(page)
        assert "threshold" in page.inner_text("#fig-score_distribution")
    finally:
        context.close()
    # Everything came from mailwarden itself: plotly.js included, no CDN.
    hosts = {urlsplit(url).netloc for url in requests}
    assert hosts == {urlsplit(served.base_url).netloc}
    assert any(url.endswith("/static/plotly.min.js") for url in requests)


def test_report_renders_offline_without_any_request(demo_store, chromium, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    _mount_subcommands()
    result = CliRunner().invoke(app, ["report", "--database-url", demo_store.url, "--out", str(out)],
                                env={"MAILWARDEN_PEPPER": "report-test-pepper"})
    assert result.exit_code == 0, result.output
    assert out.is_file() and "wrote" in result.output

    context = chromium.new_context(offline=True)
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    # Anything but the file itself is refused, so a stray request could not be served from anywhere.
    context.route("**/*", lambda route: route.continue_() if route.request.url == out.as_uri() else route.abort())
    page = context.new_page()
    try:
        page.goto(out.as_uri())
        page.wait_for_function("() => document.body.dataset.rendered !== undefined", timeout=WAIT_MS)
        blocks = page.eval_on_selector_all("script[type='application/json'][data-figure]", "s => s.length")
        assert int(page.evaluate("() => document.body.dataset.rendered")) == blocks >= 9
        drawn = page.eval_on_selector_all("div.figure[data-state='ready'] svg.main-svg", "s => s.length")
        assert drawn >= blocks
        alerts = page.eval_on_selector_all("#alerts tbody tr", "trs => trs.length")
        posture = page.inner_text("#posture")
    finally:
        context.close()
    assert requests == [out.as_uri()]
    assert alerts > 0 and "plain HTTP" in posture
