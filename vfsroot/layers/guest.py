"""The client's own NBD disk as a layer ("disk"), between its directory and the default.

The layer is a thin facade: where the disk comes from, when it is attached, refreshed or
detached is `vfsroot.disks.DiskManager`'s business, reached through a `SessionSource`.  What
the layer guarantees to the view:

* `lookup` waits for a pending attach only up to a bound, then raises `LayerUnavailable`:
  the view must not fall through to a default file this disk might shadow.
* A dead appliance is `LayerUnavailable` too (and the source is told, so it re-attaches).
* Symlinks never come out: the worker resolves them inside the guest tree.
"""

from __future__ import annotations

import errno
from typing import Protocol

from ..guest import DiskGone, GuestProcessError, GuestReader, GuestSession
from .base import Kind, LayerUnavailable, Node, Path


class SessionSource(Protocol):
    """Hands out the disk's current session, attaching (or refreshing) it as needed."""

    async def session(self, *, lookup: bool) -> GuestSession:
        """The attached session; waits a bounded time, else raises LayerUnavailable.
        `lookup=True` marks the start of a new access (a refresh may happen first)."""
        ...

    def broken(self, session: GuestSession, error: BaseException) -> None:
        """The session's appliance died or timed out: stop using it."""
        ...

    def peek(self) -> GuestSession | None:
        """The session if it is ready now, else None (starting an attach if none is under
        way); never waits."""
        ...

    def root_node(self) -> Node:
        """What the layer root looks like before the disk is attached."""
        ...

    def gone(self) -> bool:
        """The config was deleted or is invalid: the layer has nothing."""
        ...


class StaticSource:
    """A source that always hands out one already attached session (tests, benchmarks)."""

    def __init__(self, session: GuestSession) -> None:
        self._session = session

    async def session(self, *, lookup: bool) -> GuestSession:
        if not self._session.alive:
            raise LayerUnavailable("disk is not attached")
        return self._session

    def broken(self, session: GuestSession, error: BaseException) -> None:
        pass

    def peek(self) -> GuestSession | None:
        return self._session if self._session.alive else None

    def gone(self) -> bool:
        return False

    def root_node(self) -> Node:
        return Node(kind=Kind.DIR, size=0, mtime_ns=0, layer="disk",
                    source=f"{self._session.config.url}#{self._session.config.tftp_root}")


class GuestLayer:
    """Layer "disk": files of the client's disk under its `tftp_root`."""

    name = "disk"

    def __init__(self, source: SessionSource, client: str = "") -> None:
        self.source = source
        self.client = client

    async def lookup(self, path: Path) -> Node | None:
        if not path and self.source.peek() is None and not self.source.gone():
            # The root of a disk that is not attached yet is a directory (attach checks
            # tftp_root is one).  Answering at once lets the view merge the client's root
            # and serve the client's own files while the appliance boots; every path
            # *below* still waits for the disk or fails, so nothing is wrongly shadowed.
            return self.source.root_node()
        try:
            session = await self.source.session(lookup=True)
        except DiskGone:
            return None
        try:
            return await session.lookup(path)
        except GuestProcessError as e:
            self.source.broken(session, e)
            raise LayerUnavailable(f"disk of {self.client or 'client'}: {e.strerror}") from e

    async def listdir(self, path: Path) -> dict[str, Node]:
        try:
            session = await self.source.session(lookup=False)
        except DiskGone:
            return {}
        try:
            return await session.listdir(path)
        except GuestProcessError as e:
            self.source.broken(session, e)
            raise LayerUnavailable(f"disk of {self.client or 'client'}: {e.strerror}") from e

    async def open(self, path: Path) -> GuestReader:
        try:
            session = await self.source.session(lookup=False)
        except DiskGone as e:
            raise FileNotFoundError(errno.ENOENT, e.strerror) from None
        try:
            return await session.open(path)
        except GuestProcessError as e:
            self.source.broken(session, e)
            raise OSError(errno.EIO, f"disk of {self.client or 'client'}: {e.strerror}") from e
