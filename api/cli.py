"""CLI for the API: `mailwarden apikey create|list|revoke` and `mailwarden serve` (mounted by pipeline.cli)."""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from api.auth import KeyRing
from pipeline.config import Settings, load_settings
from pipeline.schema import ConfigError, MailwardenError
from pipeline.store import Store

apikey_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

DatabaseOption = Annotated[
    Optional[str],
    typer.Option("--database-url", help="Store URL (default: MAILWARDEN_DATABASE_URL or ./mailwarden.db)."),
]


def _settings(database_url: str | None) -> Settings:
    return load_settings(**({"database_url": database_url} if database_url else {}))


@apikey_app.command("create")
def apikey_create(
    scope: Annotated[
        list[str],
        typer.Option("--scope", "-s", help="alerts:read, alerts:write, events:read, ingest, metrics:read or admin; repeat for more."),
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Who or what uses the key (shown in the audit log).")],
    database_url: DatabaseOption = None,
) -> None:
    """Create a key and print it once on stdout: only its hash is stored, it cannot be shown again."""
    settings = _settings(database_url)
    store = Store.open(settings.database_url)
    try:
        raw, principal = KeyRing(store.engine).create(name, scope)
    finally:
        store.close()
    scopes = " ".join(sorted(s.value for s in principal.scopes))
    err.print(f"created key {principal.key_id} for {principal.name!r} with scopes: {scopes}")
    err.print("it is shown only now; send it as X-API-Key or Authorization: Bearer")
    print(raw)


@apikey_app.command("list")
def apikey_list(database_url: DatabaseOption = None) -> None:
    """List keys (ids, names, scopes, use), never the keys themselves."""
    settings = _settings(database_url)
    store = Store.open(settings.database_url, must_exist=True)
    try:
        keys = KeyRing(store.engine).list()
    finally:
        store.close()
    table = Table(title=f"{len(keys)} API keys")
    for col in ("key id", "name", "scopes", "created (UTC)", "last used", "revoked"):
        table.add_column(col)
    for k in keys:
        table.add_row(
            k["key_id"],
            k["name"],
            " ".join(k["scopes"]),
            f"{k['created_at']:%Y-%m-%d %H:%M}",
            f"{k['last_used_at']:%Y-%m-%d %H:%M}" if k["last_used_at"] else "never",
            f"{k['revoked_at']:%Y-%m-%d %H:%M}" if k["revoked_at"] else "",
        )
    out.print(table)


@apikey_app.command("revoke")
def apikey_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (the 12 characters after mwk_).")],
    database_url: DatabaseOption = None,
) -> None:
    """Revoke a key: requests with it are refused from now on."""
    settings = _settings(database_url)
    store = Store.open(settings.database_url, must_exist=True)
    try:
        revoked = KeyRing(store.engine).revoke(key_id.removeprefix("mwk_")[:12])
    finally:
        store.close()
    if not revoked:
        raise MailwardenError(f"no active key with id {key_id!r} (see `mailwarden apikey list`)")
    out.print(f"revoked key {key_id}")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int) -> None:
    """Bind the address once and let it go, so a taken port or a host that is no address here is one
    error line before anything is announced or started (uvicorn would log and exit 3 after our banner)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} is not an address to listen on ({getattr(exc, 'strerror', None) or exc})") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn binds: a port held only by connections in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use (choose another with --port)") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _warm_dashboard(store: Any) -> None:
    """While uvicorn starts: trim and compress plotly.js, and count the dashboard's default range,
    so the first page load finds both ready."""
    from api.frames import warm_overview
    from api.routers.dashboard import asset

    asset("plotly.min.js")
    warm_overview(store)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="PEM certificate (chain) for HTTPS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="PEM private key for HTTPS.")] = None,
    database_url: DatabaseOption = None,
) -> None:
    """Run the HTTP API (OpenAPI at /docs). Keys travel in headers: off loopback, use TLS."""
    import uvicorn

    from api.main import create_app

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    check_listen(host, port)
    tls = tls_cert is not None
    if not tls and not is_loopback(host):
        err.print(
            f"[yellow]warning:[/] serving on {host} without TLS: API keys and data cross the network in "
            "clear text. Use --tls-cert/--tls-key, or a TLS-terminating proxy listed in trusted_proxies."
        )
    settings = _settings(database_url)
    app = create_app(settings)
    threading.Thread(target=_warm_dashboard, args=(app.state.api.store,), name="dashboard-warm", daemon=True).start()
    scheme = "https" if tls else "http"
    err.print(f"mailwarden API on {scheme}://{host}:{port} (docs at /docs)")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the previous
    # handler; with the default one the process would die there, before `mailwarden run` stops its
    # scheduler and followers. A handler that only notes it lets both return normally.
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopped.append(signum))
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        # Client addresses come from trusted_proxies in our settings, one rule in one place.
        proxy_headers=False,
        server_header=False,
        log_level="info",
    )
