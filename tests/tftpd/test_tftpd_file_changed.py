"""A file that changes while it is sent ends the transfer with an ERROR, never a short last
block (`tftpd.blocks.FileHandle` with `expect`): the bytes a client gets are the file it asked
for, or it is told they are not.  The whole-transfer form, over the vfsroot mount and over a
plain tree, is tests/security/test_fault_source_edits.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tftpd.blocks import FileChanged, FileHandle
from tftpd.frames import Frames
from vfsroot.fileio import read_whole

SIZE = 100_000


def opened(path: Path) -> tuple[int, tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    return fd, (st.st_size, st.st_mtime_ns)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * (SIZE // 256) + b"x" * (SIZE % 256))
    return p


def _via_frames(h: FileHandle, size: int, offset: int) -> bytes:
    """``h.readinto_frames`` (the transfer's read: ``preadv`` into frame slots) as a read of
    ``size`` bytes.  Blocks of 10 bytes: thousands of iovecs, more than one ``preadv``
    takes (IOV_MAX), so the reads are split as well."""
    n = size // 10
    frames = Frames(10, n)
    got = h.readinto_frames(frames, n, offset)
    return b"".join(bytes(slot) for slot in frames.slots(n))[:got]


@pytest.fixture(params=["pread_exact", "readinto_frames"])
def read(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Both checked reads of FileHandle: the same rules."""
    if request.param == "pread_exact":
        return lambda h, size, offset: h.pread_exact(size, offset)
    return _via_frames


def test_unchanged_file_reads_to_its_end(path: Path, read) -> None:  # type: ignore[no-untyped-def]
    fd, expect = opened(path)
    h = FileHandle(fd, expect=expect)
    try:
        assert read(h, 60_000, 0) + read(h, 60_000, 60_000) == path.read_bytes()
        assert read(h, 10, SIZE) == b""
    finally:
        h.close()


def test_truncated_file_is_a_change_not_an_end(path: Path, read) -> None:  # type: ignore[no-untyped-def]
    fd, expect = opened(path)
    h = FileHandle(fd, expect=expect)
    try:
        assert len(read(h, 30_000, 0)) == 30_000
        os.truncate(path, 40_000)
        with pytest.raises(FileChanged, match="100000 bytes at open, ends at 40000 now"):
            read(h, 60_000, 30_000)
    finally:
        h.close()


def test_grown_file_is_a_change(path: Path, read) -> None:  # type: ignore[no-untyped-def]
    fd, expect = opened(path)
    h = FileHandle(fd, expect=expect)
    try:
        with open(path, "ab") as f:
            f.write(b"more")
        with pytest.raises(FileChanged, match="more now"):
            read(h, SIZE + 100, 0)
    finally:
        h.close()


def test_same_size_rewrite_is_seen_at_the_end(path: Path, read) -> None:  # type: ignore[no-untyped-def]
    fd, expect = opened(path)
    h = FileHandle(fd, expect=expect)
    try:
        os.utime(path, ns=(expect[1] + 10**9, expect[1] + 10**9))  # rewritten in place
        assert len(read(h, 1000, 0)) == 1000  # not at the end yet: no fstat per read
        with pytest.raises(FileChanged, match="modified since"):
            read(h, SIZE, 1000)
    finally:
        h.close()


def test_without_expect_nothing_is_checked(path: Path, read) -> None:  # type: ignore[no-untyped-def]
    fd, _ = opened(path)
    h = FileHandle(fd)
    try:
        os.truncate(path, 10)
        assert read(h, 100, 0) == path.read_bytes()
    finally:
        h.close()


def test_small_file_is_read_whole_at_its_size_at_open(path: Path) -> None:
    """The small-file read done with the open (one ``pread`` sized by the file) returns the
    file as it was at open, and None -- read it the checked way -- once it is not that size:
    never a shorter or longer file than the size the client may have been told (tsize)."""
    fd, (size, _mtime) = opened(path)
    try:
        data = read_whole(fd, size)
        assert data is not None
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
        with open(path, "ab") as f:
            f.write(b"more")
        assert read_whole(fd, size) is None  # grew
        os.truncate(path, size - 1)
        assert read_whole(fd, size) is None  # shrank
    finally:
        os.close(fd)
    empty = path.parent / "empty"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        assert read_whole(fd, 0) == b""
    finally:
        os.close(fd)
