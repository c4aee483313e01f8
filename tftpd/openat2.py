"""``openat2(2)``, which Python 3.11 has no binding for: an open whose path resolution the
caller restricts (``RESOLVE_*``).  Used by the inline open (tftpd/inline_open.py), which
opens only what resolves in the kernel's caches and below the client's directory, and by
:meth:`tftpd.roots.ClientRoots.open`, which asks it where the kernel cannot name a file.
"""

from __future__ import annotations

import ctypes
import errno
import os

#: openat2(2)'s number: the same on every architecture (one table for new system calls).
_SYS_OPENAT2 = 437
AT_FDCWD = -100
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE_CACHED = 0x20


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class Openat2:
    """``openat2(dirfd, path, flags, resolve)`` -> descriptor, raising OSError like
    ``os.open``.  Its argument block is reused from call to call: one instance per thread."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._how = _OpenHow(0, 0, 0)
        self._size = ctypes.sizeof(_OpenHow)

    def __call__(self, dirfd: int, path: str, flags: int, resolve: int) -> int:
        raw = os.fsencode(path)
        if b"\0" in raw:  # C would stop at it, opening a shorter name (os.open refuses too)
            raise OSError(errno.EINVAL, "embedded NUL in path")
        how = self._how
        how.flags = flags
        how.resolve = resolve
        fd = self._syscall(_SYS_OPENAT2, dirfd, raw, ctypes.byref(how), self._size)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(fd)
