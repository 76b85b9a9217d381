"""Line sources: splitting, identity, gzip, resume, globbing, stdin and follow mode on real files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.schema import ConfigError, MailwardenError
from pipeline.sources.files import read_prefix
from pipeline.sources import (
    FileIdentity,
    LineBatch,
    SourceError,
    expand_paths,
    follow_batches,
    identify,
    read_batches,
    read_stdin_batches,
)


def reference_split(data: bytes, *, final: bool = True) -> list[tuple[int, str]]:
    """The obvious byte-by-byte splitter the fast one must agree with: (offset, decoded line)."""
    out = []
    start = i = 0
    while i < len(data):
        if data[i] in b"\r\n":
            end = i
            i += 2 if data[i : i + 2] == b"\r\n" else 1
            out.append((start, data[start:end].decode("utf-8", "backslashreplace")))
            start = i
        else:
            i += 1
    if final and start < len(data):
        out.append((start, data[start:].decode("utf-8", "backslashreplace")))
    return out


def flatten(batches: list[LineBatch]) -> list[tuple[int, str]]:
    return [(o, line) for b in batches for o, line in zip(b.offsets, b.lines, strict=True)]


def check_batches(batches: list[LineBatch], data: bytes, start_offset: int = 0, start_line: int = 1) -> None:
    """Batches are contiguous: each starts where the previous ended, line numbers count up."""
    expected_start, expected_line = start_offset, start_line
    for b in batches:
        assert b.lines, "no empty batches"
        assert len(b.lines) == len(b.offsets) == len(b.line_numbers)
        assert b.offsets[0] == expected_start
        assert b.line_numbers == list(range(expected_line, expected_line + len(b.lines)))
        assert b.end_offset > b.offsets[-1]
        expected_start, expected_line = b.end_offset, b.next_line_no
    if batches:
        assert batches[-1].end_offset == len(data)


MIXED_ENDINGS = {
    "lf": b"one\ntwo\nthree\n",
    "crlf": b"one\r\ntwo\r\nthree\r\n",
    "bare_cr": b"one\rtwo\rthree\r",
    "mixed": b"one\r\ntwo\nthree\rfour\r\n\r\nsix\n\rlast",
    "lf_and_crlf": b"a\r\nb\nc\r\n\nd\r\n",
    "crlf_non_ascii": "é\r\nü\r\n".encode() + b"\xff\r\nend\r\n",
    "blank_lines": b"\n\n\r\n\r\r\nx\n",
    "no_final_newline": b"alpha\nbeta",
    "invalid_utf8": b"ok \xc3\xa9\n\xff\xfe bad\n\xe2\x82\nhalf \xf0\x9f\x98\n\xed\xa0\x80 surrogate\n",
}


@pytest.mark.parametrize("name", sorted(MIXED_ENDINGS))
@pytest.mark.parametrize("batch_bytes", [1, 2, 3, 5, 64, 8 << 20])
def test_file_lines_match_reference_splitter(tmp_path: Path, name: str, batch_bytes: int) -> None:
    data = MIXED_ENDINGS[name]
    path = tmp_path / "x.log"
    path.write_bytes(data)
    batches = list(read_batches(path, batch_bytes=batch_bytes))
    assert flatten(batches) == reference_split(data)
    check_batches(batches, data)


def test_line_ending_kinds_are_not_part_of_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"a\r\nb\rc\nd")
    [batch] = read_batches(path)
    assert batch.lines == ["a", "b", "c", "d"]
    assert batch.offsets == [0, 3, 5, 7]


def test_invalid_utf8_becomes_backslash_escapes(tmp_path: Path) -> None:
    raw_lines = [b"caf\xc3\xa9", b"\xff\xfeGET /", b"cut \xe2\x82", b"\x80"]
    path = tmp_path / "x.log"
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    [batch] = read_batches(path)
    assert batch.lines == [r.decode("utf-8", "backslashreplace") for r in raw_lines]
    assert batch.lines[1].startswith("\\xff\\xfe")
    assert batch.offsets == [0, 6, 14, 21]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from([b"a", b"xyz", b"\r", b"\n", b"\r\n", b"\xc3\xa9", b"\xe2\x82", b"\xff", b"\xf0\x9f\x98\x80"]),
        max_size=40,
    ),
    chunk=st.integers(1, 12),
)
def test_stream_split_agrees_with_reference_at_any_chunk_size(pieces: list[bytes], chunk: int) -> None:
    data = b"".join(pieces)
    batches = list(read_stdin_batches(io.BytesIO(data), batch_lines=3, batch_bytes=chunk))
    assert flatten(batches) == reference_split(data)
    check_batches(batches, data)


@pytest.mark.parametrize("line_len", [40_000, 1 << 20, (8 << 20) + 12_345])
def test_long_lines_come_out_whole(tmp_path: Path, line_len: int) -> None:
    long_line = b"x" * (line_len - 1) + b"\xc3\xa9"  # a multi-byte char right at the end
    data = b"short\n" + long_line + b"\r\n" + long_line + b"\nafter\n"
    path = tmp_path / "x.log"
    path.write_bytes(data)
    batches = list(read_batches(path))
    text = long_line.decode()
    second = len(b"short\n") + len(long_line) + 2
    assert flatten(batches) == [(0, "short"), (6, text), (second, text), (second + len(long_line) + 1, "after")]
    assert len(text) == line_len
    check_batches(batches, data)


def test_long_lines_across_many_small_chunks(tmp_path: Path) -> None:
    data = b"".join(bytes([65 + i]) * (40_000 + i) + b"\n" for i in range(5))
    path = tmp_path / "x.log"
    path.write_bytes(data)
    batches = list(read_batches(path, batch_bytes=4096))
    assert flatten(batches) == reference_split(data)
    check_batches(batches, data)


def test_batches_respect_line_and_byte_limits(tmp_path: Path) -> None:
    data = b"".join(f"line {i:04d}\n".encode() for i in range(1000))
    path = tmp_path / "x.log"
    path.write_bytes(data)
    by_lines = list(read_batches(path, batch_lines=300))
    assert [len(b) for b in by_lines] == [300, 300, 300, 100]
    by_bytes = list(read_batches(path, batch_bytes=1100))
    assert max(b.end_offset - b.offsets[0] for b in by_bytes) <= 1100 + len(b"line 0000\n")
    for batches in (by_lines, by_bytes):
        assert flatten(batches) == reference_split(data)
        check_batches(batches, data)


# --- identity ---------------------------------------------------------------------------------

LONG_FIRST = b'203.0.113.9 - - [30/Nov/2026:14:03:11 +0000] "POST /v3/mail/send HTTP/1.1" 202 512\n'


def test_identity_is_the_first_line_hash(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(LONG_FIRST + b"second\n")
    ident = identify(path)
    assert ident is not None
    digest = hashlib.sha256(LONG_FIRST).hexdigest()
    assert ident.first_line_hash == digest
    assert ident.key == digest[:32]
    st_ = path.stat()
    assert (ident.dev, ident.inode) == (st_.st_dev, st_.st_ino)


def test_identity_survives_rename_and_copy_for_long_first_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(LONG_FIRST + b"second\n")
    before = identify(path)
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    copy = tmp_path / "copy.log"
    shutil.copy(rotated, copy)
    assert identify(rotated) == before
    assert identify(copy).key == before.key
    assert identify(copy).inode != before.inode


def test_short_first_lines_mix_in_the_inode(tmp_path: Path) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_bytes(b"#Version: 1.0\nfoo\n")
    b.write_bytes(b"#Version: 1.0\nbar\n")
    ia, ib = identify(a), identify(b)
    assert ia.first_line_hash == ib.first_line_hash
    assert ia.key != ib.key
    a.rename(tmp_path / "a.log.1")
    assert identify(tmp_path / "a.log.1") == ia


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_identity_includes_the_terminator_of_the_first_line(tmp_path: Path, terminator: bytes) -> None:
    first = LONG_FIRST.rstrip(b"\n") + terminator
    path = tmp_path / "x.log"
    path.write_bytes(first + b"second" + terminator)
    assert identify(path).first_line_hash == hashlib.sha256(first).hexdigest()
    [batch] = read_batches(path)
    assert batch.identity == identify(path)
    assert batch.offsets == [0, len(first)]


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("length", [(64 << 10) - 1, 64 << 10, 200_000])
def test_identity_of_a_first_line_longer_than_a_read(tmp_path: Path, terminator: bytes, length: int) -> None:
    # (64 << 10) - 1 puts the CR of a CRLF exactly at the end of the first 64 KiB read.
    first = b"y" * length + terminator
    for name, content in [("plain", first + b"z\n"), ("gz", gzip.compress(first + b"z\n"))]:
        path = tmp_path / name
        path.write_bytes(content)
        assert identify(path).key == hashlib.sha256(first).hexdigest()[:32]


@pytest.mark.parametrize("content", [b"", b"no newline yet", b"ends in cr\r"])
def test_no_identity_without_a_complete_first_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(content)
    assert identify(path) is None


def test_empty_file_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.touch()
    assert identify(path) is None
    assert list(read_batches(path)) == []


def test_one_shot_reads_an_unterminated_only_line(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"only line")
    [batch] = read_batches(path)
    assert batch.lines == ["only line"]
    assert batch.end_offset == 9
    assert list(read_batches(path, emit_partial=False)) == []


def test_emit_partial_false_holds_back_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"first\nsecond\nthird, being writ")
    batches = list(read_batches(path, emit_partial=False))
    assert [line for b in batches for line in b.lines] == ["first", "second"]
    assert batches[-1].end_offset == len(b"first\nsecond\n")


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope.log"):
        identify(tmp_path / "nope.log")
    with pytest.raises(SourceError, match="nope.log"):
        list(read_batches(tmp_path / "nope.log"))
    assert issubclass(SourceError, MailwardenError)


# --- gzip and resume --------------------------------------------------------------------------


def write_log(path: Path, n: int, *, first: bytes = LONG_FIRST) -> bytes:
    data = first + b"".join(f"line {i} é\r\n".encode() for i in range(n))
    path.write_bytes(data)
    return data


def test_gzip_reads_like_plain(tmp_path: Path) -> None:
    plain = tmp_path / "access.log.1"
    data = write_log(plain, 500)
    gz = tmp_path / "access.log.2"  # no .gz suffix: detected by magic bytes
    gz.write_bytes(gzip.compress(data))
    plain_batches = list(read_batches(plain, batch_bytes=1000))
    gz_batches = list(read_batches(gz, batch_bytes=1000))
    assert flatten(gz_batches) == flatten(plain_batches) == reference_split(data)
    assert identify(gz).key == identify(plain).key == gz_batches[0].identity.key
    assert all(b.is_gzip for b in gz_batches) and not any(b.is_gzip for b in plain_batches)
    check_batches(gz_batches, data)


def test_multi_member_gzip(tmp_path: Path) -> None:
    data = LONG_FIRST + b"a\nb\nc\n"
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(data[:50]) + gzip.compress(data[50:]))
    assert flatten(list(read_batches(path))) == reference_split(data)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_resume_from_every_checkpoint_gives_exactly_the_rest(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / "x.log"
    data = write_log(path, 200)
    if compress:
        path.write_bytes(gzip.compress(data))
    full = flatten(list(read_batches(path)))
    batches = list(read_batches(path, batch_bytes=333))
    assert len(batches) > 5
    for b in batches:
        rest = list(read_batches(path, start_offset=b.end_offset, start_line=b.next_line_no, batch_bytes=500))
        expected = [item for item in full if item[0] >= b.end_offset]
        assert flatten(rest) == expected
        if rest:
            check_batches(rest, data, b.end_offset, b.next_line_no)
        assert all(r.identity == b.identity for r in rest)


def test_resume_past_the_end_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    data = write_log(path, 3)
    assert list(read_batches(path, start_offset=len(data) + 100)) == []
    path.write_bytes(gzip.compress(data))
    assert list(read_batches(path, start_offset=len(data) + 100)) == []


@pytest.mark.parametrize("batch_bytes", [4096, None], ids=["small-reads", "default-reads"])
def test_truncated_gzip_keeps_complete_lines(tmp_path: Path, batch_bytes: int | None) -> None:
    # With reads larger than the whole file (the default), GzipFile.read used to raise EOFError
    # and drop everything it had decompressed: a truncated copy then read as empty.
    data = LONG_FIRST + b"".join(f"{i:06d} {os.urandom(8).hex()}\n".encode() for i in range(20_000))
    compressed = gzip.compress(data)
    path = tmp_path / "x.log.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    got = flatten(list(read_batches(path, **({"batch_bytes": batch_bytes} if batch_bytes else {}))))
    assert 5_000 < len(got) < 20_001
    assert got == reference_split(data)[: len(got)]
    assert identify(path) is not None
    assert read_prefix(path, 100) == data[:100]


def test_corrupt_gzip_is_a_source_error(tmp_path: Path) -> None:
    compressed = bytearray(gzip.compress(LONG_FIRST * 2000))
    compressed[len(compressed) // 2 : len(compressed) // 2 + 64] = b"\x00" * 64
    path = tmp_path / "x.log.gz"
    path.write_bytes(bytes(compressed))
    with pytest.raises(SourceError, match="corrupt gzip"):
        list(read_batches(path))


def test_file_truncated_while_read_reports_what_was_read(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    data = write_log(path, 2000)
    full = reference_split(data)
    it = read_batches(path, batch_bytes=1024)
    got = flatten([next(it)])
    with open(path, "r+b") as f:
        f.truncate(100)
    got += flatten(list(it))
    assert 0 < len(got) <= len(full)
    assert got[:-1] == full[: len(got) - 1]
    # The last item may be the cut-off line the file now ends with.
    assert full[len(got) - 1][1].startswith(got[-1][1])


# --- globbing ---------------------------------------------------------------------------------


def test_expand_paths_orders_rotations_oldest_first(tmp_path: Path) -> None:
    names = ["access.log", "access.log.1", "access.log.2.gz", "access.log.10.gz", "access.log.3.gz", "error.log",
             "error.log.1"]
    for n in names:
        (tmp_path / n).write_bytes(b"x\n")
    got = expand_paths([str(tmp_path / "access.log*"), str(tmp_path / "error.log*")])
    assert [Path(p).name for p in got] == [
        "access.log.10.gz", "access.log.3.gz", "access.log.2.gz", "access.log.1", "access.log",
        "error.log.1", "error.log",
    ]


def test_expand_paths_orders_dated_rotations_by_date(tmp_path: Path) -> None:
    for n in ["mail.log", "mail.log-20260102.gz", "mail.log-20251231.gz", "mail.log-20260101"]:
        (tmp_path / n).write_bytes(b"x\n")
    got = expand_paths([str(tmp_path / "mail.log*")])
    assert [Path(p).name for p in got] == ["mail.log-20251231.gz", "mail.log-20260101", "mail.log-20260102.gz",
                                           "mail.log"]


def test_expand_paths_deduplicates_and_passes_stdin(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"x\n")
    got = expand_paths([str(tmp_path / "a.log"), str(tmp_path / "*.log"), "-"])
    assert got == [str(tmp_path / "a.log"), "-"]


def test_expand_paths_names_the_pattern_that_matches_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"x\n")
    with pytest.raises(ConfigError, match=r"nothing-\*\.log"):
        expand_paths([str(tmp_path / "a.log"), str(tmp_path / "nothing-*.log")])
    with pytest.raises(ConfigError, match="directory"):
        expand_paths([str(tmp_path)])


# --- stdin ------------------------------------------------------------------------------------


def test_stdin_identity_is_the_same_for_the_same_input() -> None:
    data = LONG_FIRST + b"b\nc\n"
    first = list(read_stdin_batches(io.BytesIO(data)))
    again = list(read_stdin_batches(io.BytesIO(data), batch_bytes=7))
    assert first[0].identity == again[0].identity
    assert flatten(first) == flatten(again) == reference_split(data)
    assert first[0].path == "-"
    assert first[0].identity.key == hashlib.sha256(LONG_FIRST).hexdigest()[:32]
    other = list(read_stdin_batches(io.BytesIO(b"other " + data)))
    assert other[0].identity.key != first[0].identity.key


def test_stdin_short_first_line_identity_is_stable() -> None:
    a = list(read_stdin_batches(io.BytesIO(b"hi\nthere\n")))
    b = list(read_stdin_batches(io.BytesIO(b"hi\nthere\n")))
    assert a[0].identity == b[0].identity


def test_stdin_gzip_and_empty() -> None:
    data = LONG_FIRST + b"x\ny"
    batches = list(read_stdin_batches(io.BytesIO(gzip.compress(data)), batch_bytes=16))
    assert flatten(batches) == reference_split(data)
    assert batches[0].is_gzip
    assert batches[0].identity.key == list(read_stdin_batches(io.BytesIO(data)))[0].identity.key
    assert list(read_stdin_batches(io.BytesIO(b""))) == []


def test_stdin_pipe_hands_on_lines_when_the_writer_pauses() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb", buffering=0) as writer:
        writer.write(LONG_FIRST + b"second\n")
        it = read_stdin_batches(reader)
        got: list[LineBatch] = []
        t = threading.Thread(target=lambda: got.append(next(it)))
        t.start()
        t.join(2)
        # The writer is still open: a full batch would never come, the pause hands lines on.
        assert not t.is_alive()
        assert got[0].lines == [LONG_FIRST.decode().rstrip("\n"), "second"]


# --- follow -----------------------------------------------------------------------------------


class Follower:
    """Runs follow_batches in a real thread, committing checkpoints the way the ingest job does."""

    def __init__(self, path: Path, checkpoints: dict[str, tuple[int, int]] | None = None, **kw) -> None:
        self.stop = threading.Event()
        self.batches: list[LineBatch] = []
        self.checkpoints = dict(checkpoints or {})
        self.opened: list[FileIdentity] = []
        self.error: BaseException | None = None
        kw.setdefault("poll_interval", 0.02)

        def get_checkpoint(identity: FileIdentity) -> tuple[int, int] | None:
            self.opened.append(identity)
            return self.checkpoints.get(identity.key)

        def run() -> None:
            try:
                for b in follow_batches(path, get_checkpoint, self.stop, **kw):
                    self.checkpoints[b.identity.key] = (b.end_offset, b.next_line_no)
                    self.batches.append(b)
            except BaseException as e:  # surfaced in close()
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def lines(self) -> list[str]:
        return [line for b in list(self.batches) for line in b.lines]

    def wait_for(self, n: int, timeout: float = 2.5) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < n and time.monotonic() < deadline and self.error is None:
            time.sleep(0.01)
        return self.lines()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        assert not self.thread.is_alive(), "follow_batches did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def follower():
    made: list[Follower] = []

    def make(path: Path, **kw) -> Follower:
        f = Follower(path, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_follow_appended_lines_arrive(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST)
    f = follower(path)
    assert len(f.wait_for(1)) == 1
    append(path, b"two\n")
    append(path, b"three\r\n")
    assert f.wait_for(3)[1:] == ["two", "three"]
    offsets = [o for b in f.batches for o in b.offsets]
    assert offsets == [o for o, _ in reference_split(path.read_bytes())]
    assert [n for b in f.batches for n in b.line_numbers] == [1, 2, 3]


def test_follow_partial_line_waits_for_its_newline(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST + b"half a li")
    f = follower(path)
    assert len(f.wait_for(1)) == 1
    time.sleep(0.15)
    assert len(f.lines()) == 1
    append(path, b"ne\n")
    assert f.wait_for(2)[1] == "half a line"
    append(path, b"cr then lf\r")
    time.sleep(0.15)
    assert len(f.lines()) == 2
    append(path, b"\nnext\n")
    assert f.wait_for(4)[2:] == ["cr then lf", "next"]


def test_follow_waits_for_the_file_and_its_first_line(tmp_path: Path, follower) -> None:
    path = tmp_path / "later.log"
    f = follower(path)
    time.sleep(0.1)
    path.write_bytes(LONG_FIRST[:20])
    time.sleep(0.1)
    assert f.lines() == []
    append(path, LONG_FIRST[20:] + b"two\n")
    assert f.wait_for(2) == [LONG_FIRST.decode().rstrip("\n"), "two"]


def test_follow_resumes_from_the_checkpoint(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log"
    data = write_log(path, 10)
    done = list(read_batches(path, batch_lines=4))[0]
    f = follower(path, checkpoints={done.identity.key: (done.end_offset, done.next_line_no)})
    got = f.wait_for(7)
    assert got == [line for _, line in reference_split(data)][4:]
    assert f.batches[0].line_numbers[0] == 5
    assert f.opened[0] == done.identity


def test_follow_rename_rotation_loses_and_duplicates_nothing(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST + b"old 1\nold 2\n")
    f = follower(path)
    assert len(f.wait_for(3)) == 3
    append(path, b"old 3\n")
    path.rename(tmp_path / "app.log.1")
    append(tmp_path / "app.log.1", b"old 4 written after the rename\n")
    new_first = LONG_FIRST.replace(b"14:03:11", b"15:00:00")
    path.write_bytes(new_first + b"new 1\n")
    assert len(f.wait_for(7)) == 7
    # The daemon has not reopened its log yet: still writing to the renamed file.
    append(tmp_path / "app.log.1", b"old 5 written late\n")
    append(path, b"new 2\n")
    got = f.wait_for(9)
    old_lines = [line for _, line in reference_split((tmp_path / "app.log.1").read_bytes())]
    new_lines = [line for _, line in reference_split(path.read_bytes())]
    assert Counter(got) == Counter(old_lines + new_lines)
    by_file: dict[str, list[str]] = {}
    for b in f.batches:
        by_file.setdefault(b.identity.key, []).extend(b.lines)
    assert list(by_file.values()) == [old_lines, new_lines]
    # The old file was drained before the new one was read.
    assert got.index("old 4 written after the rename") < got.index("new 1")


def test_follow_copytruncate_starts_over_on_the_new_content(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST + b"old 1\nold 2\n")
    f = follower(path)
    assert len(f.wait_for(3)) == 3
    shutil.copy(path, tmp_path / "app.log.1")
    with open(path, "r+b") as fh:
        fh.truncate(0)
    time.sleep(0.1)
    new_first = LONG_FIRST.replace(b"14:03:11", b"15:00:00")
    append(path, new_first + b"new 1\n")
    got = f.wait_for(5)
    assert got[3:] == [new_first.decode().rstrip("\n"), "new 1"]
    [restarted] = [b for b in f.batches if b.identity.first_line_hash == hashlib.sha256(new_first).hexdigest()]
    assert (restarted.offsets[0], restarted.line_numbers[0]) == (0, 1)
    time.sleep(0.1)
    assert len(f.lines()) == 5


@pytest.mark.parametrize("copy_name, compress", [("app.log.1", False), ("app.log-20261204", False),
                                                 ("app.log.1.gz", True)])
def test_follow_copytruncate_reads_the_lines_written_just_before_it_from_the_copy(
    tmp_path: Path, follower, copy_name: str, compress: bool
) -> None:
    """Found by a fresh-user trial: lines written after the follower's last read and before the
    truncate were only in the copy, and were lost."""
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST + b"old 1\n")
    f = follower(path, poll_interval=0.5)
    assert len(f.wait_for(2)) == 2
    # Within one poll interval: more lines, then logrotate's copy and truncate, then new lines.
    append(path, b"old 2 just before the rotation\nold 3 too\n")
    content = path.read_bytes()
    (tmp_path / copy_name).write_bytes(gzip.compress(content) if compress else content)
    (tmp_path / "app.log.2").write_bytes(b"an older, unrelated rotation\n" * 3)
    with open(path, "r+b") as fh:
        fh.truncate(0)
    new_first = LONG_FIRST.replace(b"14:03:11", b"15:00:00")
    append(path, new_first + b"new 1\n")
    got = f.wait_for(6)
    assert got == [LONG_FIRST.decode().rstrip("\n"), "old 1", "old 2 just before the rotation", "old 3 too",
                   new_first.decode().rstrip("\n"), "new 1"]
    # The copy's lines keep the identity and offsets of the file they were written to.
    old_batches = [b for b in f.batches if b.identity == f.batches[0].identity]
    assert [o for b in old_batches for o in b.offsets] == [o for o, _ in reference_split(content)]
    time.sleep(0.6)
    assert len(f.lines()) == 6


def test_follow_notices_truncation_even_when_refilled_past_the_old_offset(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST + b"old\n")
    f = follower(path, poll_interval=0.3)
    assert len(f.wait_for(2)) == 2
    # Truncate and refill past the old size within one poll interval.
    new_data = LONG_FIRST.replace(b"14:03:11", b"16:30:00") + b"".join(b"new %d\n" % i for i in range(20))
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(new_data)
    got = f.wait_for(23)
    assert got[2:] == [line for _, line in reference_split(new_data)]


def test_follow_delete_and_recreate(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST + b"a\n")
    f = follower(path, rotate_grace=0.1)
    assert len(f.wait_for(2)) == 2
    path.unlink()
    time.sleep(0.1)
    path.write_bytes(b"short\nb\n")
    assert f.wait_for(4)[2:] == ["short", "b"]


def test_follow_reads_a_gzip_once(tmp_path: Path, follower) -> None:
    path = tmp_path / "app.log.1"
    data = write_log(path, 30)
    path.write_bytes(gzip.compress(data))
    f = follower(path)
    assert f.wait_for(31) == [line for _, line in reference_split(data)]
    time.sleep(0.1)
    assert len(f.lines()) == 31
    assert all(b.is_gzip for b in f.batches)


def test_follow_stops_promptly(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(LONG_FIRST)
    stop = threading.Event()
    got: list[LineBatch] = []
    t = threading.Thread(target=lambda: got.extend(follow_batches(path, lambda _: None, stop, poll_interval=5.0)))
    t.start()
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    stop.set()
    t.join(2)
    assert not t.is_alive()
    assert time.monotonic() - started < 1.0
    assert [b.lines for b in got] == [[LONG_FIRST.decode().rstrip("\n")]]
