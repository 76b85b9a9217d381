"""Line sources: files (plain, gzip, rotated), stdin and followed files, as batches of lines."""

from __future__ import annotations

from pipeline.sources.files import expand_paths, identify, read_batches, read_prefix
from pipeline.sources.follow import follow_batches
from pipeline.sources.lines import FileIdentity, LineBatch, SourceError
from pipeline.sources.stdin import STDIN_PATH, read_stdin_batches

__all__ = [
    "read_prefix",
    "STDIN_PATH",
    "FileIdentity",
    "LineBatch",
    "SourceError",
    "expand_paths",
    "follow_batches",
    "identify",
    "read_batches",
    "read_stdin_batches",
]
