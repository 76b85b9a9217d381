"""`auto`: pick the format of a file from its first lines, by asking every parser to sniff them."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.parsers import PARSERS, _load_builtin

# Below this share of recognised sample lines we do not trust a guess; the whole file is then
# quarantined as "unrecognised format" rather than parsed into nonsense.
MIN_SHARE = 0.2


def sniff_format(sample: Sequence[str]) -> tuple[str | None, float]:
    """(parser name, share of sample lines it recognises); name is None when nothing fits."""
    _load_builtin()
    lines = [line for line in sample if line.strip()]
    if not lines:
        return None, 0.0
    scores = {name: cls.sniff(lines) for name, cls in PARSERS.items()}
    best = max(scores, key=lambda name: scores[name])
    if scores[best] < MIN_SHARE:
        return None, scores[best]
    return best, scores[best]
