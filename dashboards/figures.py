"""Figures: a frame in, a Plotly figure out; pure (no queries, no clock). FIGURES names them."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
import plotly.graph_objects as go

from dashboards import world
from pipeline.schema import Outcome, Severity

OUTCOME_ORDER = [o.value for o in Outcome] + ["unknown"]
# Success green, refusals warm, our own errors dark: a wall of red reads as an attack at a glance.
OUTCOME_COLOURS = {
    "ok": "#4c9f70",
    "auth_failed": "#d1495b",
    "forbidden": "#edae49",
    "rate_limited": "#8d6a9f",
    "client_error": "#00798c",
    "server_error": "#30343f",
    "unknown": "#9e9e9e",
}
# Worse is darker and redder; info and low stay quiet so critical stands out.
SEVERITY_COLOURS = {
    "info": "#9aa5b1",
    "low": "#4f9fd6",
    "medium": "#e0a526",
    "high": "#e0612b",
    "critical": "#a4161a",
}
SERVICE_COLOURS = {"api": "#00798c", "smtp": "#d1495b", "imap": "#8d6a9f", "pop3": "#edae49", "web": "#30343f"}
# Countries by traffic: pale to deep blue, so the few red failure markers are not confused with it.
MAP_SCALE = ["#e3eef9", "#9ecae1", "#4292c6", "#2171b5", "#08306b"]
LAND_COLOUR = "#e9ecef"

# One look for every figure: system fonts, light grid, legend above the plot, heights that leave
# room for two figures side by side on a 13-inch laptop screen.
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
HEIGHT = 340
THEME = go.layout.Template(
    layout={
        "font": {"family": FONT, "size": 12, "color": "#1f2933"},
        "title": {"font": {"size": 15}, "x": 0.01, "xanchor": "left"},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "colorway": ["#00798c", "#d1495b", "#edae49", "#4c9f70", "#8d6a9f", "#30343f"],
        "xaxis": {"gridcolor": "#eceff1", "linecolor": "#b0bec5", "zeroline": False, "automargin": True},
        "yaxis": {"gridcolor": "#eceff1", "linecolor": "#b0bec5", "zeroline": False, "automargin": True},
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
        "hoverlabel": {"font": {"family": FONT}},
        "margin": {"l": 56, "r": 16, "t": 56, "b": 40},
        "height": HEIGHT,
    }
)
UTC_AXIS = "time (UTC)"
WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


# ---- helpers -----------------------------------------------------------------------------------


def _style(fig: go.Figure, title: str, **layout: Any) -> go.Figure:
    fig.update_layout(template=THEME, title_text=title, **layout)
    return fig


def _empty(title: str, text: str = "no events in this range") -> go.Figure:
    fig = go.Figure()
    _style(
        fig,
        title,
        annotations=[{"text": text, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
                      "font": {"size": 14, "color": "#7b8794"}}],
        xaxis={"visible": False},
        yaxis={"visible": False},
        # Lets a page tell "drawn, nothing to show" from "drawn with data" without reading traces.
        meta={"empty": True},
    )
    return fig


def _zone(tz: str | None) -> ZoneInfo | None:
    """The viewer's zone, or None for UTC (or a name this system does not know)."""
    if not tz or tz.upper() in ("UTC", "ETC/UTC", "Z"):
        return None
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _utc(values: Any) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(values, utc=True))


def _iso(values: Any) -> list[str]:
    # Plotly draws the wall-clock part and ignores the offset; it is UTC, and the axis title says so.
    return [ts.isoformat() for ts in _utc(values)]


def when_text(values: Any, tz: str | None) -> list[str]:
    """Hover text for UTC instants: the UTC time, and the viewer's local time when a zone is given."""
    stamps = _utc(values)
    zone = _zone(tz)
    utc_text = [f"{ts:%Y-%m-%d %H:%M} UTC" for ts in stamps]
    if zone is None:
        return utc_text
    local = stamps.tz_convert(zone)
    return [f"{u}<br>{ts:%Y-%m-%d %H:%M} {ts.tzname()} ({tz})" for u, ts in zip(utc_text, local)]


def _outcome_sorted(values: Any) -> list[str]:
    present = {str(v) for v in values}
    return sorted(present, key=lambda o: (OUTCOME_ORDER.index(o) if o in OUTCOME_ORDER else 99, o))


def _severity_name(value: Any) -> str:
    try:
        return str(Severity.parse(int(value) if str(value).isdigit() else str(value)))
    except Exception:  # noqa: BLE001 - an unknown severity is drawn as info, never an error
        return "info"


def _time_axis(since: datetime | None, until: datetime | None) -> dict[str, Any]:
    """Layout fixing the time axis to [since, until] when both are known (else plotly fits the data)."""
    if since is None or until is None:
        return {}
    return {"xaxis_range": _iso([since, until])}


def _outcome_bars(frame: pd.DataFrame, tz: str | None) -> list[go.Bar]:
    bars = []
    for outcome in _outcome_sorted(frame["outcome"].astype(str)):
        part = frame[frame["outcome"].astype(str) == outcome].sort_values("bucket")
        bars.append(
            go.Bar(
                # Plain lists keep the JSON readable to any client (numpy arrays become base64).
                x=_iso(part["bucket"]),
                y=[int(n) for n in part["count"]],
                name=outcome,
                marker_color=OUTCOME_COLOURS.get(outcome),
                customdata=when_text(part["bucket"], tz),
                hovertemplate="%{customdata}<br>%{y:,} " + outcome + "<extra></extra>",
            )
        )
    return bars


# ---- traffic over time ---------------------------------------------------------------------------


def requests_over_time(
    frame: pd.DataFrame, *, alerts: pd.DataFrame | None = None, tz: str | None = None,
    since: datetime | None = None, until: datetime | None = None,
) -> go.Figure:
    """Stacked bars of requests per time bucket, one trace per outcome, with a marker per alert.

    Frame columns: `bucket` (UTC timestamp of the bucket start), `outcome`, `count`. `alerts`
    (optional): `window_start`, `severity`, `title` (and `detector`); each becomes a triangle
    above the bars at its start, coloured by severity. `tz`: the viewer's zone for hover texts.
    `since`/`until`: the range asked for, which the time axis then shows whole and no more (an
    alert that began before it is marked at its left edge).
    """
    title = "Requests over time by outcome"
    if frame.empty:
        return _empty(title)
    fig = go.Figure(_outcome_bars(frame, tz))
    layout: dict[str, Any] = _time_axis(since, until)
    if alerts is not None and not alerts.empty:
        marks = alerts.assign(sev=[_severity_name(s) for s in alerts["severity"]]).sort_values("window_start")
        starts = _utc(marks["window_start"])
        if since is not None:
            starts = pd.DatetimeIndex(pd.Series(starts).clip(lower=pd.Timestamp(since)))
        marks = marks.assign(shown_at=list(starts))
        for sev in [str(s) for s in Severity if str(s) in set(marks["sev"])]:
            part = marks[marks["sev"] == sev]
            fig.add_trace(
                go.Scatter(
                    x=_iso(part["shown_at"]),
                    # On a hidden 0..1 axis: always just above the bars, whatever their height.
                    y=[0.97] * len(part),
                    yaxis="y2",
                    mode="markers",
                    name=f"{sev} alert",
                    marker={"symbol": "triangle-down", "size": 11, "color": SEVERITY_COLOURS[sev],
                            "line": {"width": 1, "color": "#ffffff"}},
                    customdata=[[t, w] for t, w in zip(part["title"].astype(str), when_text(part["window_start"], tz))],
                    hovertemplate="<b>%{customdata[0]}</b><br>%{customdata[1]}<extra>" + sev + "</extra>",
                )
            )
        layout["yaxis2"] = {"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True}
    return _style(
        fig, title, barmode="stack", bargap=0.05, xaxis_title=UTC_AXIS, yaxis_title="requests",
        legend_title_text="", **layout,
    )


def auth_failures_over_time(
    frame: pd.DataFrame, *, tz: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> go.Figure:
    """Failed authentications per time bucket, one line per service (API keys, SMTP AUTH…).

    Frame columns: `bucket` (UTC), `service`, `count` (events with outcome auth_failed).
    `since`/`until`: the range asked for, shown whole on the time axis.
    """
    title = "Authentication failures over time"
    if frame.empty:
        return _empty(title, "no failed authentications in this range")
    fig = go.Figure()
    services = frame["service"].astype("string").fillna("unknown").astype(str)
    for service in sorted(set(services)):
        part = frame[services == service].sort_values("bucket")
        fig.add_trace(
            go.Scatter(
                x=_iso(part["bucket"]),
                y=[int(n) for n in part["count"]],
                name=service,
                mode="lines+markers",
                marker={"size": 4},
                line={"width": 2, "color": SERVICE_COLOURS.get(service)},
                customdata=when_text(part["bucket"], tz),
                hovertemplate="%{customdata}<br>%{y:,} failed (" + service + ")<extra></extra>",
            )
        )
    return _style(fig, title, xaxis_title=UTC_AXIS, yaxis_title="failed authentications", yaxis_rangemode="tozero",
                  **_time_axis(since, until))


def failure_heatmap(
    frame: pd.DataFrame, *, since: datetime | None = None, until: datetime | None = None
) -> go.Figure:
    """Authentication failures by weekday and hour of day (UTC): when guessing happens.

    Frame columns: `bucket` (UTC timestamps, any resolution up to an hour), `count`. With the
    range (`since`, `until`), weekday-hours the range never covered are left blank instead of
    reading as "no failures".
    """
    title = "Authentication failures by hour and weekday (UTC)"
    if frame.empty or int(frame["count"].sum()) == 0:
        return _empty(title, "no failed authentications in this range")
    stamps = _utc(frame["bucket"])
    counts = (
        pd.DataFrame({"day": stamps.day_of_week, "hour": stamps.hour, "count": frame["count"].astype("int64").to_numpy()})
        .groupby(["day", "hour"])["count"]
        .sum()
    )
    covered: set[tuple[int, int]] | None = None
    if since is not None and until is not None:
        hours = pd.date_range(_utc([since])[0].floor("h"), _utc([until])[0].floor("h"), freq="h")
        covered = set(zip(hours.day_of_week, hours.hour))
    z = [
        [int(counts.get((day, hour), 0)) if covered is None or (day, hour) in covered else None for hour in range(24)]
        for day in range(7)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"{h:02d}" for h in range(24)],
            y=WEEKDAYS,
            colorscale=[[0, "#fff5f0"], [0.5, "#fb6a4a"], [1, "#67000d"]],
            hovertemplate="%{y} %{x}:00–%{x}:59 UTC<br>%{z:,} failed<extra></extra>",
            colorbar={"title": {"text": "failures"}, "thickness": 12},
            hoverongaps=False,
            xgap=1,
            ygap=1,
        )
    )
    return _style(fig, title, xaxis_title="hour of day (UTC)", xaxis_type="category", yaxis_autorange="reversed",
                  xaxis_showgrid=False, yaxis_showgrid=False)


# ---- top entities --------------------------------------------------------------------------------


def _top_bars(frame: pd.DataFrame, column: str, title: str, label: Callable[[str], str] = str) -> go.Figure:
    """Horizontal bars of the busiest values of `column`, split into ok and failed requests."""
    if frame.empty:
        return _empty(title)
    # Plotly draws the first category at the bottom; reversed, the busiest value is on top.
    rows = frame.iloc[::-1]
    names = [label(str(v)) for v in rows[column]]
    failures = [int(n) for n in rows["failures"]]
    ok = [int(total) - int(bad) for total, bad in zip(rows["requests"], rows["failures"])]
    full = [str(v) for v in rows[column]]
    fig = go.Figure(
        [
            go.Bar(y=names, x=ok, name="ok", orientation="h", marker_color=OUTCOME_COLOURS["ok"], customdata=full,
                   hovertemplate="%{customdata}<br>%{x:,} ok<extra></extra>"),
            go.Bar(y=names, x=failures, name="failed", orientation="h", marker_color=OUTCOME_COLOURS["auth_failed"],
                   customdata=full, hovertemplate="%{customdata}<br>%{x:,} failed<extra></extra>"),
        ]
    )
    height = max(HEIGHT, 120 + 18 * len(names))
    return _style(fig, title, barmode="stack", xaxis_title="requests", yaxis_type="category", height=height)


def _short_key(value: str) -> str:
    # Fingerprints are 64 hex characters; the first 12 tell keys apart on a chart.
    return value[:12] + "…" if len(value) > 16 else value


def top_ips(frame: pd.DataFrame) -> go.Figure:
    """Horizontal bars of the busiest client addresses, split into ok and failed requests.

    Frame columns: `source_ip`, `requests`, `failures` (outcome not ok); busiest first.
    """
    return _top_bars(frame, "source_ip", "Top client addresses")


def top_subnets(frame: pd.DataFrame) -> go.Figure:
    """The busiest networks (/24 for IPv4, /64 for IPv6): a flood spread over many addresses.

    Frame columns: `subnet`, `requests`, `failures`; busiest first.
    """
    return _top_bars(frame, "subnet", "Top client networks")


def top_keys(frame: pd.DataFrame) -> go.Figure:
    """The busiest API keys (fingerprints), split into ok and failed requests.

    Frame columns: `api_key_id`, `requests`, `failures`; busiest first.
    """
    return _top_bars(frame, "api_key_id", "Top API keys (fingerprints)", _short_key)


def top_accounts(frame: pd.DataFrame) -> go.Figure:
    """The busiest accounts (customer ids, SMTP/SASL users), split into ok and failed requests.

    Frame columns: `account`, `requests`, `failures`; busiest first.
    """
    return _top_bars(frame, "account", "Top accounts")


def subnet_of(address: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str | None:
    """The /24 (IPv4) or /64 (IPv6) network of an address, as text; None when it is not one."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return None
    prefix = ipv4_prefix if addr.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((addr, prefix), strict=False))


def subnets_frame(per_ip: pd.DataFrame, top: int = 20) -> pd.DataFrame:
    """Per-address counts (`source_ip`, `requests`, `failures`) folded into networks, busiest first."""
    if per_ip.empty:
        return pd.DataFrame({"subnet": pd.Series(dtype="string"), "requests": pd.Series(dtype="int64"),
                             "failures": pd.Series(dtype="int64"), "addresses": pd.Series(dtype="int64")})
    nets = per_ip.assign(subnet=[subnet_of(str(ip)) for ip in per_ip["source_ip"]]).dropna(subset=["subnet"])
    grouped = (
        nets.groupby("subnet")
        .agg(requests=("requests", "sum"), failures=("failures", "sum"), addresses=("source_ip", "nunique"))
        .reset_index()
        .sort_values(["requests", "subnet"], ascending=[False, True])
        .head(top)
        .reset_index(drop=True)
    )
    return grouped.astype({"subnet": "string", "requests": "int64", "failures": "int64", "addresses": "int64"})


# ---- countries -----------------------------------------------------------------------------------


def _rings_path(rings: list[list[float]]) -> str:
    """Rings of [lon, lat, lon, lat, …] as one SVG path in map coordinates."""
    parts = []
    for ring in rings:
        points = [f"{x:g},{y:g}" for x, y in zip(ring[0::2], ring[1::2])]
        if points:
            parts.append("M" + "L".join(points) + "Z")
    return "".join(parts)


@lru_cache(maxsize=1)
def _land_path() -> str:
    """Every country outline as one SVG path."""
    return "".join(_rings_path(entry.get("rings", [])) for entry in world.countries().values())


def _label_point(rings: list[list[float]]) -> tuple[float, float]:
    """The middle of the bounding box of the ring with the most points (the mainland)."""
    ring = max(rings, key=len)
    xs, ys = ring[0::2], ring[1::2]
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2


def _map_colour(share: float) -> str:
    return MAP_SCALE[min(len(MAP_SCALE) - 1, int(share * len(MAP_SCALE)))]


def countries_map(frame: pd.DataFrame) -> go.Figure:
    """Requests by country on a world map (outlines shipped with mailwarden: no map tiles fetched).

    Frame columns: `country` (ISO 3166 alpha-2, as iptocc gives), `requests`, `failures`. Shades
    follow log10(requests), so one huge country does not wash out the rest; countries too small for
    the map's scale are drawn as dots.
    """
    title = "Requests by country"
    shapes = world.countries()
    fig = go.Figure()
    # The land is one SVG path under the plot: a single string instead of a trace of some 11,000
    # points, which plotly.py would check one by one on every request (0.3 s of a first load).
    # Shapes are set once at the end: add_shape re-checks every earlier shape each time.
    paths = [{"type": "path", "path": _land_path(), "xref": "x", "yref": "y", "fillcolor": LAND_COLOUR,
              "line": {"color": "#ffffff", "width": 0.5}, "layer": "below"}]
    data = frame[frame["requests"] > 0] if not frame.empty else frame
    if data.empty:
        fig.add_annotation(text="no located addresses in this range", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.02, font={"color": "#7b8794"})
        fig.update_layout(meta={"empty": True})
    else:
        top = math.log10(max(int(data["requests"].max()), 10))
        unknown = []
        points: dict[str, list[Any]] = {"x": [], "y": [], "colour": [], "text": [], "size": []}
        for row in data.sort_values("requests").itertuples(index=False):
            code, requests, failures = str(row.country), int(row.requests), int(row.failures)
            entry = shapes.get(code)
            share = math.log10(max(requests, 1)) / top if top > 0 else 1.0
            text = (f"<b>{entry['name'] if entry else code}</b> ({code})<br>{requests:,} requests"
                    f"<br>{failures:,} failed ({failures / requests:.0%})")
            if entry is None:
                unknown.append(code)
                continue
            colour = _map_colour(min(share, 0.999))
            if "rings" in entry:
                # The fill is a path shape (no per-point checks); the hover sits on a marker at the
                # middle of the country's largest ring.
                paths.append({"type": "path", "path": _rings_path(entry["rings"]), "xref": "x", "yref": "y",
                              "fillcolor": colour, "line": {"color": "#ffffff", "width": 0.6}, "layer": "below"})
                x, y = _label_point(entry["rings"])
                points["size"].append(6)
            else:
                x, y = entry["point"]
                points["size"].append(9)
            points["x"].append(x)
            points["y"].append(y)
            points["colour"].append(colour)
            points["text"].append(text)
        if points["x"]:
            fig.add_trace(
                go.Scatter(x=points["x"], y=points["y"], mode="markers", showlegend=False, text=points["text"],
                           hoverinfo="text", marker={"size": points["size"], "color": points["colour"],
                                                     "line": {"width": 1, "color": "#08306b"}})
            )
        # A colour bar for the log shading, carried by an invisible marker.
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                marker={"colorscale": [[i / (len(MAP_SCALE) - 1), c] for i, c in enumerate(MAP_SCALE)],
                        "cmin": 0, "cmax": top, "color": [0], "showscale": True,
                        "colorbar": {"title": {"text": "requests"}, "thickness": 12,
                                     "tickvals": list(range(0, int(top) + 1)),
                                     "ticktext": [f"{10 ** i:,}" for i in range(0, int(top) + 1)]}},
            )
        )
        if unknown:
            fig.add_annotation(text=f"not on the map: {', '.join(sorted(unknown))}", showarrow=False,
                               xref="paper", yref="paper", x=0, y=0, xanchor="left", font={"color": "#7b8794"})
    return _style(
        fig, title,
        xaxis={"range": [-180, 180], "visible": False, "fixedrange": False},
        # Equal degrees both ways (equirectangular); Antarctica is left out, nobody sends from there.
        yaxis={"range": [-58, 85], "visible": False, "scaleanchor": "x", "scaleratio": 1},
        margin={"l": 8, "r": 8, "t": 48, "b": 8},
        plot_bgcolor="#f8fbff",
        hovermode="closest",
        shapes=paths,
    )


# ---- alerts --------------------------------------------------------------------------------------


def alert_timeline(
    frame: pd.DataFrame, *, tz: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> go.Figure:
    """Alerts as segments from window start to end, one row per detector, coloured by severity.

    Frame columns: `detector`, `severity` (name or level), `window_start`, `window_end`, `title`
    (and optionally `entity`, `status`). `since`/`until`: the range asked for: the time axis shows
    it whole and no more, so an alert that overlaps it is drawn up to its edge.
    """
    title = "Alerts by detector and severity"
    if frame.empty:
        return _empty(title, "no alerts in this range")
    marks = frame.assign(sev=[_severity_name(s) for s in frame["severity"]]).sort_values("window_start")
    fig = go.Figure()
    for sev in [str(s) for s in Severity if str(s) in set(marks["sev"])]:
        part = marks[marks["sev"] == sev]
        xs: list[str | None] = []
        ys: list[str | None] = []
        hover: list[str | None] = []
        starts, ends = when_text(part["window_start"], tz), when_text(part["window_end"], tz)
        for row, start, end, s_text, e_text in zip(
            part.itertuples(index=False), _iso(part["window_start"]), _iso(part["window_end"]), starts, ends
        ):
            text = f"<b>{row.title}</b><br>from {s_text}<br>to {e_text}"
            if "status" in part.columns:
                text += f"<br>status: {row.status}"
            xs.extend([start, end, None])
            ys.extend([str(row.detector), str(row.detector), None])
            hover.extend([text, text, None])
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, mode="lines+markers", name=sev, text=hover, hoverinfo="text",
                line={"width": 8, "color": SEVERITY_COLOURS[sev]},
                marker={"size": 9, "color": SEVERITY_COLOURS[sev], "symbol": "line-ns", "line": {"width": 2,
                        "color": SEVERITY_COLOURS[sev]}},
            )
        )
    detectors = sorted(set(marks["detector"].astype(str)))
    height = max(260, 140 + 34 * len(detectors))
    return _style(fig, title, xaxis_title=UTC_AXIS, yaxis={"type": "category", "categoryorder": "array",
                  "categoryarray": detectors[::-1]}, height=height, hovermode="closest", **_time_axis(since, until))


def score_distribution(
    frame: pd.DataFrame, *, threshold: float | None = None, label_name: str = "labelled attack",
    title: str = "Anomaly score distribution",
) -> go.Figure:
    """Histogram of anomaly scores (higher is worse) with the alerting threshold as a line.

    Frame columns: `score`, and optionally `label` (truthy for windows known to be attacks, as in
    generated data, or named by an alert), drawn as a second histogram over the first and named
    `label_name` in the legend.
    """
    if frame.empty:
        return _empty(title, "no scores")
    scores = frame["score"].astype("float64")
    fig = go.Figure()
    bins = {"start": float(scores.min()), "end": float(scores.max()) + 1e-9,
            "size": max((float(scores.max()) - float(scores.min())) / 60, 1e-6)}
    if "label" in frame.columns:
        labelled = frame["label"].fillna(False).astype(bool).to_numpy()
        groups = [("other windows", scores[~labelled], "#4f9fd6"), (label_name, scores[labelled], "#d1495b")]
    else:
        groups = [("windows", scores, "#4f9fd6")]
    for name, values, colour in groups:
        if len(values):
            fig.add_trace(go.Histogram(x=[float(v) for v in values], name=name, xbins=bins, marker_color=colour,
                                       opacity=0.75, hovertemplate="score %{x}<br>%{y:,} windows<extra>" + name
                                       + "</extra>"))
    if threshold is not None:
        above = int((scores >= threshold).sum())
        fig.add_vline(x=threshold, line_dash="dash", line_color="#1f2933", line_width=2)
        fig.add_annotation(x=threshold, y=1, yref="paper", xanchor="left", yanchor="top", showarrow=False,
                           text=f" threshold {threshold:.3g}: {above:,} of {len(scores):,} windows"
                                f" ({above / len(scores):.2%}) at or above",
                           font={"color": "#1f2933"})
    return _style(fig, title, barmode="overlay", xaxis_title="anomaly score (higher is worse)",
                  yaxis_title="windows", yaxis_type="log" if len(scores) > 200 else "linear")


def _alert_value(alert: Mapping[str, Any], key: str) -> Any:
    value = alert.get(key)
    if key in ("window_start", "window_end") and value is not None:
        return pd.Timestamp(value).tz_convert("UTC") if pd.Timestamp(value).tzinfo else pd.Timestamp(value, tz="UTC")
    return value


def alert_activity(
    frame: pd.DataFrame,
    *,
    alert: Mapping[str, Any],
    since: datetime | None = None,
    bucket_seconds: int | None = None,
    tz: str | None = None,
) -> go.Figure:
    """One alert's entity before, during and after the alert: requests per bucket by outcome, the
    alert window shaded, and the entity's baseline (mean requests per bucket before the alert).

    Frame columns: `bucket` (UTC), `outcome`, `count`, for the alert's entity only. `alert` needs
    `window_start`, `window_end` and `title`; `since` is where the plotted range starts (buckets
    without events count as zero in the baseline), `bucket_seconds` the bucket width.
    """
    start, end = _alert_value(alert, "window_start"), _alert_value(alert, "window_end")
    title = f"Activity of {alert.get('entity', 'the entity')} around the alert"
    if frame.empty:
        fig = _empty(title, "no events of this entity around the alert")
    else:
        fig = go.Figure(_outcome_bars(frame, tz))
    fig.add_vrect(x0=start.isoformat(), x1=end.isoformat(),
                  fillcolor="#d1495b", opacity=0.10, line_width=0, layer="below",
                  annotation_text="alert window", annotation_position="top left")
    layout: dict[str, Any] = {}
    if not frame.empty:
        stamps = _utc(frame["bucket"])
        width = bucket_seconds or _bucket_width(stamps)
        first = _utc([since])[0] if since is not None else stamps.min()
        before = frame[(stamps < start)]
        n_before = max(int((start - first).total_seconds() // width), 0)
        if n_before > 0:
            baseline = float(before["count"].sum()) / n_before
            fig.add_hline(y=baseline, line_dash="dot", line_color="#30343f", line_width=2,
                          annotation_text=f"baseline {baseline:,.1f} per {_duration(width)} before the alert",
                          annotation_position="top right")
            layout["meta"] = {"baseline": baseline, "bucket_seconds": width}
        layout["xaxis_title"] = UTC_AXIS
        layout["yaxis_title"] = f"requests per {_duration(width)}"
    subtitle = str(alert.get("title") or "")
    if subtitle:
        layout["title_text"] = f"{title}<br><sup>{subtitle}</sup>"
    fig.update_layout(template=THEME, barmode="stack", bargap=0.05, **({"title_text": title} | layout))
    return fig


def _bucket_width(stamps: pd.DatetimeIndex) -> int:
    unique = stamps.unique().sort_values()
    if len(unique) < 2:
        return 60
    return max(int(pd.Series(unique).diff().dropna().min().total_seconds()), 1)


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} d" if seconds != 86400 else "day"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h" if seconds != 3600 else "hour"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


FIGURES: dict[str, Callable[..., go.Figure]] = {
    "requests_over_time": requests_over_time,
    "auth_failures_over_time": auth_failures_over_time,
    "failure_heatmap": failure_heatmap,
    "top_ips": top_ips,
    "top_subnets": top_subnets,
    "top_keys": top_keys,
    "top_accounts": top_accounts,
    "countries_map": countries_map,
    "alert_timeline": alert_timeline,
    "score_distribution": score_distribution,
    "alert_activity": alert_activity,
}

# The overview: what the dashboard's front page and the report show, in this order.
# Half-width figures come in pairs between the wide ones, so no half row is left empty.
OVERVIEW = [
    "requests_over_time",
    "auth_failures_over_time",
    "failure_heatmap",
    "alert_timeline",
    "countries_map",
    "top_ips",
    "top_subnets",
    "top_keys",
    "top_accounts",
]

