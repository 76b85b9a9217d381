"""Problems of this process's background work that /health reports (a follower that stopped).

A registry in the process, not the store: `mailwarden run` serves /health from the same process
whose threads it describes, and an API replica (`mailwarden serve`) has no such threads.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_problems: dict[str, str] = {}


def report_problem(component: str, text: str) -> None:
    """Record that `component` stopped working; /health shows `text` (no host or path in it)."""
    with _lock:
        _problems[component] = text


def problems() -> list[str]:
    with _lock:
        return [f"{component}: {text}" for component, text in sorted(_problems.items())]


def clear_problems() -> None:
    """Forget every problem (a new Service starts with none)."""
    with _lock:
        _problems.clear()
