"""Alerts to people: routes, pure payload builders per chat platform, and one sender with an outbox.

The scheduler calls `notify_once(store, routes, now)`; routes come from `load_routes(settings.routes)`.
"""

from pipeline.notify.builders import BUILDERS, Prepared, build
from pipeline.notify.outbox import NotifySummary, delivery_log, notify_once, outbox_rows
from pipeline.notify.routes import Route, load_routes
from pipeline.notify.sender import SendResult

__all__ = [
    "BUILDERS",
    "NotifySummary",
    "Prepared",
    "Route",
    "SendResult",
    "build",
    "delivery_log",
    "load_routes",
    "notify_once",
    "outbox_rows",
]
