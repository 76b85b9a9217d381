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
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise SourceError("standard input is closed: nothing to read from '-'")
        stream = sys.stdin.buffer
    raw_read = _read_some(stream)
    start = raw_read(batch_bytes)
    while 0 < len(start) < len(GZIP_MAGIC) and (more := raw_read(batch_bytes)):
        start += more
    if not start:
        return
    is_gzip = start.startswith(GZIP_MAGIC)
    cut_short = False
    if is_gzip:
        gz = gzip.GzipFile(fileobj=_Prefixed(start, raw_read), mode="rb")

        def read(n: int) -> bytes:
            nonlocal cut_short
            try:
                return gz.read1(n)
            except EOFError:
                cut_short = True  # a truncated stream: its cut-off tail is not a line
                return b""
            except (gzip.BadGzipFile, zlib.error) as e:
                raise SourceError(f"{STDIN_PATH}: corrupt gzip: {e}") from None

        # The decompressor buffers, so the pipe's readiness says nothing about pending lines.
        quiet: Callable[[], bool] = lambda: False
        head: list[bytes] = []
    else:
        read = raw_read
        quiet = _quiet_check(stream)
        head = [start]

    # The identity is needed before the first batch: read until the first line is complete.
    ended = False
    while not _first_line_done(head):
        more = read(batch_bytes)
        if not more:
            ended = True
            break
        head.append(more)
    data = b"".join(head)
    if not data:
        return
    first = read_first_line(io.BytesIO(data).read, allow_partial=True)
    assert first is not None  # data is non-empty and allow_partial accepts any bytes
    hasher, length, _ = first
    batcher = Batcher(
        make_identity(hasher, length, 0, 0), STDIN_PATH, is_gzip=is_gzip, start_line=1,
        batch_lines=batch_lines, batch_bytes=batch_bytes,
    )
    splitter = LineSplitter(0)
    while True:
        lines, offsets = splitter.feed(data)
        yield from batcher.add(lines, offsets, splitter.consumed)
        if ended:
            break
        if quiet():
            yield from batcher.flush()
        data = read(batch_bytes)
        ended = not data
    if not cut_short:
        lines, offsets = splitter.finish()
        yield from batcher.add(lines, offsets, splitter.consumed)
    yield from batcher.flush()


def _first_line_done(pieces: list[bytes]) -> bool:
    """Whether the bytes so far hold a complete first line (a last CR waits for a possible LF)."""
    for i, piece in enumerate(pieces):
        if b"\n" in piece or b"\r" in piece[:-1]:
            return True
        if piece.endswith(b"\r") and any(pieces[i + 1 :]):
            return True
    return False


def _read_some(stream: BinaryIO) -> Callable[[int], bytes]:
    # read1 returns what the pipe has instead of blocking until n bytes arrived.
    read1 = getattr(stream, "read1", None)
    return read1 if read1 is not None else stream.read


def _quiet_check(stream: BinaryIO) -> Callable[[], bool]:
    """A function telling whether reading now would block (never, for in-memory streams)."""
    try:
        fd = stream.fileno()
        select.select([fd], [], [], 0)
    except (OSError, ValueError, io.UnsupportedOperation):
        return lambda: False
    return lambda: not select.select([fd], [], [], 0)[0]


class _Prefixed:
    """A read-only file object replaying bytes already taken from a stream, then the stream."""

    def __init__(self, prefix: bytes, read: Callable[[int], bytes]):
        self._prefix, self._read = prefix, read

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            if n is None or n < 0:
                n = len(self._prefix)
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self._read(n if n is not None and n >= 0 else CHUNK_BYTES)
