"""`mailwarden notify …`: a typer sub-app the main CLI mounts (`app.add_typer(notify_app, name="notify")`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import typer
from rich.console import Console

from pipeline.config import load_settings
from pipeline.notify.routes import load_routes
from pipeline.notify.sender import send_test
from pipeline.schema import ConfigError, NotifyError

notify_app = typer.Typer(help="Chat notifications.", no_args_is_help=True)
out = Console()


@notify_app.callback()
def _group() -> None:
    """Chat notifications: routes, test messages."""
    # A callback keeps `notify` a command group even while `test` is its only command.


@notify_app.command("test")
def test(route: Annotated[str, typer.Argument(help="Name of a route from the [[routes]] settings.")]) -> None:
    """Send a sample alert to ROUTE now (filters and rate limits do not apply) and report the answer."""
    routes = {r.name: r for r in load_routes(load_settings().routes)}
    if route not in routes:
        known = ", ".join(sorted(routes)) or "none configured"
        raise ConfigError(f"no route named {route!r} (routes: {known})")
    target = routes[route]
    result = send_test(target, datetime.now(timezone.utc))
    if not result.ok:
        hint = " (temporary: try again later)" if result.retryable else ""
        raise NotifyError(f"route {route!r} ({target.platform}): {result.error}{hint}", retryable=result.retryable)
    code = f"HTTP {result.status_code}" if result.status_code else "sent"
    out.print(f"route {route!r} ({target.platform}): sample alert delivered, {code} in {result.duration_ms:.0f} ms")
