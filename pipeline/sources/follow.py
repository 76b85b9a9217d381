"""Tail a live log file across rename and copytruncate rotation, resuming from checkpoints."""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from pipeline.sources.files import _GZIP_ERRORS, LenientGzip, _identify_open, _read_gzip, read_prefix
from pipeline.sources.lines import (
    CHUNK_BYTES,
    GZIP_MAGIC,
    Batcher,
    FileIdentity,
    LineBatch,
    LineSplitter,
    SourceError,
)

log = logging.getLogger(__name__)

Checkpoint = Callable[[FileIdentity], "tuple[int, int] | None"]


def follow_batches(
    path: str | os.PathLike[str],
    get_checkpoint: Checkpoint,
    stop: threading.Event,
    poll_interval: float = 0.25,
    batch_lines: int = 50_000,
    batch_bytes: int = CHUNK_BYTES,
    *,
    rotate_grace: float = 2.0,
) -> Iterator[LineBatch]:
    """Yield batches of complete lines as they are written to `path`, until `stop` is set.

    Whenever a file is opened, `get_checkpoint(identity)` gives the (offset, line number) to resume
    from, or None for the start. A line is handed on only once its terminator is written.

    Rotation: when another file appears at `path` (rename or delete-and-recreate), the old one is
    read to its end first, then switched from; it is still read for `rotate_grace` seconds after
    the switch, because a daemon writes to the old file until it reopens its log (nginx after
    USR1). When the file shrinks below the read position or its first bytes change (copytruncate),
    reading starts again at offset 0 of the new content. A missing file is waited for.
    """
    name = os.fspath(path)
    cur: _Tail | None = None
    draining: list[tuple[_Tail, float]] = []
    try:
        while not stop.is_set():
            if cur is None:
                cur = _Tail.open(name, batch_lines, batch_bytes)
            if cur is not None and cur.batcher is None:
                cur.try_identify(get_checkpoint)
            if cur is not None and cur.batcher is not None:
                # Checked before reading: after copytruncate, the bytes at our old offset belong to
                # the middle of some new line.
                if cur.rewritten():
                    # Lines written after our last read and before the truncate live on only in the
                    # copy logrotate made (app.log.1, app.log-20261204, …): read them there first.
                    yield from cur.read_rotated_copy(stop)
                    log.info("%s: truncated in place (copytruncate); reading it from the start", name)
                    cur.restart()
                    continue
                yield from cur.read_available(stop)
            for tail, deadline in list(draining):
                yield from tail.read_available(stop)
                if time.monotonic() >= deadline:
                    tail.close()
                    draining.remove((tail, deadline))
            if stop.is_set():
                break
            if cur is not None:
                at_path = _stat_or_none(name)
                if at_path is not None and (at_path.st_dev, at_path.st_ino) != cur.dev_ino:
                    # Another file now lives at the path: finish the old one, then switch.
                    if cur.batcher is not None:
                        yield from cur.read_available(stop)
                        draining.append((cur, time.monotonic() + rotate_grace))
                    else:
                        cur.close()
                    log.info("%s: rotated, following the new file", name)
                    cur = None
                    continue
            stop.wait(poll_interval)
    finally:
        if cur is not None:
            cur.close()
        for tail, _ in draining:
            tail.close()


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


class _Tail:
    """One open file being followed; `batcher` is None until its first line is complete."""

    def __init__(self, f: BinaryIO, path: str, batch_lines: int, batch_bytes: int):
        self.f, self.path = f, path
        st = os.fstat(f.fileno())
        self.dev_ino = (st.st_dev, st.st_ino)
        self.batch_lines, self.batch_bytes = batch_lines, batch_bytes
        self.batcher: Batcher | None = None
        self.splitter = LineSplitter(0)
        self.probe = b""
        self.is_gzip = False
        self.gzip_done = False
        # After a copytruncate the checkpoint of an unchanged identity points into old content.
        self.from_start = False

    @classmethod
    def open(cls, path: str, batch_lines: int, batch_bytes: int) -> _Tail | None:
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
        return cls(f, path, batch_lines, batch_bytes)

    def try_identify(self, get_checkpoint: Checkpoint) -> None:
        identity, self.is_gzip, self.probe = _identify_open(self.f, allow_partial=False)
        if identity is None:
            return
        checkpoint = None if self.from_start else get_checkpoint(identity)
        offset, line_no = checkpoint or (0, 1)
        if not self.is_gzip and offset > os.fstat(self.f.fileno()).st_size:
            log.warning("%s: shorter than its checkpoint (%d); reading it from the start", self.path, offset)
            offset, line_no = 0, 1
        self.f.seek(0 if self.is_gzip else offset)
        self.splitter = LineSplitter(offset)
        self.batcher = Batcher(
            identity, self.path, is_gzip=self.is_gzip, start_line=line_no,
            batch_lines=self.batch_lines, batch_bytes=self.batch_bytes,
        )

    def read_available(self, stop: threading.Event) -> Iterator[LineBatch]:
        """Hand on every complete line written so far (a gzip file: all of it, once)."""
        batcher = self.batcher
        if batcher is None:
            return
        if self.is_gzip:
            if not self.gzip_done:
                self.gzip_done = True
                yield from _read_gzip(self.f, self.path, batcher, self.splitter.consumed, self.batch_bytes)
            return
        splitter = self.splitter
        while not stop.is_set():
            data = self.f.read(self.batch_bytes)
            if not data:
                break
            lines, offsets = splitter.feed(data)
            yield from batcher.add(lines, offsets, splitter.consumed)
        yield from batcher.flush()

    def read_rotated_copy(self, stop: threading.Event) -> Iterator[LineBatch]:
        """The rest of the content we were reading, from the copy a copytruncate rotation made.

        The copy is the sibling (`<name>.*` or `<name>-*`, newest first) that starts with the same
        bytes and reaches at least as far as we read; its bytes past our position are the lines the
        truncate took from the live file. Same identity, same offsets: their ids are those the live
        file would have given them. A gzip copy is decompressed and skipped to our position.
        """
        batcher, position = self.batcher, self.f.tell()
        if batcher is None or self.is_gzip or not self.probe:
            return
        copy = _rotated_copy(self.path, self.probe, position)
        if copy is None:
            log.warning("%s: truncated in place and no rotated copy found: lines written just before "
                        "the truncate may be missing", self.path)
            return
        f, read, where = copy
        splitter = self.splitter
        try:
            while not stop.is_set() and (data := read(self.batch_bytes)):
                lines, offsets = splitter.feed(data)
                yield from batcher.add(lines, offsets, splitter.consumed)
        except (EOFError, *_GZIP_ERRORS):
            pass  # a damaged copy: what it gave is kept
        finally:
            f.close()
        # The copy is finished: an unterminated last line in it is a line.
        lines, offsets = splitter.finish()
        yield from batcher.add(lines, offsets, splitter.consumed)
        yield from batcher.flush()
        log.info("%s: read the rest of the truncated content from %s", self.path, where)

    def rewritten(self) -> bool:
        """Whether the file was truncated (and maybe refilled) under us since we read it."""
        if self.is_gzip:
            return False
        fd = self.f.fileno()
        position = self.f.tell()
        if os.fstat(fd).st_size < position:
            return True
        self.f.seek(0)
        start = self.f.read(len(self.probe))
        self.f.seek(position)
        return start != self.probe

    def restart(self) -> None:
        self.splitter.discard()
        self.batcher = None
        self.from_start = True

    def close(self) -> None:
        if self.splitter.pending_bytes and self.batcher is not None:
            # Not a line yet; the next open resumes at its start (the committed end_offset).
            log.debug("%s: closed with %d bytes of an unterminated line", self.path, self.splitter.pending_bytes)
        self.f.close()


def _rotated_copy(
    path: str, probe: bytes, position: int, tries: int = 6
) -> tuple[BinaryIO, Callable[[int], bytes], str] | None:
    """The newest sibling of `path` that starts with `probe` and holds at least `position` bytes:
    (the open file, a reader of its content from `position` on, its path)."""
    escaped = glob.escape(path)
    candidates = [c for c in set(glob.glob(escaped + ".*") + glob.glob(escaped + "-*")) if os.path.isfile(c)]
    candidates.sort(key=lambda c: os.stat(c).st_mtime, reverse=True)
    for candidate in candidates[:tries]:
        try:
            if read_prefix(candidate, len(probe)) != probe:
                continue
            f = open(candidate, "rb", buffering=0)
        except (OSError, SourceError):
            continue
        try:
            if f.read(2) != GZIP_MAGIC:
                if os.fstat(f.fileno()).st_size >= position:
                    f.seek(position)
                    return f, f.read, candidate
            else:
                # Decompress up to our position, as a resumed gzip read does.
                f.seek(0)
                gz, skipped = LenientGzip(f), 0
                while skipped < position and (more := gz.read(min(1 << 20, position - skipped))):
                    skipped += len(more)
                if skipped == position:
                    return f, gz.read, candidate
        except (OSError, EOFError, *_GZIP_ERRORS):
            pass
        f.close()
    return None
