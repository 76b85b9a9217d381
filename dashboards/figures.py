"""Figures: a frame in, a Plotly figure out; pure (no queries, no clock). FIGURES names them."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go

from pipeline.schema import Outcome

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


def _empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        annotations=[{"text": "no events in this range", "showarrow": False, "xref": "paper", "yref": "paper",
                      "x": 0.5, "y": 0.5}],
    )
    return fig


def requests_over_time(frame: pd.DataFrame) -> go.Figure:
    """Stacked bars of requests per time bucket, one trace per outcome.

    Frame columns: `bucket` (UTC timestamp of the bucket start), `outcome`, `count`.
    """
    title = "Requests over time by outcome"
    if frame.empty:
        return _empty(title)
    fig = go.Figure()
    present = set(frame["outcome"].astype(str))
    for outcome in sorted(present, key=lambda o: (OUTCOME_ORDER.index(o) if o in OUTCOME_ORDER else 99, o)):
        part = frame[frame["outcome"].astype(str) == outcome].sort_values("bucket")
        fig.add_trace(
            go.Bar(
                # Plain lists keep the JSON readable to any client (numpy arrays become base64).
                x=[ts.isoformat() for ts in pd.to_datetime(part["bucket"], utc=True)],
                y=[int(n) for n in part["count"]],
                name=outcome,
                marker_color=OUTCOME_COLOURS.get(outcome),
            )
        )
    fig.update_layout(
        title=title, barmode="stack", xaxis_title="time (UTC)", yaxis_title="requests", legend_title_text="outcome"
    )
    return fig


def top_ips(frame: pd.DataFrame) -> go.Figure:
    """Horizontal bars of the busiest client addresses, split into ok and failed requests.

    Frame columns: `source_ip`, `requests`, `failures` (outcome not ok); busiest first.
    """
    title = "Top client addresses"
    if frame.empty:
        return _empty(title)
    # Plotly draws the first category at the bottom; reversed, the busiest address is on top.
    rows = frame.iloc[::-1]
    ips = [str(ip) for ip in rows["source_ip"]]
    failures = [int(n) for n in rows["failures"]]
    ok = [int(total) - int(bad) for total, bad in zip(rows["requests"], rows["failures"])]
    fig = go.Figure(
        [
            go.Bar(y=ips, x=ok, name="ok", orientation="h", marker_color=OUTCOME_COLOURS["ok"]),
            go.Bar(y=ips, x=failures, name="failed", orientation="h", marker_color=OUTCOME_COLOURS["auth_failed"]),
        ]
    )
    fig.update_layout(title=title, barmode="stack", xaxis_title="requests", yaxis_type="category")
    return fig


FIGURES: dict[str, Callable[[pd.DataFrame], go.Figure]] = {
    "requests_over_time": requests_over_time,
    "top_ips": top_ips,
}
