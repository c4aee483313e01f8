"""vfsroot-tftpd's malloc policy: large buffers get an mmap of their own (glibc only).

Why a TFTP server needs one: its large buffers -- a read-ahead chunk of 256 KiB per transfer,
the buffer a chunk is joined into, a small file read into a buffer of read-ahead size and
shrunk to the file -- are allocated in worker threads and freed on the event loop, thousands
a minute.  glibc starts with blocks of 128 KiB and more mmapped one by one (freed, they go
back to the kernel), but its threshold is *dynamic*: the first such block freed raises it
above that block's size, and from then on these buffers come from malloc's arenas (the main
one and one per thread that asks, up to 8 per CPU).  There a small block still in use above a
freed large one keeps the large one's pages, and an arena is only ever shrunk from its top, so
freed buffers stay resident and the arenas' high-water marks creep up with the traffic.  In
the 30-minute soak (docs/reliability.md) vfsroot-tftpd's RSS rose ~1.5 MiB/min while no
Python object was left behind.

The fix: ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` once at start, before any thread or worker
process exists (forks inherit it).  Setting the threshold fixes it, which turns the dynamic
raise off: the large buffers stay mmapped, freed ones are unmapped at once, and the arenas
hold only small blocks.  Measured in 8-minute soaks (docs/reliability.md): with glibc's
defaults idle RSS +15.6 MiB and a climb of 1.1 MiB/min during the traffic; with the fixed
threshold +1.0 MiB and 0.1 MiB/min.  Capping the arenas (``M_ARENA_MAX=2``) or trimming them
every 10 s (``malloc_trim``) instead did not stop the climb during the traffic, and added to
the fixed threshold they changed nothing, so neither is done.

The cost is an ``mmap``/``munmap`` pair and the first-touch page faults per large buffer, i.e.
per read-ahead chunk (about 180 packets at blksize 1428), never per packet.

On another C library (musl) nothing is done: :func:`apply` returns False.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: mallopt parameter (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
#: glibc's own starting value: blocks of this size and more are mmapped, as at its start.
MMAP_THRESHOLD = 128 * 1024


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (``gnu_get_libc_version`` exists only there)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- the glibc test itself
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def apply(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``mmap_threshold`` bytes for this process and its future
    threads and forks; False (and nothing set) where the C library is not glibc or refuses."""
    libc = _glibc()
    if libc is None:
        log.info("malloc policy skipped: the C library is not glibc")
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        log.warning("malloc policy: glibc refused M_MMAP_THRESHOLD=%d", mmap_threshold)
        return False
    return True
