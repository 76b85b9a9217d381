"""The dashboard's files (page, script, stylesheet) and plotly.js, read from the installed packages.

plotly.js comes from the plotly Python package itself (its `package_data/plotly.min.js`), so the
dashboard and the report work air-gapped and the browser never asks a CDN for anything.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

TEMPLATES = resources.files("dashboards").joinpath("templates")


@lru_cache(maxsize=None)
def template(name: str) -> str:
    """A file of dashboards/templates as text (cached: they do not change while running)."""
    return TEMPLATES.joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle shipped inside the plotly Python package."""
    return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_text(encoding="utf-8")


def plotly_js_version() -> str:
    """The bundle's version, from its banner comment (`* plotly.js v4.1.1`)."""
    head = plotly_js()[:300]
    marker = "plotly.js v"
    start = head.find(marker)
    if start < 0:
        return "unknown"
    return head[start + len(marker):].split()[0]
