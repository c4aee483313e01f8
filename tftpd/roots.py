"""Client IP -> the directory that client is served from, and the one safe way to open a file.

Per-client mode serves ``<root>/<client-ip>/<path>``: with ``--root /run/vfsroot`` every IP is
that client's merged view.  ``--flat`` serves ``<root>/<path>`` to everybody, like a classic
tftpd.  The client IP is normalised first (an IPv4 client on a dual-stack socket arrives as
``::ffff:a.b.c.d``; an IPv6 link-local peer carries a ``%scope``) so the directory name is the
same dotted quad or compressed IPv6 form the FUSE tree uses.

:func:`ClientRoots.open` runs in the opener helper or a worker thread (the FUSE tree can block
on a disk) and decides what a client may read: it refuses directories and anything whose real
location is outside the client's directory (a symlink to another client's tree).  The one
other place a request path meets the filesystem, the inline open (tftpd/inline_open.py),
serves only files this would serve and refuses only names this finds missing, with the same
words (:func:`open_refusal`).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .openat2 import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, Openat2


class OpenRefused(Exception):
    """The file cannot be served.  ``code`` is the TFTP error code, ``str(exc)`` the message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@functools.lru_cache(maxsize=4096)
def normalise_ip(host: str) -> str:
    """Return the canonical text form of a peer address (v4-mapped -> dotted quad, no scope).

    Cached: a boot server sees the same few hundred addresses over and over, and parsing one
    costs more than the rest of a request's bookkeeping."""
    bare = host.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@functools.lru_cache(maxsize=4096)
def _client_directory(root: str, client_ip: str) -> str:
    """``<root>/<client ip>`` as text (cached like :func:`normalise_ip`)."""
    name = normalise_ip(client_ip)
    if not name or "/" in name or name in (".", ".."):
        # normalise_ip only passes through what ipaddress rejected; never build a path from
        # something that is not an address.
        raise OpenRefused(2, "client address cannot name a directory")
    return os.path.join(root, name)


#: The refusal for each errno an open of a request's name can fail with.
_REFUSALS = {
    errno.ENOENT: (1, "file not found"),
    errno.ENOTDIR: (1, "file not found"),
    errno.EISDIR: (2, "is a directory, not a file"),
    errno.EACCES: (2, "permission denied"),
    errno.EPERM: (2, "permission denied"),
    errno.ENAMETOOLONG: (2, "invalid file name"),
    errno.ELOOP: (2, "invalid file name"),
}


def open_refusal(exc: OSError) -> OpenRefused:
    """What the client is told when the open of its file failed with ``exc``: 1 for a
    missing file (clients probe many names), 2 for what it may not read, 0 with the
    system's words otherwise.  Shared by :meth:`ClientRoots.open` and the inline open
    (tftpd/inline_open.py), so a refusal reads the same whichever opened it."""
    code, message = _REFUSALS.get(exc.errno or 0, (0, ""))
    return OpenRefused(code, message or f"cannot open file: {os.strerror(exc.errno or 0)}")


@dataclass(frozen=True)
class OpenedFile:
    """An open regular file: the descriptor (owned by the caller) and its size at open time."""

    fd: int
    size: int
    path: str
    #: st_mtime_ns at open: with the size, what tells that the file changed during a
    #: transfer (`tftpd.blocks.FileHandle`)
    mtime_ns: int = 0


#: What an open delivers, by the helper (tftpd/opener.py) or inline (tftpd/inline_open.py):
#: the file (its descriptor -1 when read whole) and its bytes if small.
Opened = tuple[OpenedFile, bytes | None]


@dataclass(frozen=True)
class ClientRoots:
    """Maps a client to its directory.  Immutable: shared by every session without locks."""

    root: Path
    flat: bool = False
    follow_outside_symlinks: bool = False

    def directory_for(self, client_ip: str) -> Path:
        """The directory ``client_ip`` is served from (it need not exist)."""
        return Path(self.directory_text(client_ip))

    @functools.cached_property
    def _root_text(self) -> str:
        return os.fspath(self.root)

    def directory_text(self, client_ip: str) -> str:
        """:meth:`directory_for` as text, the form every request uses (a ``Path`` built and
        turned back into text per request cost more than the inside-check's system calls)."""
        if self.flat:
            return self._root_text
        return _client_directory(self._root_text, client_ip)

    def path_of(self, client_ip: str, relpath: str) -> str:
        """The path :meth:`open` opens for ``client_ip`` and ``relpath`` (normalised)."""
        return f"{self.directory_text(client_ip)}/{relpath}"

    def open(self, client_ip: str, relpath: str) -> OpenedFile:
        """Open ``relpath`` (already normalised by :mod:`tftpd.paths`) for ``client_ip``.

        Blocking: call it in a worker thread (:func:`tftpd.offload.run_sync`).  Raises
        OpenRefused with the TFTP error code to send: 1 for a missing file (clients probe many
        names), 2 for everything the client may not read.
        """
        base = self.directory_text(client_ip)
        full = f"{base}/{relpath}"  # relpath: relative, normalised (tftpd/paths.py)
        try:
            # O_NONBLOCK: opening a FIFO read-only would otherwise wait for a writer forever.
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise open_refusal(exc) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise OpenRefused(2, "is a directory, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise OpenRefused(2, "not a regular file")
            if not self.follow_outside_symlinks:
                self._check_inside(base, relpath, fd)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return OpenedFile(fd=fd, size=st.st_size, path=full, mtime_ns=st.st_mtime_ns)

    @staticmethod
    def _check_inside(base: str, relpath: str, fd: int) -> None:
        """Refuse a file whose real location is outside the client's resolved directory.

        Checked on the open descriptor, not on the path: a symlink swapped between the open
        and a path check would otherwise let an outside file through.  ``base`` itself may be a
        symlink (operators link ``10.0.0.5 -> default``); only what is *below* it must stay
        below it.
        """
        try:
            # The kernel resolves ``base`` in one O_PATH open (os.path.realpath would lstat
            # every component from Python: twice the time per request, and on the FUSE tree a
            # lookup per component).
            dir_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise OpenRefused(0, "cannot tell where the opened file lives") from None
        try:
            real_base = os.readlink(f"/proc/self/fd/{dir_fd}")
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                # The kernel cannot name the file (more than PATH_MAX, reached through
                # symlinks): ask it instead whether the name resolves to this very file
                # without leaving the directory, as the inline open does.
                inside = _beneath(dir_fd, relpath, fd)
            else:
                # Both are canonical (the kernel's), so "below" is a prefix ending at a
                # separator.
                below = real_base if real_base.endswith("/") else real_base + "/"
                inside = real.startswith(below) and real != real_base
        except OSError:
            raise OpenRefused(0, "cannot tell where the opened file lives") from None
        finally:
            os.close(dir_fd)
        if not inside:
            raise OpenRefused(2, "access violation: file is outside the client's directory")


def _beneath(dir_fd: int, relpath: str, fd: int) -> bool:
    """Whether ``relpath`` resolves below ``dir_fd`` (``RESOLVE_BENEATH``: no ``..`` above
    it, no absolute or magic link) to the file open as ``fd``."""
    try:
        found = Openat2()(dir_fd, relpath, os.O_PATH | os.O_CLOEXEC,
                          RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    except OSError:
        return False
    try:
        a, b = os.fstat(found), os.fstat(fd)
    finally:
        os.close(found)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
