"""Opening a request's file on the event loop, when nothing in the open can wait.

Every open could go to the helper process (tftpd/opener.py), because an open can block: the
FUSE tree waits on a disk, an NFS server may be gone.  But many trees a TFTP server serves
are plain directories on a local disk or in memory, and there the open of a file whose name
the kernel already knows takes microseconds.  For a small file, the hop to the helper (a
message each way, two processes woken) cost more than the rest of the request: on the 1 KiB
request path (8 clients, two workers) skipping it took server CPU from 312 to 228 µs per
request and raised requests/s by a fifth (docs/tftpd.md).

So before asking the helper, a session tries :meth:`InlineOpener.open`, which takes only
steps the kernel promises not to wait in:

1. the client's directory is opened ``O_PATH`` with ``RESOLVE_CACHED``: names are looked up
   in the kernel's dentry cache only (EAGAIN rather than asking a filesystem), and an
   ``O_PATH`` open calls no filesystem code;
2. that directory's mount must be a local filesystem (:mod:`tftpd.mounts`: tmpfs or a disk
   filesystem; never FUSE, NFS, CIFS, overlay or an unknown type), asked of the VFS alone;
3. the name is resolved from that directory, ``O_PATH``, with ``RESOLVE_BENEATH |
   RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS | RESOLVE_CACHED``: the kernel refuses any
   resolution that leaves the client's directory (``..``, an absolute symlink, one
   pointing outside) or its mount, so the file is on the filesystem step 2 checked, and
   inside the directory by construction.  Only a regular file goes on: it is opened for
   reading through that ``O_PATH`` descriptor (/proc/self/fd), so no device's driver is
   ever opened here;
4. a file of at most ``small`` bytes, and at most the helper's ``WHOLE_MAX`` (128 KiB: the
   copy stays a few microseconds of the event loop's time), is read whole with
   ``RWF_NOWAIT`` (EAGAIN unless its pages are cached); on a memory filesystem, which
   refuses that flag, with a plain read, which has no device to wait for.  A file not read
   whole here is handed on open, and the transfer's read-ahead reads it in worker threads
   like any large file.

What this does not cover, and ``--no-inline-open`` is for: a filesystem that makes an open
or a cached read wait all the same -- an access-time update that waits for the journal, a
tmpfs page swapped out, an fanotify permission listener (a file-access policy daemon), a
filesystem's once-per-mount work on the first open.  Those waits are rare and short on a
boot server's local tree; an operator who has one of them switches the inline open off.

One answer besides a file is given here: a name that does not exist (ENOENT, ENOTDIR) is
refused as "file not found", with the helper's own words (:func:`tftpd.roots.open_refusal`).
Under ``RESOLVE_CACHED`` that answer comes from a negative dentry on a local filesystem,
which is authoritative, and firmware probes many missing names per boot (PXELINUX: the
client's MAC and every prefix of its hex IP before ``default``).  Anything else -- any other
error, a directory or special file, a symlink leaving the directory, a name not in the
cache, a FUSE mount -- returns None, and the helper opens the file as always and gives the
client its refusal or error.  So this path serves only regular files that the helper would
serve too, and refuses only names the helper would find missing; what a client may read is
decided in one place (:meth:`ClientRoots.open`).
"""

from __future__ import annotations

import errno
import os
import stat

from .mounts import MEMORY, MountTable
from .openat2 import (
    AT_FDCWD,
    RESOLVE_BENEATH,
    RESOLVE_CACHED,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_XDEV,
    Openat2,
)
from .opener_process import WHOLE_MAX
from .roots import ClientRoots, Opened, OpenedFile, OpenRefused, open_refusal

#: How a request's name is resolved from the client's directory (step 3).
CONFINED = RESOLVE_BENEATH | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS | RESOLVE_CACHED

#: Errors of the file's open that are the answer (the name is missing), not a reason to ask
#: the helper.
_MISSING = (errno.ENOENT, errno.ENOTDIR)

_DIRECTORY_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
#: The request's name is resolved to an O_PATH descriptor (no filesystem or driver code runs).
_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
#: A regular file found so is then opened for reading (no O_NONBLOCK: it is never a FIFO).
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY


class InlineOpener:
    """Opens what can be opened without waiting (see the module); one per worker process,
    used on its event loop only (its buffers are not shared between threads).

    Raises OSError at construction where the kernel lacks what it relies on (``openat2``
    with ``RESOLVE_CACHED``: Linux 5.12; ``name_to_handle_at``; /proc): then every open goes
    to the helper."""

    def __init__(self, roots: ClientRoots, mounts: MountTable | None = None) -> None:
        self._roots = roots
        self._openat2 = Openat2()
        # Probe: ENOSYS before Linux 5.6, EINVAL for RESOLVE_CACHED before 5.12.
        os.close(self._openat2(AT_FDCWD, "/", _DIRECTORY_FLAGS, RESOLVE_CACHED))
        self._mounts = mounts if mounts is not None else MountTable()
        #: Files opened here, and missing names refused here (the rest went to the helper).
        self.opened = 0
        self.refused = 0

    def close(self) -> None:
        self._mounts.close()

    def open(self, client: str, relpath: str, small: int) -> Opened | None:
        """``relpath`` (normalised, tftpd/paths.py) for ``client``, and its bytes when it is
        at most ``small`` bytes long (and ``WHOLE_MAX``, as in the helper) and cached; None:
        ask the helper.  Raises
        :class:`OpenRefused` ("file not found") for a name the kernel knows is missing."""
        try:
            base = self._roots.directory_text(client)
        except OpenRefused:
            return None
        try:
            dir_fd = self._openat2(AT_FDCWD, base, _DIRECTORY_FLAGS, RESOLVE_CACHED)
        except OSError:
            return None
        try:
            found = self._open_regular(dir_fd, relpath)
        finally:
            os.close(dir_fd)
        if found is None:
            return None
        fd, st, kind = found
        try:
            whole = (_read_cached(fd, st.st_size, kind == MEMORY)
                     if st.st_size <= min(small, WHOLE_MAX) else None)
        except OSError:
            os.close(fd)
            return None
        path = f"{base}/{relpath}"
        self.opened += 1
        if whole is not None:
            os.close(fd)
            return OpenedFile(fd=-1, size=st.st_size, path=path, mtime_ns=st.st_mtime_ns), whole
        return OpenedFile(fd=fd, size=st.st_size, path=path, mtime_ns=st.st_mtime_ns), None

    def _open_regular(self, dir_fd: int, relpath: str) -> tuple[int, os.stat_result, str] | None:
        """Steps 2 and 3 of the module: (descriptor open for reading, its stat, the mount's
        kind) for a regular file below ``dir_fd`` on a local mount; None: ask the helper.

        The name is resolved to an ``O_PATH`` descriptor first, and only a regular file is
        opened for reading, through that descriptor (/proc/self/fd: the same inode, no name
        resolved again): opening a device node would run its driver's open on the event loop,
        and a block device's may wait on I/O."""
        try:  # apart from the open below: no error of this one means "file not found"
            kind = self._mounts.kind_of(dir_fd)
        except OSError:
            return None
        if kind is None:
            return None
        try:
            path_fd = self._openat2(dir_fd, relpath, _PATH_FLAGS, CONFINED)
        except OSError as exc:
            if exc.errno in _MISSING:
                self.refused += 1
                raise open_refusal(exc) from None
            return None
        try:
            st = os.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            return os.open(f"/proc/self/fd/{path_fd}", _FILE_FLAGS), st, kind
        except OSError:
            return None
        finally:
            os.close(path_fd)


def _read_cached(fd: int, size: int, memory: bool) -> bytes | None:
    """The file's ``size`` bytes if they can be read without waiting for a device, else None
    (then the transfer reads it in a worker thread).  One byte more is asked for, to see a
    file that grew since the ``fstat``; a short or long read is left to the careful path."""
    buf = bytearray(size + 1)
    try:
        n = os.preadv(fd, [buf], 0, 0 if memory else os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
            return None  # not cached, or this filesystem cannot say: read it in a thread
        raise
    return bytes(memoryview(buf)[:n]) if n == size else None
