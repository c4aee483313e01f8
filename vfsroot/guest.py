"""The daemon's side of client disks: per-disk snapshot sessions inside an appliance.

The worker process itself (`GuestProcess`, bounded calls, killing) is `vfsroot.guest_process`;
the appliance that owns one is `vfsroot.appliance`.

`GuestSession` is one mounted disk of an appliance seen as a *snapshot*: answers are cached
in the daemon until the next `refresh()` (a remount of that disk in the appliance), and open
`GuestReader`s pin the snapshot so a transfer in progress never reads a mix of old and new
(refresh waits until no reader is open).
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

import trio

from .appliance import Appliance
from .config import DiskConfig
from .guest_process import AttachOptions, GuestProcessError
from .layers.base import Kind, Node, Path

log = logging.getLogger(__name__)

#: Sequential readers get this much ahead of what they asked for, in one pread round trip.
READ_AHEAD = 4 * 1024 * 1024
#: The first (or a random) read fetches at least this much.
MIN_FETCH = 256 * 1024
#: Nodes remembered per snapshot before the cache starts over.
MAX_CACHED_NODES = 50_000


class DiskGone(OSError):
    """The client no longer has a usable config (deleted or invalid): a layer object still
    held by a view answers "nothing here", so the client is served from its other layers."""


def drive_spec(disk_id: str, config: DiskConfig) -> dict[str, Any]:
    """What the worker needs to add the disk's drive (see `guestfs_worker.Worker.launch`)."""
    url = config.url
    return {"id": disk_id, "protocol": url.protocol, "server": url.server,
            "export": url.export}


def mount_specs(config: DiskConfig) -> list[dict[str, Any]]:
    return [{"partition": m.partition, "lv": m.lv, "mountpoint": m.mountpoint,
             "label": m.label} for m in config.mounts]


class GuestSession:
    """One mounted disk of an appliance as a snapshot of the client's boot tree.

    Made either on an appliance the caller launched (`vfsroot.disks` puts many disks in one)
    and then `mount()`ed, or alone with `attach()`, which launches a private appliance for
    this disk only (tests, benchmarks)."""

    def __init__(self, client: str, config: DiskConfig, options: AttachOptions,
                 appliance: Appliance | None = None, disk_id: str | None = None) -> None:
        self.client = client
        self.config = config
        self.options = options
        self.disk_id = disk_id or client
        self.appliance = appliance
        self._owns_appliance = appliance is None
        self.root: Path = tuple(p for p in config.tftp_root.split("/") if p)
        self.generation = 0
        self.snapshot_at = 0.0
        self.open_readers = 0
        self.info: dict[str, Any] = {}
        self._nodes: dict[Path, Node | None] = {}
        self._readers_gone = trio.Event()
        self._refresh_lock = trio.Lock()
        self.closed = False
        #: Set when the guest reported EIO: its NBD connection is gone (qemu does not
        #: reconnect) or the filesystem is damaged; either way only a new attach helps.
        self.io_error: str | None = None

    # --- life -----------------------------------------------------------------------------

    async def attach(self) -> dict[str, Any]:
        """Launch a private appliance for this disk alone, then mount it."""
        t0 = time.monotonic()
        self.appliance = Appliance(self.options, label=f"{self.client}({self.config.url})")
        self._owns_appliance = True
        try:
            info = await self.appliance.launch([drive_spec(self.disk_id, self.config)])
            if self.disk_id in info["failed"]:
                err, message = info["failed"][self.disk_id]
                raise OSError(err, message)
            await self.mount()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        self.info = {**info, **self.info, "attach_s": time.monotonic() - t0}
        return self.info

    async def mount(self) -> dict[str, Any]:
        """Mount the disk in its (launched) appliance and check `tftp_root`."""
        assert self.appliance is not None
        self.info = dict(await self._call("mount", mount_specs(self.config), what="mount"))
        self.snapshot_at = time.monotonic()
        root = await self.lookup(())
        if root is None or not root.is_dir:
            raise OSError(errno.ENOENT, f"tftp_root {self.config.tftp_root} is not a directory "
                          "on the disk")
        return self.info

    async def close(self) -> None:
        """Stop answering.  A private appliance is closed; a shared one is the owner's."""
        self.closed = True
        self._nodes.clear()
        if self._owns_appliance and self.appliance is not None:
            await self.appliance.close()

    @property
    def alive(self) -> bool:
        return (not self.closed and self.io_error is None and self.appliance is not None
                and self.appliance.alive)

    async def _call(self, op: str, *args: Any, what: str | None = None) -> Any:
        assert self.appliance is not None
        try:
            return await self.appliance.call(op, self.disk_id, *args, what=what)
        except GuestProcessError:
            raise
        except OSError as e:
            if e.errno == errno.EIO:
                self.io_error = f"{op}: {e.strerror}"
                log.warning("disk I/O error client=%s op=%s error=%r", self.client, op,
                            e.strerror)
            raise

    @property
    def qemu_pid(self) -> int | None:
        return self.appliance.qemu_pid if self.appliance is not None else None

    def age(self) -> float:
        return time.monotonic() - self.snapshot_at

    async def refresh(self, min_age: float = 0.0) -> bool:
        """Remount so later answers see what the client wrote; only when no reader is open
        (a transfer in progress keeps its snapshot) and the snapshot is at least `min_age`
        seconds old (checked under the lock, so concurrent lookups remount once).  Returns
        whether it refreshed."""
        async with self._refresh_lock:
            if self.open_readers or self.closed or self.age() < min_age:
                return False
            t0 = time.monotonic()
            self.generation += 1  # before the await: readers opened from now on are new
            self._nodes.clear()
            await self._call("refresh", what="remount")
            self._nodes.clear()
            self.snapshot_at = time.monotonic()
            log.info("disk refreshed client=%s generation=%d seconds=%.2f", self.client,
                     self.generation, time.monotonic() - t0)
            return True

    # --- queries ---------------------------------------------------------------------------

    def _source(self, real: str) -> str:
        return f"{self.config.url}#{real}"

    def _to_node(self, raw: tuple) -> Node:
        kind, size, mtime_ns, real, version = raw
        return Node(kind=Kind.FILE if kind == "file" else Kind.DIR, size=size,
                    mtime_ns=mtime_ns, layer="disk", source=self._source(real),
                    version=("disk", *version))

    async def _wait_refresh(self) -> None:
        if self._refresh_lock.locked():
            async with self._refresh_lock:
                pass

    async def lookup(self, path: Path) -> Node | None:
        await self._wait_refresh()
        if path in self._nodes:
            return self._nodes[path]
        gen = self.generation
        raw = await self._call("lookup", list(self.root + path))
        node = None if raw is None else self._to_node(raw)
        if gen == self.generation:
            if len(self._nodes) >= MAX_CACHED_NODES:
                self._nodes.clear()  # a crude bound; boot trees are far smaller
            self._nodes[path] = node
        return node

    async def listdir(self, path: Path) -> dict[str, Node]:
        await self._wait_refresh()
        gen = self.generation
        raw, warnings = await self._call("listdir", list(self.root + path))
        for w in warnings:
            log.warning("disk listing client=%s %s", self.client, w)
        out = {name: self._to_node(r) for name, r in raw.items()}
        if gen == self.generation:
            for name, node in out.items():
                self._nodes[(*path, name)] = node
        return out

    async def open(self, path: Path) -> GuestReader:
        while True:
            await self._wait_refresh()
            gen = self.generation
            node = await self.lookup(path)
            if gen == self.generation and not self._refresh_lock.locked():
                break  # the node and the reader belong to the same snapshot
        if node is None:
            raise FileNotFoundError(errno.ENOENT, "/".join(path))
        if node.is_dir:
            raise IsADirectoryError(errno.EISDIR, "/".join(path))
        return GuestReader(self, node, node.source.split("#", 1)[1])

    async def pread(self, real: str, offset: int, size: int) -> bytes:
        return await self._call("pread", real, offset, size)


class GuestReader:
    """An open guest file pinned to one snapshot, with read-ahead for sequential readers."""

    def __init__(self, session: GuestSession, node: Node, real: str) -> None:
        self.session = session
        self.node = node
        self.real = real
        self.generation = session.generation
        self._buf = b""
        self._buf_at = 0
        self._next = 0
        self._closed = False
        self._lock = trio.Lock()
        session.open_readers += 1

    async def read(self, offset: int, size: int) -> bytes:
        s = self.session
        if self._closed:
            raise OSError(errno.EBADF, "reader is closed")
        if not s.alive:
            raise OSError(errno.EIO, f"disk of {s.client} was detached during the transfer")
        if s.generation != self.generation:
            raise OSError(errno.ESTALE, "disk snapshot changed during the transfer")
        end = min(offset + size, self.node.size)
        if offset >= end:
            return b""
        # One fetch at a time per reader: the kernel keeps several reads of one file in
        # flight, and the second one is usually inside what the first is fetching.
        async with self._lock:
            buf_end = self._buf_at + len(self._buf)
            if not (self._buf_at <= offset and end <= buf_end):
                # Sequential: at or just after what we fetched last (in-flight reads arrive
                # slightly out of order, so "exactly the next byte" is too strict).
                sequential = self._next - MIN_FETCH <= offset <= self._next + READ_AHEAD
                want = max(end - offset, READ_AHEAD if sequential else MIN_FETCH)
                want = min(want, self.node.size - offset)
                data = await self.session.pread(self.real, offset, want)
                if len(data) < min(want, end - offset):
                    # The file shrank under us (the live client rewrote it): never a mix.
                    raise OSError(errno.EIO, f"{self.real}: short read at {offset} (file "
                                  "changed on the disk during the transfer)")
                self._buf, self._buf_at = data, offset
                self._next = offset + len(data)
            return self._buf[offset - self._buf_at:end - self._buf_at]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._buf = b""
            self.session.open_readers -= 1
