"""The dashboard's files (page, script, stylesheet) and plotly.js, read from the installed packages.

plotly.js comes from the plotly Python package itself (its `package_data/plotly.min.js`), so the
dashboard and the report work air-gapped and the browser never asks a CDN for anything.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from importlib import resources

TEMPLATES = resources.files("dashboards").joinpath("templates")
log = logging.getLogger(__name__)

# The trace types mailwarden's figures draw (scatter is part of plotly.js's core). A test builds
# every figure of dashboards.figures and checks that each uses only these.
FIGURE_TRACES = frozenset({"scatter", "bar", "heatmap", "histogram"})

# plotly.min.js ends with `<registry>.register([a(),b(),...])`: each call runs one trace type's
# module. esbuild wraps every module in a function run on its first use, `x=W((e,t)=>{...})`,
# and a module uses another by calling its function, `y()`.
_REGISTER = re.compile(r"\.register\(\[((?:[\w$]+\(\),)*[\w$]+\(\))\]\)")
_WRAPPED = re.compile(r"[,;\s]([\w$]+)=([\w$]+)\(\(\(?[\w$]+,[\w$]+\)?=>\{")
_MODULE_TYPE = re.compile(r'moduleType:"(\w+)"')
_MODULE_NAME = re.compile(r'\bname:"(\w+)"')
_FIRST_CALL = re.compile(r"([\w$]+)\(\)")

@lru_cache(maxsize=None)
def template(name: str) -> str:
    """A file of dashboards/templates as text (cached: they do not change while running)."""
    return TEMPLATES.joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle shipped inside the plotly Python package."""
    return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def dashboard_plotly_js() -> str:
    """plotly.js registering only the trace types our figures use (and every component).

    Running the bundle's 47 trace modules is most of what a browser spends on plotly.js: about
    1.0 s of a dashboard's first load on a 2-core machine, 0.5 s with four trace types. The other
    modules' code stays in the file, never run. Anything unexpected in the bundle (another
    plotly.js build) gives the whole bundle unchanged, so a figure can never lose its trace type.
    """
    full = plotly_js()
    try:
        return trim_traces(full, FIGURE_TRACES)
    except ValueError as exc:
        log.debug("serving plotly.js whole: %s", exc)
        return full


def trim_traces(bundle: str, keep: frozenset[str]) -> str:
    """`bundle` with the trace modules not in `keep` left out of its final register call.

    An entry whose module cannot be identified stays in. Raises ValueError when the bundle does
    not have the expected shape or a wanted trace type (other than scatter) is not found.
    """
    found = list(_REGISTER.finditer(bundle))
    if not found:
        raise ValueError("no register([...]) call at the end of the bundle")
    register = found[-1]
    modules = _module_texts(bundle, register.start())
    kept, named = [], set()
    for call in register.group(1).split(","):
        module = _module_of(modules, call[:-2])
        if module is not None and module[0] == "trace":
            named.add(module[1])
            if module[1] not in keep:
                continue
        kept.append(call)
    missing = sorted(keep - named - {"scatter"})
    if missing:
        raise ValueError(f"trace type(s) {', '.join(missing)} not found among the registered modules")
    return bundle[: register.start(1)] + ",".join(kept) + bundle[register.end(1):]


def _module_texts(bundle: str, until: int) -> dict[str, str]:
    """Every wrapped module's text (to the next module's start) by its function's name."""
    starts = [(m.start(), m.end(), m.group(1)) for m in _WRAPPED.finditer(bundle, 0, until)]
    texts = {}
    for (_, body_start, name), (next_start, _, _) in zip(starts, [*starts[1:], (until, 0, "")]):
        texts[name] = bundle[body_start:next_start]
    return texts


def _module_of(modules: dict[str, str], entry: str, depth: int = 4) -> tuple[str, str] | None:
    """(moduleType, name) of the module a register entry runs: read from its text, or from the
    module it re-exports (`t.exports=inner()`, or `var x=inner();x.plot=...;t.exports=x`)."""
    text = modules.get(entry)
    if text is None or depth == 0:
        return None
    kind, name = _MODULE_TYPE.search(text), _MODULE_NAME.search(text)
    if kind is not None and name is not None:
        return kind.group(1), name.group(1)
    call = _FIRST_CALL.search(text)
    return _module_of(modules, call.group(1), depth - 1) if call else None


def plotly_js_version() -> str:
    """The bundle's version, from its banner comment (`* plotly.js v4.1.1`)."""
    head = plotly_js()[:300]
    marker = "plotly.js v"
    start = head.find(marker)
    if start < 0:
        return "unknown"
    return head[start + len(marker):].split()[0]
