"""The daemon's side of client disks: a killable worker process and per-disk snapshot sessions.

`GuestProcess` starts `vfsroot.guestfs_worker` (one libguestfs handle, one appliance, many
disks: see `vfsroot.appliance`) in its own process group and talks to it over a pipe.  Every
call is bounded; on a timeout or cancellation the worker and everything it started (qemu,
libguestfs' recovery process) are killed, so a hung appliance launch costs a timeout, never a
stuck daemon.  Calls are serialised per process: a guestfs handle runs one call at a time
anyway, and the lock is the "one limiter per handle".

`GuestSession` is one mounted disk of an appliance seen as a *snapshot*: answers are cached
in the daemon until the next `refresh()` (a remount of that disk in the appliance), and open
`GuestReader`s pin the snapshot so a transfer in progress never reads a mix of old and new
(refresh waits until no reader is open).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .config import DiskConfig
from .framing import FrameDecoder, encode
from .layers.base import Kind, Node, Path

if TYPE_CHECKING:
    from .appliance import Appliance

log = logging.getLogger(__name__)

#: Sequential readers get this much ahead of what they asked for, in one pread round trip.
READ_AHEAD = 4 * 1024 * 1024
#: The first (or a random) read fetches at least this much.
MIN_FETCH = 256 * 1024
#: Nodes remembered per snapshot before the cache starts over.
MAX_CACHED_NODES = 50_000


class GuestProcessError(OSError):
    """The worker died, timed out or answered nonsense: the disk must be re-attached."""


class DiskGone(OSError):
    """The client no longer has a usable config (deleted or invalid): a layer object still
    held by a view answers "nothing here", so the client is served from its other layers."""


@dataclass
class AttachOptions:
    """How to launch one appliance (a subset of `vfsroot.disks.DiskOptions`)."""

    attach_timeout: float = 120.0
    call_timeout: float = 60.0
    memsize_mb: int = 512
    force_tcg: bool = False
    python: str = field(default_factory=lambda: sys.executable)


def _descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children first found by scanning /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MiB, or None if it is gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class GuestProcess:
    """One `guestfs_worker` process: start, call with a bound, kill."""

    def __init__(self, label: str, options: AttachOptions) -> None:
        self.label = label
        self.options = options
        self.proc: trio.Process | None = None
        self.qemu_pid: int | None = None
        self._lock = trio.Lock()
        self._dead: str | None = None
        self._decoder = FrameDecoder()

    async def start(self, drives: list[dict[str, Any]], scratch: int = 0) -> dict:
        """Start the worker and launch the appliance with `drives` (see
        `guestfs_worker.Worker.launch`); bounded by `attach_timeout`.  `scratch` (bytes) adds
        an empty scratch disk (for `vfsroot check` and the KVM probe)."""
        env = dict(os.environ)
        env["LIBGUESTFS_BACKEND"] = "direct"  # libvirt adds nothing here but failure modes
        if self.options.force_tcg:
            settings = [x for x in env.get("LIBGUESTFS_BACKEND_SETTINGS", "").split(":") if x]
            env["LIBGUESTFS_BACKEND_SETTINGS"] = ":".join([*settings, "force_tcg"])
        pkg_parent = str(pathlib.Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
        self.proc = await trio.lowlevel.open_process(
            [self.options.python, "-m", "vfsroot.guestfs_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
        )
        spec = {"drives": drives, "scratch": scratch, "memsize": self.options.memsize_mb}
        try:
            info = await self.call("launch", spec, timeout=self.options.attach_timeout,
                                   what="appliance launch", cancellable=True)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.kill()
            raise
        self.qemu_pid = info.get("qemu_pid")
        return info

    async def call(self, op: str, *args: Any, timeout: float | None = None,
                   what: str | None = None, cancellable: bool = False) -> Any:
        """One request/reply; OSError(errno) for the guest's errors, GuestProcessError (after
        killing the worker) when it times out or dies.

        A call is shielded from outside cancellation unless `cancellable`: cancelling it
        midway would leave the pipe out of step and cost the whole appliance, while the
        call itself is bounded by `timeout` anyway.  Launches are cancellable (a changed
        config makes them pointless), and then the worker is killed."""
        if self._dead is not None or self.proc is None:
            raise GuestProcessError(errno.EIO, f"{self.label}: appliance is gone ({self._dead})")
        timeout = self.options.call_timeout if timeout is None else timeout
        async with self._lock:
            if self._dead is not None:
                raise GuestProcessError(errno.EIO, f"{self.label}: appliance is gone "
                                        f"({self._dead})")
            reply: Any = None
            with trio.CancelScope(shield=not cancellable), \
                    trio.move_on_after(timeout) as scope:
                try:
                    await self.proc.stdin.send_all(encode((op, args)))
                    reply = await self._recv()
                except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as e:
                    reason = f"worker died during {what or op} ({type(e).__name__})"
                    self._dead = reason
                    with trio.CancelScope(shield=True):
                        await self.kill()
                    raise GuestProcessError(errno.EIO, f"{self.label}: {reason}") from None
                except BaseException:
                    # Cancelled mid-request: the stream is out of step; nothing can reuse it.
                    self._dead = f"{what or op} was cancelled"
                    with trio.CancelScope(shield=True):
                        await self.kill()
                    raise
            if scope.cancelled_caught:
                self._dead = f"{what or op} timed out after {timeout:g} s"
                with trio.CancelScope(shield=True):
                    await self.kill()
                raise GuestProcessError(errno.ETIMEDOUT, f"{self.label}: {self._dead}; "
                                        "appliance killed")
        if reply[0] == "ok":
            return reply[1]
        _, err, message = reply
        raise OSError(err, message)

    async def _recv(self) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        while not self._decoder:
            self._decoder.feed(await self.proc.stdout.receive_some(4 * 1024 * 1024))
        return self._decoder.pop()

    @property
    def alive(self) -> bool:
        return self._dead is None and self.proc is not None and self.proc.returncode is None

    async def close(self, timeout: float = 15.0) -> None:
        """Shut the appliance down politely, then make sure nothing is left."""
        if self.proc is None:
            return
        if self._dead is None:
            self._dead = "closed"
            with trio.move_on_after(timeout):
                try:
                    await self.proc.stdin.send_all(encode(("close", ())))
                    await self.proc.wait()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL the worker and every descendant (qemu, the recovery process)."""
        proc = self.proc
        if proc is None:
            return
        victims = [] if proc.returncode is not None else [proc.pid]
        if proc.returncode is None:
            victims += _descendants(proc.pid)
        if self.qemu_pid:
            victims.append(self.qemu_pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with trio.move_on_after(10):
            await proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with trio.CancelScope(shield=True), contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await stream.aclose()
        if victims:
            log.debug("disk=%s killed pids=%s", self.label, victims)


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
        from .appliance import Appliance  # noqa: PLC0415  (appliance imports this module)

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
