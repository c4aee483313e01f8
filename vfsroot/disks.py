"""The life of every client disk: attach, refresh, detach, retry, caps, status.

One `Disk` per client that has (or had) a `SRC/<ip>.nbd`.  States::

    none ──config──▶ attaching ──ok──▶ ready ──idle / evicted──▶ detached ──lookup──▶ attaching
                        │  ▲                 │
                        ▼  │ backoff          └─config changed──▶ attaching (new disk)
                       failed ◀───appliance died / timed out
    any ──config deleted──▶ none          any ──config invalid──▶ failed (no retry until fixed)

Why it is shaped like this:

* Attaching takes 25-45 s under TCG, so it never happens in the request path: it runs in the
  manager's nursery and a lookup only *waits* for it up to `attach_wait`, then fails with
  `LayerUnavailable` (TFTP clients retry; falling through to a default file the disk shadows
  would boot the wrong kernel).  Other clients, and this client's own directory, never wait.
* Launches are bounded (`attach_timeout`; the worker process is killed) and a failure is
  retried with exponential backoff while the disk is wanted (used or configured within
  `idle_timeout`), so an NBD server that comes back is picked up without a restart.
* Appliances are expensive (~450 MB each): at most `max_launches` boot at once, at most
  `max_appliances` exist, and when a new one is needed the least recently used idle disk is
  detached first.
* Freshness: a session is a snapshot.  A lookup after `refresh_quiet` seconds of silence on the
  disk remounts first (a client that upgraded its kernel and rebooted is quiet in between),
  and no snapshot older than `max_staleness` is used while no transfer is open.  A transfer in
  progress keeps its snapshot (see `GuestSession.refresh`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .config import ConfigError, DiskConfig, load_config
from .errors import QuietError
from .guest import AttachOptions, DiskGone, GuestProcessError, GuestSession, rss_mb
from .layers.base import Kind, Layer, LayerUnavailable, Node
from .layers.guest import GuestLayer
from .names import DISK_CONFIG_SUFFIX, client_of_config, is_client_name

log = logging.getLogger(__name__)

#: Wait this long after a config event before reading the file (editors write in steps).
DEBOUNCE = 0.3
#: A disk used more recently than this is never evicted for another one: a booting client
#: fetches its files in bursts seconds apart, and evicting it between two bursts would make
#: a fleet that boots at once thrash through launches instead of waiting its turn.
EVICT_MIN_IDLE = 30.0


class DiskOptionsError(QuietError, ValueError):
    """A disk option out of range: one clear line and exit status 2 from `vfsroot serve`."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


@dataclass
class DiskOptions:
    """Knobs of the disk life cycle; defaults and their reasons are in docs/disks.md."""

    idle_timeout: float = 900.0
    attach_timeout: float = 180.0
    attach_wait: float = 5.0
    call_timeout: float = 60.0
    max_appliances: int = 4
    max_launches: int = 1
    appliance_memory: int = 512
    force_tcg: bool = False
    refresh_quiet: float = 5.0
    max_staleness: float = 60.0
    retry_min: float = 10.0
    retry_max: float = 300.0
    config_poll: float = 5.0
    python: str = field(default="")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        d = DiskOptions()
        g = parser.add_argument_group("client disks (SRC/<ip>.nbd, through libguestfs)")
        g.add_argument("--idle-timeout", type=float, default=d.idle_timeout, metavar="S",
                       help="detach a disk unused for this long (default %(default)s s)")
        g.add_argument("--attach-timeout", type=float, default=d.attach_timeout, metavar="S",
                       help="kill an appliance launch + mount that takes longer "
                            "(default %(default)s s; TCG launches take 25-45 s)")
        g.add_argument("--attach-wait", type=float, default=d.attach_wait, metavar="S",
                       help="how long a lookup waits for a disk that is attaching before it "
                            "fails with EIO (default %(default)s s)")
        g.add_argument("--call-timeout", type=float, default=d.call_timeout, metavar="S",
                       help="kill the appliance if one guest call takes longer "
                            "(default %(default)s s)")
        g.add_argument("--max-appliances", type=int, default=d.max_appliances, metavar="N",
                       help="attached disks at most; the least recently used idle one is "
                            "detached first (default %(default)s)")
        g.add_argument("--max-launches", type=int, default=d.max_launches, metavar="N",
                       help="appliance launches at once (default %(default)s)")
        g.add_argument("--appliance-memory", type=int, default=d.appliance_memory,
                       metavar="MiB", help="memory of each appliance (default %(default)s)")
        g.add_argument("--force-tcg", action="store_true",
                       help="never try KVM (nested KVM hangs on some hosts; see vfsroot check)")
        g.add_argument("--refresh-quiet", type=float, default=d.refresh_quiet, metavar="S",
                       help="remount before a lookup that follows this much silence on the "
                            "disk (default %(default)s s)")
        g.add_argument("--max-staleness", type=float, default=d.max_staleness, metavar="S",
                       help="never answer from a snapshot older than this while no transfer "
                            "is open (default %(default)s s)")
        g.add_argument("--retry-min", type=float, default=d.retry_min, metavar="S",
                       help="first retry after a failed attach (doubles; default %(default)s s)")
        g.add_argument("--retry-max", type=float, default=d.retry_max, metavar="S",
                       help="longest wait between retries (default %(default)s s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DiskOptions:
        names = ("idle_timeout", "attach_timeout", "attach_wait", "call_timeout",
                 "max_appliances", "max_launches", "appliance_memory", "force_tcg",
                 "refresh_quiet", "max_staleness", "retry_min", "retry_max")
        opts = cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.max_appliances < 1 or self.max_launches < 1:
            raise DiskOptionsError("--max-appliances and --max-launches must be at least 1")
        if self.appliance_memory < 256:
            raise DiskOptionsError("--appliance-memory must be at least 256 MiB")
        for name in ("idle_timeout", "attach_timeout", "call_timeout", "retry_min"):
            if getattr(self, name) <= 0:
                raise DiskOptionsError(f"--{name.replace('_', '-')} must be positive")

    def attach_options(self) -> AttachOptions:
        opts = AttachOptions(attach_timeout=self.attach_timeout, call_timeout=self.call_timeout,
                             memsize_mb=self.appliance_memory, force_tcg=self.force_tcg)
        if self.python:
            opts.python = self.python
        return opts


def _signature(path: pathlib.Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, 0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Disk:
    """One client's disk: its config, its session, its state (also its `SessionSource`)."""

    def __init__(self, manager: DiskManager, client: str) -> None:
        self.manager = manager
        self.client = client
        self.path = manager.source_root / f"{client}{DISK_CONFIG_SUFFIX}"
        self.signature: tuple[int, int, int, int] | None = None
        self.config: DiskConfig | None = None
        self.config_version = 0
        self.state = "none"
        self.message = "no config"
        self.since = time.time()
        self.last_access: float | None = None  # wall clock, for people
        self.used_mono = -math.inf  # last access or config change, monotonic
        self.session_obj: GuestSession | None = None
        self.attaching = False
        self.attach_scope: trio.CancelScope | None = None
        self.failures = 0
        self.next_retry: float | None = None
        self.retryable = False
        self.attach_seconds: float | None = None
        self.layer = GuestLayer(self, client)
        self._changed = trio.Event()

    # --- state --------------------------------------------------------------------------

    def set_state(self, state: str, message: str) -> None:
        if (state, message) != (self.state, self.message):
            level = logging.WARNING if state == "failed" else logging.INFO
            log.log(level, "disk state client=%s state=%s message=%r", self.client, state,
                    message)
            if state != self.state:
                self.since = time.time()
            self.state, self.message = state, message
        self._changed.set()
        self._changed = trio.Event()

    def touch(self) -> None:
        self.last_access = time.time()
        self.used_mono = _now()

    # --- SessionSource --------------------------------------------------------------------

    async def session(self, *, lookup: bool) -> GuestSession:
        opts = self.manager.options
        quiet_for = trio.current_time() - self.used_mono
        self.touch()
        ready: GuestSession | None = None
        with trio.move_on_after(opts.attach_wait):
            while True:
                s = self.session_obj
                if s is not None and not s.alive:
                    self.broken(s, OSError("appliance died"))
                    s = None
                if s is not None and self.state == "ready":
                    ready = s
                    break
                if self.config is None:
                    raise DiskGone(errno.ENOENT, f"disk of {self.client}: {self.message}")
                if self.state == "failed" and not self.attaching and self.next_retry is not None:
                    wait = max(0.0, self.next_retry - trio.current_time())
                    raise LayerUnavailable(f"disk of {self.client} failed: {self.message}; "
                                           f"retry in {wait:.0f} s")
                if not self.attaching:
                    self.manager.start_attach(self)
                await self._changed.wait()
        if ready is not None:
            # Outside the wait bound: a remount takes ~2 s under TCG and must not be cut.
            if lookup:
                await self._maybe_refresh(ready, quiet_for)
            return ready
        raise LayerUnavailable(f"disk of {self.client} is still attaching "
                               f"({self.config.url if self.config else 'no config'}); "
                               "try again shortly")

    async def _maybe_refresh(self, s: GuestSession, quiet_for: float) -> None:
        opts = self.manager.options
        if quiet_for >= opts.refresh_quiet:
            min_age = opts.refresh_quiet
        elif s.age() >= opts.max_staleness:
            min_age = opts.max_staleness
        else:
            return
        try:
            await s.refresh(min_age=min_age)
        except GuestProcessError as e:
            self.broken(s, e)
            raise LayerUnavailable(f"disk of {self.client}: {e.strerror}") from e
        except OSError as e:
            # The remount failed: the client repartitioned or reformatted.  Re-attach.
            self.broken(s, e)
            raise LayerUnavailable(f"disk of {self.client}: refresh failed: {e}") from e

    def peek(self) -> GuestSession | None:
        s = self.session_obj
        if s is not None and s.alive and self.state == "ready":
            return s
        if self.config is not None and not self.attaching and self.state != "failed":
            self.touch()
            self.manager.start_attach(self)
        return None

    def gone(self) -> bool:
        return self.config is None

    def root_node(self) -> Node:
        cfg = self.config
        source = f"{cfg.url}#{cfg.tftp_root}" if cfg else "nbd://"
        return Node(kind=Kind.DIR, size=0, mtime_ns=0, layer="disk", source=source,
                    version=("disk-pending",))

    def broken(self, session: GuestSession, error: BaseException) -> None:
        if session is not self.session_obj:
            return
        self.manager.retire(self, f"appliance failed: {error}")
        self.fail(f"appliance failed: {getattr(error, 'strerror', None) or error}",
                  retryable=True, immediate=True)

    def fail(self, message: str, *, retryable: bool, immediate: bool = False) -> None:
        opts = self.manager.options
        self.failures += 1
        self.retryable = retryable
        if retryable:
            delay = 0.0 if immediate and self.failures == 1 else min(
                opts.retry_max, opts.retry_min * 2 ** max(0, self.failures - 1))
            self.next_retry = trio.current_time() + delay
        else:
            self.next_retry = None
        self.set_state("failed", message)


class DiskManager:
    """Every client disk of one source root; see the module docstring."""

    def __init__(self, source_root: pathlib.Path, options: DiskOptions) -> None:
        self.source_root = pathlib.Path(source_root)
        self.options = options
        self.disks: dict[str, Disk] = {}
        self._nursery: trio.Nursery | None = None
        self._launches = trio.CapacityLimiter(options.max_launches)
        self._sessions: set[GuestSession] = set()  # every session not yet closed
        self._pending: set[Disk] = set()  # attach requested before run() started
        self._notify_send, self._notify_recv = trio.open_memory_channel[str](math.inf)
        #: Called once per finished attach attempt with (client, seconds, error or None): the
        #: metrics collector's hook; None costs nothing.
        self.on_attach_result: Callable[[str, float, str | None], None] | None = None

    # --- the interface the daemon uses ---------------------------------------------------

    def layer_for(self, client: str) -> Layer | None:
        """The disk layer of `client`, or None without a usable `SRC/<client>.nbd`."""
        if not is_client_name(client):
            return None
        disk = self.disks.get(client)
        path = self.source_root / f"{client}{DISK_CONFIG_SUFFIX}"
        if disk is None or _signature(path) != disk.signature:
            disk = self.reload(client)
        if disk is None or disk.config is None:
            return None
        return disk.layer

    def notify_config(self, client: str) -> None:
        """`SRC/<client>.nbd` changed in some way; re-read it soon (debounced)."""
        if is_client_name(client):
            self._notify_send.send_nowait(client)

    def status(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        now = trio.current_time() if self._nursery is not None else None
        for client, d in sorted(self.disks.items()):
            s = d.session_obj
            entry: dict[str, object] = {
                "state": d.state,
                "message": d.message,
                "since": round(d.since, 3),
                "last_access": round(d.last_access, 3) if d.last_access else None,
                "url": str(d.config.url) if d.config else None,
                "appliance_memory_mb": self.options.appliance_memory,
                "appliance_rss_mb": None,
                "failures": d.failures,
                "next_retry_in": None,
                "attach_seconds": round(d.attach_seconds, 2) if d.attach_seconds else None,
                "snapshot_age_s": None,
                "open_transfers": 0,
            }
            if s is not None and s.alive:
                rss = rss_mb(s.qemu_pid)
                entry["appliance_rss_mb"] = round(rss, 1) if rss else None
                entry["snapshot_age_s"] = round(s.age(), 1)
                entry["open_transfers"] = s.open_readers
            if d.state == "failed" and d.next_retry is not None and now is not None:
                entry["next_retry_in"] = round(max(0.0, d.next_retry - now), 1)
            out[client] = entry
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work until cancelled; detaches everything on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._scan(initial=True)
                for disk in list(self._pending):
                    self.start_attach(disk)
                self._pending.clear()
                nursery.start_soon(self._notify_loop)
                nursery.start_soon(self._sweeper)
                nursery.start_soon(self._poll_loop)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                for disk in self.disks.values():
                    disk.session_obj = None
                async with trio.open_nursery() as closer:
                    for s in list(self._sessions):
                        closer.start_soon(s.close)
                self._sessions.clear()
                log.info("disks detached: all")

    # --- configs --------------------------------------------------------------------------

    def reload(self, client: str) -> Disk | None:
        """Read `SRC/<client>.nbd` again and act on what changed.  Synchronous: a config is
        one small local file."""
        disk = self.disks.get(client)
        path = self.source_root / f"{client}{DISK_CONFIG_SUFFIX}"
        sig = _signature(path)
        if disk is None:
            if sig is None:
                return None
            disk = self.disks[client] = Disk(self, client)
        if sig == disk.signature and disk.signature is not None:
            return disk
        disk.signature = sig
        try:
            config = load_config(path)
            error = None
        except FileNotFoundError:
            config, error = None, None
        except ConfigError as e:
            config, error = None, str(e)
        except Exception as e:  # a parser bug must cost this client its disk, not the daemon
            log.exception("disk config unreadable client=%s", client)
            config, error = None, f"{path}: unreadable ({type(e).__name__}: {e})"
        if config is None:
            disk.config = None
            disk.config_version += 1
            self._cancel_attach(disk)
            self.retire(disk, "config deleted" if error is None else "config invalid")
            disk.next_retry = None
            if error is None:
                disk.set_state("none", "config deleted")
            else:
                log.error("disk config error client=%s error=%r", client, error)
                disk.failures = 0
                disk.fail(f"config error: {error}", retryable=False)
            return disk
        if config == disk.config and (disk.attaching or disk.session_obj is not None):
            return disk
        changed = disk.config is not None
        disk.config = config
        disk.config_version += 1
        disk.failures = 0
        disk.next_retry = None
        disk.used_mono = _now()
        self._cancel_attach(disk)
        self.retire(disk, "config changed" if changed else "config appeared")
        log.info("disk config client=%s url=%s %s", client, config.url,
                 "changed" if changed else "found")
        self.start_attach(disk)  # proactive: the client is probably about to boot
        return disk

    async def _scan(self, initial: bool = False) -> None:
        """Compare the *.nbd files of the source root with what we know (poll fallback)."""
        def listing() -> set[str]:
            try:
                names = os.listdir(self.source_root)
            except OSError:
                return set()
            return {c for n in names if (c := client_of_config(n)) is not None}

        found = await trio.to_thread.run_sync(listing)
        for client in sorted(found | set(self.disks)):
            disk = self.disks.get(client)
            path = self.source_root / f"{client}{DISK_CONFIG_SUFFIX}"
            if disk is None or _signature(path) != disk.signature:
                self.reload(client)

    async def _notify_loop(self) -> None:
        async for client in self._notify_recv:
            await trio.sleep(DEBOUNCE)
            clients = {client}
            while True:
                try:
                    clients.add(self._notify_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            for c in sorted(clients):
                self.reload(c)

    async def _poll_loop(self) -> None:
        while True:
            await trio.sleep(self.options.config_poll)
            await self._scan()

    # --- attach / detach ------------------------------------------------------------------

    def start_attach(self, disk: Disk) -> None:
        if disk.attaching or disk.config is None:
            return
        disk.set_state("attaching", f"queued ({disk.config.url})")
        if self._nursery is None:
            self._pending.add(disk)  # run() starts it
            return
        disk.attaching = True
        self._nursery.start_soon(self._attach, disk, disk.config_version)

    def _cancel_attach(self, disk: Disk) -> None:
        if disk.attach_scope is not None:
            disk.attach_scope.cancel()
            disk.attach_scope = None
        disk.attaching = False

    async def _attach(self, disk: Disk, version: int) -> None:
        config = disk.config
        assert config is not None
        session: GuestSession | None = None
        started = trio.current_time()
        with trio.CancelScope() as scope:
            disk.attach_scope = scope
            try:
                async with self._launches:
                    await self._make_room(disk)
                    disk.set_state("attaching", f"launching appliance ({config.url})")
                    started = trio.current_time()
                    session = GuestSession(disk.client, config, self.options.attach_options())
                    self._sessions.add(session)
                    info = await session.attach()
            except (OSError, GuestProcessError) as e:
                if session is not None:
                    self._sessions.discard(session)
                    with trio.CancelScope(shield=True):
                        await session.close()
                if disk.config_version == version:
                    disk.attaching = False
                    disk.attach_scope = None
                    disk.fail(f"attach failed: {e.strerror or e}", retryable=True)
                if self.on_attach_result is not None:
                    self.on_attach_result(disk.client, trio.current_time() - started,
                                          str(e.strerror or e))
                return
        if scope.cancelled_caught or disk.config_version != version:
            if session is not None:
                self._sessions.discard(session)
                with trio.CancelScope(shield=True):
                    await session.close()
            return
        assert session is not None
        disk.attaching = False
        disk.attach_scope = None
        disk.session_obj = session
        disk.failures = 0
        disk.next_retry = None
        disk.attach_seconds = info.get("attach_s")
        disk.used_mono = max(disk.used_mono, trio.current_time())  # idle counts from here
        log.info("disk attached client=%s url=%s seconds=%.1f launch_s=%.1f qemu_pid=%s",
                 disk.client, config.url, info.get("attach_s", 0), info.get("launch_s", 0),
                 info.get("qemu_pid"))
        disk.set_state("ready", f"attached in {info.get('attach_s', 0):.1f} s")
        if self.on_attach_result is not None:
            self.on_attach_result(disk.client, trio.current_time() - started, None)

    async def _make_room(self, disk: Disk) -> None:
        """Wait until one more appliance fits, detaching the least recently used idle disk."""
        while True:
            live = [d for d in self.disks.values()
                    if d is not disk and d.session_obj is not None]
            if len(live) < self.options.max_appliances:
                return
            now = trio.current_time()
            idle = [d for d in live if d.session_obj and d.session_obj.open_readers == 0
                    and now - d.used_mono >= EVICT_MIN_IDLE]
            if idle:
                victim = min(idle, key=lambda d: d.used_mono)
                self.retire(victim, "evicted (appliance cap)")
                victim.set_state("detached", f"evicted to make room for {disk.client}")
                continue
            disk.set_state("attaching", "waiting for a free appliance slot")
            await trio.sleep(1)

    def retire(self, disk: Disk, reason: str) -> None:
        """Stop handing out the disk's session; close it once its transfers are done."""
        s = disk.session_obj
        disk.session_obj = None
        if s is None:
            return
        log.info("disk detaching client=%s reason=%r", disk.client, reason)
        if self._nursery is not None:
            self._nursery.start_soon(self._close_when_idle, s)

    async def _close_when_idle(self, s: GuestSession) -> None:
        with trio.move_on_after(self.options.call_timeout):
            while s.open_readers and s.alive:
                await trio.sleep(0.2)
        with trio.CancelScope(shield=True):
            await s.close()
        self._sessions.discard(s)

    async def _sweeper(self) -> None:
        """Idle detach and retries with backoff, once a second."""
        while True:
            await trio.sleep(0.5)
            now = trio.current_time()
            for disk in list(self.disks.values()):
                idle_for = now - disk.used_mono
                s = disk.session_obj
                if (s is not None and disk.state == "ready" and s.open_readers == 0
                        and idle_for >= self.options.idle_timeout):
                    self.retire(disk, "idle")
                    disk.set_state("detached", f"idle for {idle_for:.0f} s")
                elif (disk.state == "failed" and disk.retryable and not disk.attaching
                      and disk.next_retry is not None and now >= disk.next_retry):
                    if idle_for < self.options.idle_timeout:
                        self.start_attach(disk)
                    else:
                        disk.next_retry = None  # nobody wants it: retry at the next lookup
                        log.info("disk retries stopped client=%s reason=idle", disk.client)


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()
