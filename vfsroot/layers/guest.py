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

from ..guest import GuestProcessError, GuestReader, GuestSession
from .base import LayerUnavailable, Node, Path


class SessionSource(Protocol):
    """Hands out the disk's current session, attaching (or refreshing) it as needed."""

    async def session(self, *, lookup: bool) -> GuestSession:
        """The attached session; waits a bounded time, else raises LayerUnavailable.
        `lookup=True` marks the start of a new access (a refresh may happen first)."""
        ...

    def broken(self, session: GuestSession, error: BaseException) -> None:
        """The session's appliance died or timed out: stop using it."""
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


class GuestLayer:
    """Layer "disk": files of the client's disk under its `tftp_root`."""

    name = "disk"

    def __init__(self, source: SessionSource, client: str = "") -> None:
        self.source = source
        self.client = client

    async def lookup(self, path: Path) -> Node | None:
        session = await self.source.session(lookup=True)
        try:
            return await session.lookup(path)
        except GuestProcessError as e:
            self.source.broken(session, e)
            raise LayerUnavailable(f"disk of {self.client or 'client'}: {e.strerror}") from e

    async def listdir(self, path: Path) -> dict[str, Node]:
        session = await self.source.session(lookup=False)
        try:
            return await session.listdir(path)
        except GuestProcessError as e:
            self.source.broken(session, e)
            raise LayerUnavailable(f"disk of {self.client or 'client'}: {e.strerror}") from e

    async def open(self, path: Path) -> GuestReader:
        session = await self.source.session(lookup=False)
        try:
            return await session.open(path)
        except GuestProcessError as e:
            self.source.broken(session, e)
            raise OSError(errno.EIO, f"disk of {self.client or 'client'}: {e.strerror}") from e
