"""Chat payloads, one pure builder per platform: (alerts, route, now) -> (url, headers, body bytes).

No clock, no environment, no network: the signing timestamp is `now`, the URL and key come resolved
on the route. Text from logs (account names, entities) is attacker-controlled, so every builder
escapes it for its platform's markup: an alert about user "<!channel>" must not ping a channel.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.notify.routes import EACH_ALERT, Route
from pipeline.notify.signing import dingtalk_signed_url, feishu_sign, standard_webhooks_headers
from pipeline.schema import Alert, AlertStatus, Severity, alert_id_for

USER_AGENT = "mailwarden-notify/1"
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT}
# Chat messages list this many alerts in full; the rest are counted ("…and 20 more").
MAX_SHOWN = 10
# WeCom rejects markdown content over 4096 bytes (UTF-8); keep a margin for the JSON around it.
WECOM_MAX_BYTES = 4000
# Discord: at most 10 embeds and 6000 characters over all of them.
DISCORD_MAX_EMBEDS = 10
DISCORD_MAX_EMBED_CHARS = 5800
# Alertmanager's webhook sends this as endsAt of an alert that has not ended.
ZERO_TIME = "0001-01-01T00:00:00Z"

_EMOJI = {
    Severity.CRITICAL: ":red_circle:",
    Severity.HIGH: ":large_orange_circle:",
    Severity.MEDIUM: ":large_yellow_circle:",
    Severity.LOW: ":large_blue_circle:",
    Severity.INFO: ":white_circle:",
}
_RGB = {
    Severity.CRITICAL: 0xB71C1C,
    Severity.HIGH: 0xE65100,
    Severity.MEDIUM: 0xF9A825,
    Severity.LOW: 0x1565C0,
    Severity.INFO: 0x757575,
}
_FEISHU_TEMPLATE = {
    Severity.CRITICAL: "red",
    Severity.HIGH: "orange",
    Severity.MEDIUM: "yellow",
    Severity.LOW: "blue",
    Severity.INFO: "grey",
}
_TEAMS_COLOR = {
    Severity.CRITICAL: "Attention",
    Severity.HIGH: "Attention",
    Severity.MEDIUM: "Warning",
    Severity.LOW: "Accent",
    Severity.INFO: "Default",
}


class Prepared:
    """A message ready to POST. Unpacks as (url, headers, body); its repr hides the URL."""

    __slots__ = ("url", "headers", "body")

    def __init__(self, url: str, headers: dict[str, str], body: bytes):
        self.url, self.headers, self.body = url, headers, body

    def __iter__(self):
        return iter((self.url, self.headers, self.body))

    def __repr__(self) -> str:
        return f"Prepared(url=<hidden>, headers={sorted(self.headers)}, body={len(self.body)} bytes)"

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class AlertView:
    """An alert as the builders read it, whether it came as an Alert, a store row or a snapshot."""

    alert_id: str
    detector: str
    severity: Severity
    entity_kind: str
    entity: str
    window_start: datetime
    window_end: datetime
    score: float
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    mitre: str | None = None
    status: str = AlertStatus.OPEN.value

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "detector": self.detector,
            "severity": int(self.severity),
            "entity_kind": self.entity_kind,
            "entity": self.entity,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "score": self.score,
            "title": self.title,
            "evidence": self.evidence,
            "mitre": self.mitre,
            "status": self.status,
        }


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def view(alert: Alert | AlertView | Mapping[str, Any]) -> AlertView:
    if isinstance(alert, AlertView):
        return alert
    if isinstance(alert, Alert):
        data: Mapping[str, Any] = alert.to_row()
    else:
        data = alert
    evidence = data.get("evidence") or {}
    if isinstance(evidence, str):
        try:
            evidence = json.loads(evidence)
        except ValueError:
            evidence = {"text": evidence}
    start = _utc(data["window_start"])
    entity_kind = str(data["entity_kind"])
    alert_id = data.get("alert_id") or alert_id_for(str(data["detector"]), entity_kind, str(data["entity"]), start)
    return AlertView(
        alert_id=str(alert_id),
        detector=str(data["detector"]),
        severity=Severity.parse(data["severity"]),
        entity_kind=entity_kind,
        entity=str(data["entity"]),
        window_start=start,
        window_end=_utc(data["window_end"]),
        score=float(data.get("score") or 0.0),
        title=str(data.get("title") or ""),
        evidence=dict(evidence) if isinstance(evidence, Mapping) else {"value": evidence},
        mitre=data.get("mitre") or None,
        status=str(data.get("status") or AlertStatus.OPEN.value),
    )


def ordered(alerts: Iterable[Alert | AlertView | Mapping[str, Any]]) -> list[AlertView]:
    """Worst first: severity, then score, then the oldest window."""
    views = [view(a) for a in alerts]
    return sorted(views, key=lambda v: (-int(v.severity), -v.score, v.window_start, v.alert_id))


# ---- text --------------------------------------------------------------------------------------
# Control characters, zero-width and bidirectional overrides: the last can make "gro.elpmaxe" read
# as a different domain, so none of them reach a chat.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]+")


def clean(text: Any, limit: int) -> str:
    """One line, no invisible characters, at most `limit` characters."""
    flat = _INVISIBLE.sub(" ", str(text))
    flat = re.sub(r" {2,}", " ", flat).strip()
    if len(flat) > limit:
        flat = flat[: max(0, limit - 1)].rstrip() + "…"
    return flat


def slack_escape(text: str) -> str:
    # Slack parses only these three: escaped, "<!channel>" and "<http://x|link>" cannot form.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_MD_SPECIAL = re.compile(r"([\\*_`~|\[\]()<>#])")


def markdown_escape(text: str) -> str:
    """Backslash-escape for CommonMark renderers that honour it (Discord)."""
    return _MD_SPECIAL.sub(r"\\\1", text)


_LOOKALIKE = str.maketrans({"[": "［", "]": "］", "<": "‹", ">": "›", "`": "ˋ"})


def neutral(text: str) -> str:
    """For renderers with no documented escape (DingTalk, WeCom, Teams): brackets become lookalikes,
    so no link, tag or mention can form, and the text still reads the same."""
    return text.translate(_LOOKALIKE)


def _window(v: AlertView) -> str:
    start, end = v.window_start, v.window_end
    if start.date() == end.date():
        return f"{start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC"
    return f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"


def _evidence_line(evidence: Mapping[str, Any], limit: int = 4) -> str:
    """A few scalar facts (counts, baselines); lists of IPs stay in the store and the API."""
    parts = []
    for key in sorted(evidence):
        value = evidence[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}: {clean(value, 60)}")
        if len(parts) == limit:
            break
    return ", ".join(parts)


def facts(v: AlertView) -> list[tuple[str, str]]:
    """(label, value) pairs every chat format shows for one alert; values are cleaned, not escaped."""
    rows = [
        ("Severity", str(v.severity).upper()),
        ("Detector", clean(v.detector, 64)),
        ("Entity", clean(f"{v.entity_kind} {v.entity}", 200)),
        ("Window", _window(v)),
        ("Score", f"{v.score:.3g}"),
    ]
    if v.mitre:
        rows.append(("MITRE ATT&CK", clean(v.mitre, 32)))
    evidence = _evidence_line(v.evidence)
    if evidence:
        rows.append(("Evidence", clean(evidence, 300)))
    rows.append(("Alert id", v.alert_id))
    return rows


# Facts too long to sit side by side with others.
_WIDE_FACTS = ("Evidence", "Window")


def headline(views: Sequence[AlertView], digest: bool = False) -> str:
    if len(views) == 1 and not digest:
        v = views[0]
        return clean(f"{str(v.severity).upper()}: {v.title}", 300)
    counts = Counter(v.severity for v in views)
    by_severity = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, reverse=True))
    noun = "alert" if len(views) == 1 else "alerts"
    prefix = "Digest: " if digest else ""
    detectors = sorted({v.detector for v in views})
    about = f" from {detectors[0]}" if len(detectors) == 1 else f" from {len(detectors)} detectors"
    return clean(f"{prefix}{len(views)} {noun}{about} ({by_severity})", 300)


def _more(hidden: int) -> str:
    noun = "alert" if hidden == 1 else "alerts"
    return f"…and {hidden} more {noun} (see `mailwarden alerts`)"


def _footer(route: Route, now: datetime) -> str:
    return f"mailwarden · route {route.name} · {_utc(now):%Y-%m-%d %H:%M:%S} UTC"


def _json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def default_message_id(route: Route, views: Sequence[AlertView], now: datetime) -> str:
    ids = ",".join(sorted(v.alert_id for v in views))
    return "msg_" + hashlib.sha256(f"{route.name}|{ids}|{_utc(now).isoformat()}".encode()).hexdigest()[:32]


# ---- builders ----------------------------------------------------------------------------------
Builder = Callable[..., Prepared]
AlertsIn = Iterable[Alert | AlertView | Mapping[str, Any]]


def build_slack(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Incoming webhook with Block Kit: header (plain text, 150 chars), one section per alert with its
    facts as fields (at most 10, 2000 chars each), a context footer; `text` is the notification."""
    views = ordered(alerts)
    title = headline(views, digest)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": clean(title, 150), "emoji": True}}
    ]
    for v in views[:MAX_SHOWN]:
        fields = [{"type": "mrkdwn", "text": f"*{k}*\n{slack_escape(val)}"} for k, val in facts(v)][:10]
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"{_EMOJI[v.severity]} *{slack_escape(clean(v.title, 500))}*"},
                "fields": fields,
            }
        )
        blocks.append({"type": "divider"})
    if len(views) > MAX_SHOWN:
        more = slack_escape(_more(len(views) - MAX_SHOWN))
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": slack_escape(_footer(route, now))}]})
    payload = {"text": slack_escape(title), "blocks": blocks}
    return Prepared(route.url.get_secret_value(), dict(JSON_HEADERS), _json(payload))


def build_teams(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Workflows ("Post to a channel when a webhook request is received") expects a message whose
    attachment is an Adaptive Card; 1.4 is the highest version every Teams client renders."""
    views = ordered(alerts)
    top = views[0].severity if views else Severity.INFO
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": neutral(headline(views, digest)),
            "size": "Large",
            "weight": "Bolder",
            "wrap": True,
            "color": _TEAMS_COLOR[top],
        }
    ]
    for v in views[:MAX_SHOWN]:
        body.append(
            {
                "type": "Container",
                "separator": True,
                "items": [
                    {
                        "type": "TextBlock",
                        "text": neutral(clean(v.title, 400)),
                        "weight": "Bolder",
                        "wrap": True,
                        "color": _TEAMS_COLOR[v.severity],
                    },
                    {"type": "FactSet", "facts": [{"title": k, "value": neutral(val)} for k, val in facts(v)]},
                ],
            }
        )
    if len(views) > MAX_SHOWN:
        body.append({"type": "TextBlock", "text": neutral(_more(len(views) - MAX_SHOWN)), "wrap": True})
    body.append({"type": "TextBlock", "text": _footer(route, now), "isSubtle": True, "size": "Small", "wrap": True})
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": body,
    }
    payload = {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
        ],
    }
    return Prepared(route.url.get_secret_value(), dict(JSON_HEADERS), _json(payload))


def build_feishu(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Custom bot interactive card. Untrusted text goes only into plain_text elements, which render
    no markdown and no `<at id=all>` mention. With a signing key, `timestamp` (seconds) and `sign`
    ride in the body."""
    views = ordered(alerts)
    top = views[0].severity if views else Severity.INFO
    elements: list[dict[str, Any]] = []
    for i, v in enumerate(views[:MAX_SHOWN]):
        if i:
            elements.append({"tag": "hr"})
        elements.append(
            {
                "tag": "div",
                "text": {"tag": "plain_text", "content": clean(f"{str(v.severity).upper()}: {v.title}", 400)},
                "fields": [
                    {"is_short": k not in _WIDE_FACTS, "text": {"tag": "plain_text", "content": f"{k}: {val}"}}
                    for k, val in facts(v)
                ],
            }
        )
    if len(views) > MAX_SHOWN:
        elements.append({"tag": "div", "text": {"tag": "plain_text", "content": _more(len(views) - MAX_SHOWN)}})
    elements.append({"tag": "note", "elements": [{"tag": "plain_text", "content": _footer(route, now)}]})
    card = {
        "config": {"wide_screen_mode": True},
        "header": {
            "template": _FEISHU_TEMPLATE[top],
            "title": {"tag": "plain_text", "content": clean(headline(views, digest), 100)},
        },
        "elements": elements,
    }
    payload: dict[str, Any] = {}
    if route.secret is not None:
        ts = int(_utc(now).timestamp())
        payload = {"timestamp": str(ts), "sign": feishu_sign(route.secret.get_secret_value(), ts)}
    payload.update({"msg_type": "interactive", "card": card})
    return Prepared(route.url.get_secret_value(), dict(JSON_HEADERS), _json(payload))


def build_dingtalk(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Robot markdown message; with a signing key the URL gets `timestamp` (ms) and `sign`."""
    views = ordered(alerts)
    title = neutral(headline(views, digest))
    lines = [f"### {title}", ""]
    for v in views[:MAX_SHOWN]:
        lines += [f"**{str(v.severity).upper()}** · {neutral(clean(v.title, 400))}", ""]
        lines += [f"- {k}: {neutral(val)}" for k, val in facts(v)]
        lines.append("")
    if len(views) > MAX_SHOWN:
        lines += [neutral(_more(len(views) - MAX_SHOWN)), ""]
    lines.append(f"> {_footer(route, now)}")
    payload = {
        "msgtype": "markdown",
        # `title` is what the notification preview shows.
        "markdown": {"title": clean(title, 60), "text": "\n".join(lines)},
        "at": {"atMobiles": [], "isAtAll": False},
    }
    url = route.url.get_secret_value()
    if route.secret is not None:
        url = dingtalk_signed_url(url, route.secret.get_secret_value(), int(_utc(now).timestamp() * 1000))
    return Prepared(url, dict(JSON_HEADERS), _json(payload))


def _wecom_color(severity: Severity) -> str:
    # WeCom markdown knows three colours: warning (orange-red), info (green), comment (grey).
    return "warning" if severity >= Severity.MEDIUM else "comment"


def build_wecom(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Group robot markdown, packed alert by alert until the 4096-byte limit."""
    views = ordered(alerts)
    head = f"**{neutral(headline(views, digest))}**\n"
    foot = f"\n> <font color=\"comment\">{neutral(_footer(route, now))}</font>"
    chunks: list[str] = []
    for v in views[:MAX_SHOWN]:
        label = f"<font color=\"{_wecom_color(v.severity)}\">{str(v.severity).upper()}</font>"
        rows = [f"\n{label} {neutral(clean(v.title, 300))}"]
        rows += [f"> {k}: {neutral(val)}" for k, val in facts(v) if k != "Severity"]
        chunks.append("\n".join(rows) + "\n")
    content = _pack(head, chunks, foot, len(views), WECOM_MAX_BYTES)
    payload = {"msgtype": "markdown", "markdown": {"content": content}}
    return Prepared(route.url.get_secret_value(), dict(JSON_HEADERS), _json(payload))


def _pack(head: str, chunks: list[str], foot: str, total: int, max_bytes: int) -> str:
    """head + as many chunks as fit + "…and N more" + foot, within max_bytes of UTF-8."""
    size = lambda s: len(s.encode("utf-8"))  # noqa: E731 - local one-liner
    kept: list[str] = []
    for chunk in chunks:
        hidden = total - len(kept) - 1
        more = f"\n{neutral(_more(hidden))}\n" if hidden else ""
        if size(head + "".join(kept) + chunk + more + foot) > max_bytes:
            break
        kept.append(chunk)
    hidden = total - len(kept)
    more = f"\n{neutral(_more(hidden))}\n" if hidden else ""
    text = head + "".join(kept) + more + foot
    # Only a pathological head could still be too long; cut it on a character boundary.
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def build_discord(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Webhook with one embed per alert (at most 10 and 6000 characters in all); allowed_mentions
    parses nothing, so no text can ping @everyone or a role."""
    views = ordered(alerts)
    footer = _footer(route, now)
    embeds: list[dict[str, Any]] = []
    used = 0
    for v in views[:DISCORD_MAX_EMBEDS]:
        embed = {
            "title": clean(markdown_escape(clean(v.title, 240)), 256),
            "color": _RGB[v.severity],
            "fields": [
                {"name": k, "value": markdown_escape(val)[:1024] or "-", "inline": k not in _WIDE_FACTS}
                for k, val in facts(v)
            ],
            "timestamp": v.window_end.isoformat().replace("+00:00", "Z"),
            "footer": {"text": footer},
        }
        chars = len(embed["title"]) + len(footer) + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"])
        if used + chars > DISCORD_MAX_EMBED_CHARS:
            break
        used += chars
        embeds.append(embed)
    content = markdown_escape(headline(views, digest))
    if len(views) > len(embeds):
        content += "\n" + markdown_escape(_more(len(views) - len(embeds)))
    payload = {"username": "mailwarden", "content": content[:2000], "embeds": embeds, "allowed_mentions": {"parse": []}}
    return Prepared(route.url.get_secret_value(), dict(JSON_HEADERS), _json(payload))


def _rfc3339(value: datetime) -> str:
    return _utc(value).isoformat().replace("+00:00", "Z")


def _labels(v: AlertView) -> dict[str, str]:
    labels = {
        "alertname": v.detector,
        "detector": v.detector,
        "severity": str(v.severity),
        "entity_kind": v.entity_kind,
        "entity": v.entity,
        "source": "mailwarden",
    }
    if v.mitre:
        labels["mitre"] = v.mitre
    return labels


def _annotations(v: AlertView) -> dict[str, str]:
    return {
        "summary": v.title,
        "alert_id": v.alert_id,
        "score": repr(v.score),
        "window_start": _rfc3339(v.window_start),
        "window_end": _rfc3339(v.window_end),
        "evidence": json.dumps(v.evidence, sort_keys=True, default=str),
    }


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    first = maps[0]
    return {k: val for k, val in first.items() if all(m.get(k) == val for m in maps[1:])}


def build_generic(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Alertmanager's webhook v4 JSON, so existing receivers parse it; signed with Standard Webhooks
    headers when the route has a `whsec_` key. Machines read it, so no alert is left out."""
    views = ordered(alerts)
    entries = []
    for v in views:
        resolved = v.status == AlertStatus.RESOLVED.value
        entries.append(
            {
                "status": "resolved" if resolved else "firing",
                "labels": _labels(v),
                "annotations": _annotations(v),
                "startsAt": _rfc3339(v.window_start),
                "endsAt": _rfc3339(v.window_end) if resolved else ZERO_TIME,
                "generatorURL": "",
                "fingerprint": v.alert_id,
            }
        )
    common_labels = _common([e["labels"] for e in entries])
    group_fields = () if route.group_by == (EACH_ALERT,) else route.group_by
    group_labels = {k: common_labels[k] for k in group_fields if k in common_labels}
    group_key = "{}:{" + ",".join(f'{k}="{val}"' for k, val in sorted(group_labels.items())) + "}"
    payload = {
        "version": "4",
        "groupKey": f"mailwarden/{route.name}/{group_key}",
        "truncatedAlerts": 0,
        "status": "firing" if any(e["status"] == "firing" for e in entries) else "resolved",
        "receiver": route.name,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": _common([e["annotations"] for e in entries]),
        "externalURL": "",
        "alerts": entries,
    }
    body = _json(payload)
    msg_id = message_id or default_message_id(route, views, now)
    ts = int(_utc(now).timestamp())
    headers = dict(JSON_HEADERS)
    if route.secret is not None:
        headers.update(standard_webhooks_headers(route.secret.get_secret_value(), msg_id, ts, body))
    else:
        # Unsigned receivers still get the id, to drop a retry they already processed.
        headers.update({"webhook-id": msg_id, "webhook-timestamp": str(ts)})
    return Prepared(route.url.get_secret_value(), headers, body)


BUILDERS: dict[str, Builder] = {
    "slack": build_slack,
    "teams": build_teams,
    "feishu": build_feishu,
    "lark": build_feishu,
    "dingtalk": build_dingtalk,
    "wecom": build_wecom,
    "discord": build_discord,
    "generic": build_generic,
}


def build(
    alerts: AlertsIn, route: Route, now: datetime, *, digest: bool = False, message_id: str | None = None
) -> Prepared:
    """Dispatch on the route's platform."""
    return BUILDERS[route.platform](alerts, route, now, digest=digest, message_id=message_id)
