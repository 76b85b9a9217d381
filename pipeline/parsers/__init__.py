"""Log formats: one module per format, and PARSERS, the registry `auto` sniffs through."""

from __future__ import annotations

from pipeline.parsers.base import ParseContext, ParsedBatch, Parser

PARSERS: dict[str, type[Parser]] = {}


def register(cls: type[Parser]) -> type[Parser]:
    PARSERS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Imported for their @register side effect; kept in one place so the registry is complete.
    from pipeline.parsers import combined, jsonl, smtp_auth  # noqa: F401


__all__ = ["PARSERS", "ParseContext", "ParsedBatch", "Parser", "register"]
