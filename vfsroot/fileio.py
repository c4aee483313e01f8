"""Reads of an exact length: the one home of the "loop until the length or end of file" rule.

A single ``pread`` may return fewer bytes than asked for in the middle of a file: FUSE trees,
network filesystems and libguestfs' message size cap all do it.  Every reader in both daemons
(local layers, tftpd block reads, the guestfs worker) goes through :func:`read_exact` -- or,
reading into buffers it already has (tftpd's DATA frames), :func:`preadv_exact` -- so that a
short read is retried in one place and end of file is the only thing that ends one early.
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: Iovecs per ``preadv`` (Linux's IOV_MAX).
IOV_MAX = 1024


def read_exact(pread: Callable[[int, int], bytes], size: int, offset: int,
               chunk: int | None = None) -> bytes:
    """``size`` bytes from ``offset`` through ``pread(count, offset)``, fewer only at end of
    file (an empty answer).  ``chunk`` caps each call (libguestfs refuses large messages)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        want = size - got if chunk is None else min(chunk, size - got)
        data = pread(want, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """:func:`read_exact` over a file descriptor."""
    return read_exact(lambda n, o: os.pread(fd, n, o), size, offset)


def read_whole(fd: int, size: int) -> bytes | None:
    """The whole file of ``size`` bytes (its size at open) from a descriptor nobody else
    uses yet, or None if it is not ``size`` bytes long any more (tftpd then reads it the
    normal way, which checks every read against the size at open).

    One ``pread`` of ``size + 1`` bytes is the common case: the extra byte tells a file
    that grew.  The buffer is sized by the file, not by a read-ahead: a 256 KiB buffer for a
    1 KiB config is a large allocation (``mmap``, a page fault, ``munmap``) per request,
    twice with the read that confirms end of file.
    """
    data = os.pread(fd, size + 1, 0)
    if len(data) < size:  # a short read mid-file (FUSE): finish it the careful way
        data += pread_exact(fd, size + 1 - len(data), len(data))
    return data if len(data) == size else None


def preadv_exact(fd: int, slots: list[memoryview], offset: int) -> int:
    """Fill ``slots`` from ``fd`` at ``offset`` in order, as far as the file goes; returns the
    bytes read.  Fewer than the slots hold only at end of file: a short ``preadv`` mid-file
    (FUSE, network filesystems) is continued, as :func:`read_exact` does."""
    total = 0
    want = sum(len(s) for s in slots)
    iov = slots
    while True:
        got = os.preadv(fd, iov[:IOV_MAX], offset + total)  # EINTR: retried by Python
        total += got
        if got == 0 or total >= want:
            return total
        # Drop the slots filled, and the filled head of the one the read stopped in.
        rest: list[memoryview] = []
        skip = got
        for s in iov:
            if skip >= len(s):
                skip -= len(s)
                continue
            rest.append(s[skip:] if skip else s)
            skip = 0
        iov = rest
