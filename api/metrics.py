"""Prometheus metrics of one API process, written in the text exposition format (version 0.0.4)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelKey = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    kind: str  # counter, gauge, summary
    help: str
    samples: dict[LabelKey, float] = field(default_factory=dict)
    # Summaries keep a sum and a count per label set.
    counts: dict[LabelKey, float] = field(default_factory=dict)
    # Unlabelled counters show 0 before their first event, so rate() and alerts work from the start.
    labelled: bool = True


# Everything this process counts, declared once so /metrics always shows every family (at 0).
DECLARED = [
    ("mailwarden_api_requests_total", "counter", "API requests by method, route template and status.", True),
    ("mailwarden_api_request_duration_seconds", "summary", "Time to answer API requests, by route template.", True),
    ("mailwarden_api_auth_failures_total", "counter", "Requests refused for a missing, wrong or revoked key.", True),
    ("mailwarden_api_rate_limited_total", "counter",
     "Requests refused because the client failed to authenticate too often.", False),
    ("mailwarden_ingest_lines_total", "counter", "Lines received on POST /ingest, by format.", True),
    ("mailwarden_ingest_events_stored_total", "counter", "Events stored from POST /ingest (new ids only), by format.",
     True),
    ("mailwarden_ingest_duplicates_total", "counter", "Pushed lines whose event id was already stored, by format.",
     True),
    ("mailwarden_ingest_quarantined_total", "counter", "Pushed lines quarantined, by format.", True),
]


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(key: LabelKey) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in key) + "}"


class Metrics:
    """Counters and summaries in memory (per process: Prometheus sums replicas itself)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, Family] = {
            name: Family(name, kind, text, labelled=labelled) for name, kind, text, labelled in DECLARED
        }

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            family = self._families[name]
            family.samples[key] = family.samples.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            family = self._families[name]
            family.samples[key] = family.samples.get(key, 0.0) + value
            family.counts[key] = family.counts.get(key, 0.0) + 1

    def value(self, name: str, **labels: str) -> float:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            return self._families[name].samples.get(key, 0.0)

    def render(self, gauges: Iterable[Family] = ()) -> str:
        """The exposition text: this process's families, then gauges read at scrape time."""
        lines: list[str] = []
        with self._lock:
            families = [
                Family(f.name, f.kind, f.help, dict(f.samples), dict(f.counts), f.labelled)
                for f in self._families.values()
            ]
        for family in [*families, *gauges]:
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            if family.kind == "summary":
                for key in sorted(family.samples):
                    lines.append(f"{family.name}_sum{_labels(key)} {format_value(family.samples[key])}")
                    lines.append(f"{family.name}_count{_labels(key)} {format_value(family.counts.get(key, 0.0))}")
                continue
            if not family.samples and not family.labelled:
                lines.append(f"{family.name} 0")
            for key in sorted(family.samples):
                lines.append(f"{family.name}{_labels(key)} {format_value(family.samples[key])}")
        return "\n".join(lines) + "\n"


def gauge(name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> Family:
    family = Family(name, "gauge", help_text)
    for labels, value in samples:
        family.samples[tuple(sorted(labels.items()))] = float(value)
    return family
