"""A layer backed by a directory of the source root (`default/` or `<ip>/`).

Symlinks are the operator's tool for sharing (`10.0.0.5/vmlinuz -> ../default/vmlinuz-6.1`),
so they are followed, but only while the fully resolved target stays inside the source root.
A link that leads out of it, or nowhere, is treated as absent and logged: the kernel must never
be handed a path it could resolve outside the client's view.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path as HostPath

import trio

from ..fileio import pread_exact
from .base import Kind, Node, Path

log = logging.getLogger(__name__)

#: Local reads are page-cache fast, but the source root may sit on NFS or a slow disk: reads
#: go to worker threads, bounded so that eight readers of a big file don't spawn a thread each
#: per FUSE request.
READ_LIMITER = trio.CapacityLimiter(8)


class LocalLayer:
    """One directory of the source root as a layer."""

    def __init__(self, name: str, root: HostPath, confine: HostPath) -> None:
        self.name = name
        self.root = root
        #: Resolved source root: every resolved path must stay below it.
        self.confine = os.path.realpath(confine)

    def __repr__(self) -> str:
        return f"LocalLayer({self.name!r}, {str(self.root)!r})"

    def _host_path(self, path: Path) -> str:
        return os.path.join(self.root, *path)

    def _inside(self, real: str) -> bool:
        return real == self.confine or real.startswith(self.confine + os.sep)

    def _resolve(self, path: Path) -> str | None:
        """The real path behind `path`, or None if it escapes the source root."""
        host = self._host_path(path)
        real = os.path.realpath(host)
        if not self._inside(real):
            log.warning(
                "symlink escapes the source root, ignored layer=%s path=%s target=%s",
                self.name, host, real,
            )
            return None
        return real

    def _node(self, real: str, st: os.stat_result) -> Node | None:
        if stat.S_ISDIR(st.st_mode):
            kind = Kind.DIR
        elif stat.S_ISREG(st.st_mode):
            kind = Kind.FILE
        else:
            return None  # sockets, fifos, devices: nothing a boot client can fetch
        return Node(
            kind=kind,
            size=st.st_size if kind is Kind.FILE else 0,
            mtime_ns=st.st_mtime_ns,
            layer=self.name,
            source=real,
            version=(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size),
        )

    async def lookup(self, path: Path) -> Node | None:
        host = self._host_path(path)
        try:
            lst = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a parent component is a symlink loop
                log.warning("symlink loop ignored layer=%s path=%s", self.name, host)
                return None
            raise
        real = self._resolve(path)
        if real is None:
            return None
        if stat.S_ISLNK(lst.st_mode) or real != os.path.abspath(host):
            try:
                st = os.stat(real)
            except (FileNotFoundError, NotADirectoryError):
                log.info("broken symlink ignored layer=%s path=%s", self.name, host)
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    log.warning("symlink loop ignored layer=%s path=%s", self.name, host)
                    return None
                raise
        else:
            st = lst
        return self._node(real, st)

    async def listdir(self, path: Path) -> dict[str, Node]:
        real = self._resolve(path)
        if real is None:
            return {}
        entries: dict[str, Node] = {}
        try:
            names = os.listdir(real)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        for name in names:
            node = await self.lookup((*path, name))
            if node is not None:
                entries[name] = node
        return entries

    async def open(self, path: Path) -> LocalReader:
        node = await self.lookup(path)
        if node is None or node.kind is not Kind.FILE:
            raise FileNotFoundError(errno.ENOENT, "no such file", self._host_path(path))
        fd = os.open(node.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            # The lookup checked a path; between it and the open, a directory on the way
            # could have been swapped for a symlink that leads out.  Check what was opened.
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not self._inside(opened) or not stat.S_ISREG(os.fstat(fd).st_mode):
                log.warning("file changed into one outside the source root while opening, "
                            "refused layer=%s path=%s opened=%s", self.name, node.source, opened)
                raise FileNotFoundError(errno.ENOENT, "no such file", self._host_path(path))
        except BaseException:
            os.close(fd)
            raise
        return LocalReader(node, fd)


class LocalReader:
    """An open file of a local layer.

    The descriptor is opened once, so a transfer keeps reading the file it started with even
    if the operator replaces it (rename over) meanwhile: no mix of old and new.
    """

    def __init__(self, node: Node, fd: int) -> None:
        self.node = node
        self._fd = fd

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(
            pread_exact, self._fd, size, offset, limiter=READ_LIMITER
        )

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
