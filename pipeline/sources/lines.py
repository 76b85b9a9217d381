"""Bytes to lines: the identity of a log file, the batch type, and the byte-exact line splitter."""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add

from pipeline.schema import MailwardenError

#: Bytes read per system call. Big reads keep the per-line cost in C (split, decode, accumulate).
CHUNK_BYTES = 8 << 20
GZIP_MAGIC = b"\x1f\x8b"

# Below this length a first line ("#Version: 1.0") is too likely to be shared by unrelated files
# to identify one, so the inode is mixed in.
_SHORT_FIRST_LINE = 32
# How many leading bytes of the first line follow mode re-reads to notice copytruncate rotation.
PROBE_BYTES = 256

_TERM_B = re.compile(rb"\r\n|\r|\n")
_TERM_S = re.compile(r"\r\n|\r|\n")


class SourceError(MailwardenError):
    """A log source cannot be read (missing, unreadable, corrupt gzip); says which one."""


@dataclass(frozen=True)
class FileIdentity:
    """Content identity of a log file: survives renames and gzip, so checkpoints follow rotation."""

    key: str
    dev: int
    inode: int
    first_line_hash: str


@dataclass
class LineBatch:
    """Consecutive complete lines of one source, with where each starts and where to resume."""

    identity: FileIdentity
    path: str
    lines: list[str]
    offsets: list[int]
    end_offset: int
    line_numbers: list[int]
    is_gzip: bool

    @property
    def next_line_no(self) -> int:
        """Line number of the first line after this batch: commit it with `end_offset`."""
        return self.line_numbers[-1] + 1 if self.line_numbers else 1

    def __len__(self) -> int:
        return len(self.lines)


def make_identity(line_hasher: hashlib._Hash, line_len: int, dev: int, inode: int) -> FileIdentity:
    """Build the identity from a sha256 already fed with the first line (terminator included)."""
    first_line_hash = line_hasher.hexdigest()
    if line_len >= _SHORT_FIRST_LINE:
        key = first_line_hash[:32]
    else:
        mixed = line_hasher.copy()
        mixed.update(f"\0{dev}:{inode}".encode())
        key = mixed.hexdigest()[:32]
    return FileIdentity(key=key, dev=dev, inode=inode, first_line_hash=first_line_hash)


def read_first_line(
    read: Callable[[int], bytes], *, allow_partial: bool, block: int = 64 << 10
) -> tuple[hashlib._Hash, int, bytes] | None:
    """Hash the stream's first line, terminator included, reading forward with `read`.

    Returns (sha256 of the line, its length, its first PROBE_BYTES bytes), or None when the stream
    holds no complete first line (unless `allow_partial`, for finished files: then whatever bytes
    there are count as the line). A trailing CR counts as complete only with `allow_partial`,
    since a writer may be between the CR and the LF of a CRLF. Memory stays flat for huge lines.
    """
    hasher = hashlib.sha256()
    length = 0
    probe = b""
    pending_cr = False  # the last block ended in CR: CR or CRLF, decided by the next byte
    while True:
        data = read(block)
        if not data:
            return (hasher, length, probe) if length and allow_partial else None
        if pending_cr:
            if data[:1] == b"\n":
                hasher.update(b"\n")
                length += 1
                probe = (probe + b"\n")[:PROBE_BYTES]
            return hasher, length, probe
        m = _TERM_B.search(data)
        pending_cr = m is not None and m.group() == b"\r" and m.end() == len(data)
        if m is not None:
            data = data[: m.end()]
        hasher.update(data)
        length += len(data)
        if len(probe) < PROBE_BYTES:
            probe += data[: PROBE_BYTES - len(probe)]
        if m is not None and not pending_cr:
            return hasher, length, probe


class LineSplitter:
    """Cuts a byte stream into lines ending in LF, CRLF or a bare CR, keeping byte offsets exact.

    `feed` returns only lines whose terminator has arrived; `finish` also returns the unterminated
    tail (for streams known to be complete). Decoding is per chunk with `backslashreplace`: CPython's
    UTF-8 decoder never folds an ASCII byte into an invalid sequence, so a chunk decodes to exactly
    the concatenation of its lines decoded one by one, and splitting the text matches splitting the
    bytes. The bulk of a chunk is decoded through a memoryview, so it is never copied.
    """

    __slots__ = ("_carry", "_carry_len", "consumed")

    def __init__(self, offset: int = 0):
        # Offset in the stream just past the last complete line returned (= start of the carry).
        self.consumed = offset
        self._carry: list[bytes] = []
        self._carry_len = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held back, waiting for its terminator."""
        return self._carry_len

    def feed(self, data: bytes) -> tuple[list[str], list[int]]:
        if not data:
            return [], []
        head_lines: list[str] = []
        head_offsets: list[int] = []
        start = 0
        if self._carry:
            # Finish the line carried over from the previous chunk on its own, small buffer.
            if self._carry[-1].endswith(b"\r"):
                # The held CR was a bare CR unless this chunk begins with its LF.
                start = 1 if data.startswith(b"\n") else 0
            else:
                start = _first_terminator_end(data)
                if start < 0:
                    # A line longer than a chunk: keep its pieces and join once, so it costs O(n).
                    self._carry.append(data)
                    self._carry_len += len(data)
                    return [], []
                if start == 0:
                    # Only a CR at the very end: it may be the first half of CRLF.
                    self._carry.append(data)
                    self._carry_len += len(data)
                    return [], []
            self._carry.append(data[:start])
            head = b"".join(self._carry)
            self._carry, self._carry_len = [], 0
            head_lines, head_offsets = self._split(head, b"\r" in head)
        # A CR at the very end may be the first half of CRLF: hold it until the next byte.
        cut = max(data.rfind(b"\n", start), data.rfind(b"\r", start, len(data) - 1)) + 1
        if cut <= start:
            tail = data[start:] if start else data
        else:
            tail = data[cut:]
            region = data if start == 0 and cut == len(data) else memoryview(data)[start:cut]
            lines, offsets = self._split(region, data.find(b"\r", start, cut) >= 0)
            if head_lines:
                lines[:0] = head_lines
                offsets[:0] = head_offsets
            head_lines, head_offsets = lines, offsets
        if tail:
            self._carry, self._carry_len = [tail], len(tail)
        return head_lines, head_offsets

    def finish(self) -> tuple[list[str], list[int]]:
        """Return the held-back tail as a last line: the stream is known to be complete."""
        if not self._carry:
            return [], []
        buf = b"".join(self._carry)
        self._carry, self._carry_len = [], 0
        return self._split(buf, b"\r" in buf)

    def discard(self) -> None:
        """Forget the held-back tail (the file it came from was truncated under us)."""
        self._carry, self._carry_len = [], 0

    def _split(self, buf: bytes | memoryview, has_cr: bool) -> tuple[list[str], list[int]]:
        """Split `buf`: complete lines, plus an unterminated tail only when called from `finish`."""
        base = self.consumed
        nbytes = len(buf)
        self.consumed = base + nbytes
        text = str(buf, "utf-8", "backslashreplace")
        sep, strip_cr = "\n", False
        if has_cr:
            # CR and LF are the same in text and bytes (escapes are ASCII letters and digits), so
            # counting on the text tells the kind of line ends.
            lines = text.split("\r\n")
            n_crlf = len(lines) - 1
            if text.count("\r") != n_crlf:
                return _split_bare_cr(bytes(buf), text, base)
            if text.count("\n") == n_crlf:
                sep = "\r\n"  # all CRLF (Windows): split in C
            else:
                strip_cr = True  # a mix of LF and CRLF
                lines = text.split("\n")
        else:
            lines = text.split("\n")
        # O(1) test: any non-ASCII byte gives a non-ASCII char or a 4-char escape.
        if text.isascii() and len(text) == nbytes:
            lengths = map(len, lines)
        else:
            pieces = bytes(buf).split(sep.encode())
            if len(pieces) != len(lines):  # pragma: no cover - guards the decoder claim above
                lines = [p.decode("utf-8", "backslashreplace") for p in pieces]
            lengths = map(len, pieces)
        offsets = list(accumulate(map(add, lengths, repeat(len(sep))), initial=base))
        # split() leaves one more piece than separators: "" after a final one, else the open tail;
        # accumulate() leaves one more offset than pieces.
        offsets.pop()
        if not lines[-1]:
            lines.pop()
            offsets.pop()
        if strip_cr:
            lines = [s[:-1] if s.endswith("\r") else s for s in lines]
        return lines, offsets


def _first_terminator_end(data: bytes) -> int:
    """Index just past the first line terminator in `data`; -1 if none; 0 if only a final CR."""
    lf = data.find(b"\n")
    cr = data.find(b"\r", 0, lf if lf >= 0 else len(data))
    if cr < 0:
        return lf + 1 if lf >= 0 else -1
    if cr + 1 == len(data):
        return 0
    return cr + 2 if data[cr + 1] == 0x0A else cr + 1


def _split_bare_cr(buf: bytes, text: str, base: int) -> tuple[list[str], list[int]]:
    # Rare (old Mac files, progress output): a regex split, with a Python loop for offsets.
    pieces = _TERM_B.split(buf)
    terms = _TERM_B.findall(buf)
    lines = _TERM_S.split(text)
    if len(lines) != len(pieces):  # pragma: no cover - guards the decoder claim above
        lines = [p.decode("utf-8", "backslashreplace") for p in pieces]
    offsets = []
    pos = base
    for piece, term in zip(pieces, terms):
        offsets.append(pos)
        pos += len(piece) + len(term)
    if pieces[-1]:
        offsets.append(pos)
    else:
        lines.pop()
    return lines, offsets


class Batcher:
    """Collects split lines into LineBatches bounded by line count and bytes."""

    def __init__(
        self,
        identity: FileIdentity,
        path: str,
        *,
        is_gzip: bool,
        start_line: int,
        batch_lines: int,
        batch_bytes: int,
    ):
        if batch_lines < 1 or batch_bytes < 1:
            raise ValueError("batch_lines and batch_bytes must be positive")
        self.identity, self.path, self.is_gzip = identity, path, is_gzip
        self.next_line = start_line
        self.batch_lines, self.batch_bytes = batch_lines, batch_bytes
        self._lines: list[str] = []
        self._offsets: list[int] = []
        self._end = 0

    def add(self, lines: list[str], offsets: list[int], end: int) -> Iterator[LineBatch]:
        """Queue lines (ending at stream offset `end`); yield every batch that is full.

        A batch is full at `batch_lines` lines or `batch_bytes` bytes, and never holds more
        unless one line alone is longer.
        """
        if not lines:
            return
        self._lines.extend(lines)
        self._offsets.extend(offsets)
        self._end = end
        while self._lines:
            n = min(len(self._lines), self.batch_lines)
            limit = self._offsets[0] + self.batch_bytes
            end_n = self._offsets[n] if n < len(self._lines) else self._end
            if end_n > limit:
                # Line i ends where line i+1 starts: keep the lines that end within the limit.
                n = max(1, bisect_right(self._offsets, limit, 1, n) - 1)
            elif end_n < limit and n < self.batch_lines:
                break
            yield self._take(n)

    def flush(self) -> Iterator[LineBatch]:
        if self._lines:
            yield self._take(len(self._lines))

    def _take(self, n: int) -> LineBatch:
        lines, offsets = self._lines[:n], self._offsets[:n]
        end = self._offsets[n] if n < len(self._offsets) else self._end
        del self._lines[:n], self._offsets[:n]
        first = self.next_line
        self.next_line = first + n
        return LineBatch(
            identity=self.identity,
            path=self.path,
            lines=lines,
            offsets=offsets,
            end_offset=end,
            line_numbers=list(range(first, first + n)),
            is_gzip=self.is_gzip,
        )
