"""Lines piped in on standard input, identified by their first line so re-feeding is idempotent."""

from __future__ import annotations

import gzip
import io
import select
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from pipeline.sources.lines import (
    CHUNK_BYTES,
    GZIP_MAGIC,
    Batcher,
    LineBatch,
    LineSplitter,
    SourceError,
    make_identity,
    read_first_line,
)

STDIN_PATH = "-"


def read_stdin_batches(
    stream: BinaryIO | None = None,
    batch_lines: int = 50_000,
    batch_bytes: int = CHUNK_BYTES,
) -> Iterator[LineBatch]:
    """Read a byte stream (default: stdin) to its end, plain or gzip (by magic bytes).

    The identity comes from the first line with dev and inode 0, so feeding the same input twice
    gives the same identity and offsets, hence the same event ids. When the stream is a pipe that
    goes quiet (`tail -f | mailwarden ingest -`), the lines read so far are handed on instead of
    waiting for a full batch.
    """
    if stream is None:
        stream = sys.stdin.buffer
    # Read until the first line is complete (or the stream ends): the identity is needed before
    # the first batch.
    read = _read_some(stream)
    head = [read(batch_bytes)]
    while head[-1] and not _first_line_done(head):
        head.append(read(batch_bytes))
    prefix = b"".join(head)
    if not prefix:
        return
    is_gzip = prefix.startswith(GZIP_MAGIC)
    ended = not head[-1]
    if is_gzip:
        gz = gzip.GzipFile(fileobj=_Prefixed(prefix, stream), mode="rb")
        read, prefix, ended = _gzip_read(gz), b"", False
        quiet: Callable[[], bool] = lambda: False  # the decompressor buffers: fd readiness says nothing
        first = _gzip_first_line(gz)
        gz = gzip.GzipFile(fileobj=_Prefixed(_Prefixed.replay, stream), mode="rb")  # placeholder
    else:
        quiet = _quiet_check(stream)
        first = read_first_line(io.BytesIO(prefix).read, allow_partial=ended)
        if first is None:  # pragma: no cover - the loop above reads until the line is complete
            return
    hasher, length, _ = first
    identity = make_identity(hasher, length, 0, 0)
    batcher = Batcher(
        identity, STDIN_PATH, is_gzip=is_gzip, start_line=1,
        batch_lines=batch_lines, batch_bytes=batch_bytes,
    )
    splitter = LineSplitter(0)
    data = prefix
    while True:
        if data:
            lines, offsets = splitter.feed(data)
            yield from batcher.add(lines, offsets, splitter.consumed)
        if ended:
            break
        if quiet():
            yield from batcher.flush()
        data = read(batch_bytes)
        ended = not data
    lines, offsets = splitter.finish()
    yield from batcher.add(lines, offsets, splitter.consumed)
    yield from batcher.flush()
