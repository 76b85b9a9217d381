"""Finished log files, plain or gzip: globbing in rotation order, identity, batched reading."""

from __future__ import annotations

import glob
import gzip
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from pipeline.schema import ConfigError
from pipeline.sources.lines import (
    CHUNK_BYTES,
    GZIP_MAGIC,
    Batcher,
    FileIdentity,
    LineBatch,
    LineSplitter,
    SourceError,
    make_identity,
    read_first_line,
)

log = logging.getLogger(__name__)

# access.log.3.gz, access.log.1, access.log-20240101.gz, access.log-2024-01-01-1700000000
_ROTATED = re.compile(
    r"^(?P<base>.+?)"
    r"(?:\.(?P<num>\d{1,6})|[.-](?P<date>\d{4}-?\d{2}-?\d{2}(?:[-_T]?[\d-]*)?))?"
    r"(?P<comp>\.(?:gz|bz2|xz|zst))?$"
)
_GZIP_ERRORS = (gzip.BadGzipFile, zlib.error)


def expand_paths(patterns: list[str]) -> list[str]:
    """Expand globs into files, oldest rotation first, so lines are ingested in time order.

    Numbered rotations go highest number first (`access.log.3.gz`, `.2.gz`, `.1`), dated ones
    (logrotate `dateext`) oldest date first, and the live file last. "-" (stdin) passes through.
    Raises ConfigError naming the first pattern that matches no file.
    """
    found: dict[str, None] = {}
    for pattern in patterns:
        if pattern == "-":
            found["-"] = None
            continue
        expanded = os.path.expanduser(pattern)
        matches = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not matches:
            if os.path.isdir(expanded):
                hint = f"{pattern.rstrip('/')}/*.log"
                raise ConfigError(f"{pattern!r} is a directory; give a file or a glob like {hint!r}")
            if os.path.exists(expanded):  # /dev/null, a named pipe, a socket: there, but no log file
                raise ConfigError(f"{pattern!r} is not a regular file; give a log file, or - for standard input")
            raise ConfigError(f"no file matches {pattern!r}")
        for m in matches:
            found.setdefault(m, None)
    return sorted(found, key=_rotation_key)


def _rotation_key(path: str) -> tuple:
    if path == "-":
        return (1,)  # after the files
    directory, name = os.path.split(path)
    m = _ROTATED.match(name)
    assert m is not None  # the pattern matches any non-empty name
    if m["num"] is not None:
        rank, order = 1, -int(m["num"])  # .1 is the newest rotation: bigger numbers first
    elif m["date"] is not None:
        rank, order = 0, 0  # dated rotations sort by the date text itself, below
    else:
        rank, order = 2, 0
    return (0, directory, m["base"], rank, order, m["date"] or "", name)


def identify(path: str | os.PathLike[str]) -> FileIdentity | None:
    """Identity of the file at `path`, or None while it is empty or its first line is unfinished."""
    try:
        with open(path, "rb", buffering=0) as f:
            return _identify_open(f, allow_partial=False)[0]
    except OSError as e:
        raise SourceError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None


class LenientGzip:
    """`read(n)` over a gzip stream (one or more members) that hands out everything that can be
    decompressed before raising EOFError for a stream cut short.

    GzipFile.read(n) raises EOFError for a truncated stream and drops whatever it had decompressed
    in that call: with the multi-megabyte reads used here, a truncated copy of a log read as empty.
    """

    def __init__(self, f: BinaryIO, raw_chunk: int = 1 << 20):
        self._f, self._raw_chunk = f, raw_chunk
        self._d = zlib.decompressobj(wbits=31)
        self._buf = bytearray()
        self._ended = False
        self._truncated = False

    def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._ended:
            raw = self._f.read(self._raw_chunk)
            if not raw:
                self._ended = True
                self._truncated = not self._d.eof
                return
            self._buf += self._d.decompress(raw)
            while self._d.eof and self._d.unused_data:
                rest = self._d.unused_data
                if not rest.strip(b"\0"):
                    break  # zero padding after the last member, as gzip(1) allows
                self._d = zlib.decompressobj(wbits=31)
                self._buf += self._d.decompress(rest)

    def read(self, n: int) -> bytes:
        self._fill(n)
        if not self._buf and self._truncated:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data


def _identify_open(f: BinaryIO, *, allow_partial: bool) -> tuple[FileIdentity | None, bool, bytes]:
    """Identify an open file from its start: (identity, is_gzip, probe). Moves the file position."""
    st = os.fstat(f.fileno())
    f.seek(0)
    is_gzip = f.read(2) == GZIP_MAGIC
    f.seek(0)
    if is_gzip:
        gz = LenientGzip(f)
        try:
            first = read_first_line(gz.read, allow_partial=allow_partial)
        except EOFError:
            first = None  # truncated gzip before the first line ended
        except _GZIP_ERRORS as e:
            raise SourceError(f"{f.name}: corrupt gzip: {e}") from None
    else:
        first = read_first_line(f.read, allow_partial=allow_partial)
    if first is None:
        return None, is_gzip, b""
    hasher, length, probe = first
    return make_identity(hasher, length, st.st_dev, st.st_ino), is_gzip, probe


def read_batches(
    path: str | os.PathLike[str],
    start_offset: int = 0,
    start_line: int = 1,
    batch_lines: int = 50_000,
    batch_bytes: int = CHUNK_BYTES,
    *,
    emit_partial: bool = True,
    quiet: bool = False,
) -> Iterator[LineBatch]:
    """Read a finished file (plain or gzip, told apart by magic bytes) from a checkpoint.

    `start_offset` is a byte offset in the decompressed stream, at a line start (a committed
    `end_offset`), and `start_line` the number of the line there. An unterminated last line is
    returned: the file is taken as finished (`emit_partial=False` holds it back instead, for a
    live file a writer may be in the middle of; the next read resumes at its start). A file
    truncated while being read ends the read with what was read so far. Reads `batch_bytes` at a
    time, so memory stays flat in file size.
    """
    name = os.fspath(path)
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise SourceError(f"cannot read {name}: {e.strerror or e}") from None
    with f:
        identity, is_gzip, _ = _identify_open(f, allow_partial=emit_partial)
        if identity is None:
            return  # empty, or (emit_partial=False) no complete line yet
        batcher = Batcher(
            identity, name, is_gzip=is_gzip, start_line=start_line,
            batch_lines=batch_lines, batch_bytes=batch_bytes,
        )
        if is_gzip:
            f.seek(0)
            yield from _read_gzip(f, name, batcher, start_offset, batch_bytes, quiet=quiet)
        else:
            f.seek(start_offset)
            splitter = LineSplitter(start_offset)
            yield from read_stream(f.read, batcher, splitter, batch_bytes, emit_partial=emit_partial)
            size = os.fstat(f.fileno()).st_size
            if size < start_offset:
                log.warning("%s: shorter (%d bytes) than its checkpoint (%d); nothing read", name, size, start_offset)
            elif size < splitter.consumed:
                log.warning("%s: truncated while being read; read up to byte %d", name, splitter.consumed)


def read_stream(
    read: Callable[[int], bytes], batcher: Batcher, splitter: LineSplitter, chunk: int, *, emit_partial: bool = True
) -> Iterator[LineBatch]:
    """Feed a stream through splitter and batcher to its end, then its unterminated tail."""
    while data := read(chunk):
        lines, offsets = splitter.feed(data)
        yield from batcher.add(lines, offsets, splitter.consumed)
    if emit_partial:
        lines, offsets = splitter.finish()
        yield from batcher.add(lines, offsets, splitter.consumed)
    yield from batcher.flush()


def _read_gzip(
    f: BinaryIO, name: str, batcher: Batcher, start_offset: int, chunk: int, *, quiet: bool = False
) -> Iterator[LineBatch]:
    gz = LenientGzip(f)
    splitter = LineSplitter(start_offset)
    try:
        # Resuming a gzip means decompressing and dropping what was already ingested.
        skipped = 0
        while skipped < start_offset:
            data = gz.read(min(chunk, start_offset - skipped))
            if not data:
                log.warning("%s: decompresses to %d bytes, less than its checkpoint (%d)", name, skipped, start_offset)
                return
            skipped += len(data)
        while data := gz.read(chunk):
            lines, offsets = splitter.feed(data)
            yield from batcher.add(lines, offsets, splitter.consumed)
    except EOFError:
        # Cut short (still being compressed, or a partial copy): keep the complete lines only,
        # the cut-off tail is not a line anyone wrote.
        if not quiet:  # (the format sniffer's look at the first lines says nothing: the read will)
            log.warning("%s: gzip stream ends early; read up to byte %d", name, splitter.consumed)
        yield from batcher.flush()
        return
    except _GZIP_ERRORS as e:
        yield from batcher.flush()
        raise SourceError(f"{name}: corrupt gzip after byte {splitter.consumed}: {e}") from None
    # A complete gzip member is a finished file, so its tail is always a line.
    lines, offsets = splitter.finish()
    yield from batcher.add(lines, offsets, splitter.consumed)
    yield from batcher.flush()


def read_prefix(path: str | os.PathLike[str], size: int) -> bytes:
    """The first `size` bytes of a file's (decompressed) content: tells a rotated copy from a stranger."""
    try:
        with open(path, "rb") as f:
            if f.read(2) == GZIP_MAGIC:
                f.seek(0)
                gz, out = LenientGzip(f), bytearray()
                try:
                    while len(out) < size and (data := gz.read(size - len(out))):
                        out += data
                except EOFError:
                    pass  # a truncated copy: its readable start still tells what it is
                return bytes(out)
            f.seek(0)
            return f.read(size)
    except (OSError, *_GZIP_ERRORS) as e:
        raise SourceError(f"cannot read {os.fspath(path)}: {e}") from None
