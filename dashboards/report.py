"""The HTML report: frames in, one self-contained HTML string out (plotly.js inlined, no requests).

Pure: the caller reads the store, the clock and plotly.js, and hands them in.
"""

from __future__ import annotations

import html
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from dashboards.figures import FIGURES, OVERVIEW
from pipeline.schema import Outcome, Severity

# Alert rows written into the report; a noisy period says how many more there were.
MAX_ALERT_ROWS = 500
MAX_KEY_ROWS = 25
# The overview, then the model's view of the range (too slow to fit for the dashboard's first load,
# but a report is written once).
REPORT_FIGURES = [*OVERVIEW, "score_distribution"]
WIDE = frozenset({"requests_over_time", "alert_timeline", "countries_map", "score_distribution"})


@dataclass
class ReportInput:
    """Everything the report shows, already read from the store."""

    since: datetime
    until: datetime
    generated_at: datetime
    store: str
    # Keyword arguments of FIGURES[name] per figure, in the order the report shows them.
    figures: dict[str, dict[str, Any]]
    alerts: pd.DataFrame
    posture: Mapping[str, Any]
    plotly_js: str
    stylesheet: str
    template: str
    version: str = "unknown"
    title: str = "mailwarden report"
    figure_order: Sequence[str] = field(default_factory=lambda: list(REPORT_FIGURES))


def _e(value: Any) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value))


def _utc(value: Any) -> str:
    if value is None or (not isinstance(value, datetime) and pd.isna(value)):
        return ""
    return f"{pd.Timestamp(value).tz_convert('UTC') if pd.Timestamp(value).tzinfo else pd.Timestamp(value):%Y-%m-%d %H:%M}"


def _json_for_script(figure_json: str) -> str:
    # Inside <script>, only "</" can end the element early; "<\/" means the same to JSON.parse.
    return figure_json.replace("</", "<\\/")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = (), table_id: str = "") -> str:
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{cell}</td>' for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kpi(value: str, label: str, ident: str) -> str:
    return f'<div class="kpi" id="kpi-{ident}"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div></div>'


def _severity(value: Any) -> str:
    try:
        return str(Severity.parse(int(value) if str(value).isdigit() else str(value)))
    except Exception:  # noqa: BLE001 - an unknown level is shown as it is
        return str(value)


def summary_numbers(data: ReportInput) -> dict[str, Any]:
    """Headline counts computed from the frames the figures draw (nothing is queried twice)."""
    traffic = data.figures.get("requests_over_time", {}).get("frame", pd.DataFrame())
    requests = int(traffic["count"].sum()) if not traffic.empty else 0
    auth_failed = (
        int(traffic.loc[traffic["outcome"].astype(str) == Outcome.AUTH_FAILED.value, "count"].sum())
        if not traffic.empty else 0
    )
    severities = [_severity(s) for s in data.alerts["severity"]] if not data.alerts.empty else []
    by_severity = {str(s): severities.count(str(s)) for s in sorted(Severity, reverse=True) if str(s) in severities}
    open_alerts = int((data.alerts["status"] == "open").sum()) if not data.alerts.empty else 0
    return {"requests": requests, "auth_failed": auth_failed, "alerts": len(data.alerts),
            "open_alerts": open_alerts, "by_severity": by_severity}


def _posture_html(posture: Mapping[str, Any]) -> str:
    parts = ['<section class="panel" id="posture"><h2>Posture</h2>']
    share = posture.get("plain_http_share")
    http, https = int(posture.get("http_requests", 0)), int(posture.get("https_requests", 0))
    unknown = int(posture.get("unknown_scheme_requests", 0))
    if share is None:
        text = "no API or web requests with a known scheme in this period"
    else:
        text = f"{share:.2%} of API and web requests used plain HTTP ({http:,} of {http + https:,})"
    if unknown:
        text += f"; the scheme of {unknown:,} more is not in their logs"
    parts.append(f'<h3>Plain HTTP</h3><p id="plain-http">{_e(text)}</p>')

    secret = posture.get("secret_in_url_keys", pd.DataFrame())
    named = int(secret["api_key_id"].notna().sum()) if len(secret) else 0
    total = int(secret["requests"].sum()) if len(secret) else 0
    parts.append(f"<h3>Keys seen with a secret in the URL ({named} keys named, {total:,} requests)</h3>")
    if len(secret):
        parts.append('<p class="status">A key in a query string ends up in proxy and browser logs: rotate these. '
                     "Where the key was only in the URL it was redacted before storage, so the account and "
                     "addresses say whose it was.</p>")
        parts.append(_table(
            ["API key (fingerprint)", "account", "requests", "addresses", "first seen (UTC)", "last seen (UTC)"],
            ([f"<code>{_e(r.api_key_id)}</code>" if isinstance(r.api_key_id, str) else "only in the URL (redacted)",
              _e(r.account), f"{int(r.requests):,}", f"{int(r.ips):,}", _utc(r.first_seen), _utc(r.last_seen)]
             for r in secret.head(MAX_KEY_ROWS).itertuples(index=False)),
            numeric=[2, 3], table_id="secret-keys",
        ))
    else:
        parts.append("<p>None.</p>")

    unrotated = posture.get("unrotated_keys", pd.DataFrame())
    seen = int(posture.get("keys_seen", 0))
    parts.append(f"<h3>Keys never rotated in the period ({len(unrotated)} of {seen} keys seen)</h3>")
    if len(unrotated):
        parts.append('<p class="status">Their account used no other key in the whole period; most used first.</p>')
        more = f"<p class=status>and {len(unrotated) - MAX_KEY_ROWS:,} more</p>" if len(unrotated) > MAX_KEY_ROWS else ""
        parts.append(_table(
            ["API key (fingerprint)", "account", "requests", "first seen (UTC)", "last seen (UTC)"],
            ([f"<code>{_e(r.api_key_id)}</code>", _e(r.account), f"{int(r.requests):,}", _utc(r.first_seen),
              _utc(r.last_seen)] for r in unrotated.head(MAX_KEY_ROWS).itertuples(index=False)),
            numeric=[2], table_id="unrotated-keys",
        ) + more)
    else:
        parts.append("<p>None.</p>")

    failing = posture.get("failing_accounts", pd.DataFrame())
    parts.append(f"<h3>Top failing accounts ({len(failing)})</h3>")
    if len(failing):
        parts.append(_table(
            ["account", "failed authentications", "requests", "addresses"],
            ([_e(r.account), f"{int(r.auth_failures):,}", f"{int(r.requests):,}", f"{int(r.ips):,}"]
             for r in failing.itertuples(index=False)),
            numeric=[1, 2, 3], table_id="failing-accounts",
        ))
    else:
        parts.append("<p>No failed authentications.</p>")
    parts.append("</section>")
    return "".join(parts)


def _alerts_html(alerts: pd.DataFrame) -> str:
    parts = [f'<section class="panel" id="alerts-section"><h2>Alerts ({len(alerts)})</h2>']
    if alerts.empty:
        parts.append("<p>No alerts in this period.</p></section>")
        return "".join(parts)
    ordered = alerts.assign(level=[int(Severity.parse(_severity(s))) if _severity(s) in
                                   {str(x) for x in Severity} else 0 for s in alerts["severity"]])
    ordered = ordered.sort_values(["level", "window_start"], ascending=[False, True])
    rows = []
    for r in ordered.head(MAX_ALERT_ROWS).itertuples(index=False):
        sev = _severity(r.severity)
        rows.append([
            f'<span class="sev sev-{_e(sev)}">{_e(sev)}</span>',
            f"{_utc(r.window_start)} → {_utc(r.window_end)}",
            _e(r.detector),
            f"<code>{_e(r.entity_kind)} {_e(r.entity)}</code>",
            _e(r.title),
            _e(r.status),
            _e(getattr(r, "mitre", "") or ""),
        ])
    # No scrolling box in a report: it is read whole, printed, or turned into a PDF.
    parts.append(_table(["severity", "window (UTC)", "detector", "entity", "title", "status", "MITRE"], rows,
                        table_id="alerts"))
    if len(alerts) > MAX_ALERT_ROWS:
        parts.append(f'<p class="status">and {len(alerts) - MAX_ALERT_ROWS:,} more (see the API or the dashboard)</p>')
    parts.append("</section>")
    return "".join(parts)


def build_figures(data: ReportInput) -> dict[str, Any]:
    """The report's figures, by name, from their frames."""
    return {name: FIGURES[name](**data.figures[name]) for name in data.figure_order if name in data.figures}


def render_report(data: ReportInput) -> str:
    """One HTML document holding everything: styles, plotly.js, figures as JSON, tables."""
    numbers = summary_numbers(data)
    kpis = [
        _kpi(f"{numbers['requests']:,}", "requests and logins", "requests"),
        _kpi(f"{numbers['auth_failed']:,}", "failed authentications", "auth-failed"),
        _kpi(f"{numbers['alerts']:,}", "alerts (" + (", ".join(f"{n} {s}" for s, n in numbers["by_severity"].items())
                                                      or "none") + ")", "alerts"),
        _kpi(f"{numbers['open_alerts']:,}", "alerts still open", "open-alerts"),
    ]
    share = data.posture.get("plain_http_share")
    known = int(data.posture.get("http_requests", 0) or 0) + int(data.posture.get("https_requests", 0) or 0)
    # The share is of the requests whose log recorded the scheme (combined logs mostly do not).
    kpis.append(_kpi("n/a" if share is None else f"{share:.1%}",
                     f"over plain HTTP, of the {known:,} requests whose scheme was logged", "plain-http"))
    figures = build_figures(data)
    figure_html = []
    for name, figure in figures.items():
        wide = " wide" if name in WIDE else ""
        figure_html.append(
            f'<div class="figure{wide}" id="fig-{_e(name)}"></div>'
            f'<script type="application/json" data-figure="{_e(name)}">{_json_for_script(figure.to_json())}</script>'
        )
    body = "".join([
        f'<section class="panel"><h2>Summary</h2><div class="kpis">{"".join(kpis)}</div></section>',
        _posture_html(data.posture),
        f'<section class="grid" id="figures">{"".join(figure_html)}</section>',
        _alerts_html(data.alerts),
    ])
    since, until = data.since.astimezone(timezone.utc), data.until.astimezone(timezone.utc)
    subtitle = f"{since:%Y-%m-%d %H:%M} → {until:%Y-%m-%d %H:%M} UTC"
    return string.Template(data.template).substitute(
        title=_e(data.title),
        subtitle=_e(subtitle),
        generated=_e(f"{data.generated_at.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"),
        store=_e(data.store),
        version=_e(data.version),
        stylesheet=data.stylesheet,
        plotly_js=data.plotly_js,
        body=body,
    )

