"""The life of every client disk: batches, appliances, refresh, detach, retry, memory, status.

One `Disk` per client that has (or had) a `SRC/<ip>.nbd`.  States (`DiskState`)::

    none ──config──▶ attaching ──ok──▶ ready ──idle / evicted──▶ detached ──lookup──▶ attaching
                        │  ▲                 │
                        ▼  │ backoff          └─config changed──▶ attaching (new appliance)
                       failed ◀───its appliance died / its NBD connection broke
    any ──config deleted──▶ none          any ──config invalid──▶ failed (no retry until fixed)

Who owns what: a `Disk` holds one client's state and changes it only through its own methods;
only the `DiskManager` calls them.  The manager owns the queue, the appliances and every
decision (attach, batch, evict, retry).  The layer reaches the manager through `DiskSource`;
nothing in a `Disk` starts work.

Why it is shaped like this:

* A launch takes 25-45 s and ~450 MiB under TCG, and one appliance takes many drives for ~30
  MiB each.  So attaches wanted close together (`batch_window`) share one launch, up to
  `disks_per_appliance`, and every configured disk is queued when the daemon starts.  After
  the launch each disk is mounted on its own, the most recently asked-for first, so the first
  client does not wait for the whole batch to mount.
* Failures stay per disk.  Before a launch each server is probed (TCP connect, a few ms) and
  an unreachable one fails alone; `add_drive_opts` then fails alone for a server that accepts
  connections but has no such disk.  A shared launch that still fails is retried once without
  the disks that fail a second probe, then its disks go alone.  An appliance that dies sends
  only its own disks back (with backoff).
* Attaching never happens in the request path: a lookup only *waits* for it up to
  `attach_wait`, then fails with `LayerUnavailable` (falling through to a default file the disk
  shadows would boot the wrong kernel).  Other clients and this client's directory never wait.
* Memory, not appliances, is what is capped: appliances count their measured RSS (or an
  estimate while launching) against `max_memory`; when a new one does not fit, the least
  recently used appliance whose disks are all idle is closed first.
* Freshness: a session is a snapshot, refreshed per disk (see `GuestSession.refresh`).
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
import pathlib
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from . import accel
from .appliance import Appliance, estimate_mb
from .config import ConfigError, DiskConfig, load_config
from .disk_options import DiskOptions, DiskOptionsError
from .guest import DiskGone, GuestProcessError, GuestSession, drive_spec
from .layers.base import Kind, Layer, LayerUnavailable, Node
from .layers.guest import GuestLayer
from .names import DISK_CONFIG_SUFFIX, client_of_config, is_client_name

__all__ = ["Disk", "DiskManager", "DiskOptions", "DiskOptionsError", "DiskState"]

log = logging.getLogger(__name__)

#: Wait this long after a config event before reading the file (editors write in steps).
DEBOUNCE = 0.3
#: A disk used more recently than this is never evicted for another one: a booting client
#: fetches its files in bursts seconds apart, and evicting it between two bursts would make
#: a fleet that boots at once thrash through launches instead of waiting its turn.
EVICT_MIN_IDLE = 30.0
#: Bound of the pre-launch reachability probe of one server.
PROBE_TIMEOUT = 3.0
#: Clients per page of the paged status (`status_page`): well below the kernel's 64 KiB
#: xattr limit even with long messages (each is cut to `STATUS_MESSAGE_MAX`).
STATUS_PAGE = 100
STATUS_MESSAGE_MAX = 300


class DiskState(enum.StrEnum):
    NONE = "none"
    ATTACHING = "attaching"
    READY = "ready"
    FAILED = "failed"
    DETACHED = "detached"


def _signature(path: pathlib.Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, 0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Disk:
    """One client's disk: config, session, state.  Changed only through these methods."""

    def __init__(self, client: str, path: pathlib.Path) -> None:
        self.client = client
        self.path = path
        self.signature: tuple[int, int, int, int] | None = None
        self.config: DiskConfig | None = None
        self.config_version = 0
        self.state = DiskState.NONE
        self.message = "no config"
        self.since = time.time()
        self.last_access: float | None = None  # wall clock, for people
        self.used_mono = -math.inf  # last access or config change, monotonic
        self.wanted_mono = -math.inf  # last lookup that found it not ready: mount it first
        self.session: GuestSession | None = None
        self.queued = False  # waiting in the manager's queue
        self.launching = False  # in a batch being launched or mounted
        self.solo = False  # its last shared launch failed: next time it launches alone
        self.failures = 0
        self.next_retry: float | None = None
        self.retryable = False
        self.attach_seconds: float | None = None
        self._changed = trio.Event()

    @property
    def attaching(self) -> bool:
        return self.queued or self.launching

    @property
    def appliance(self) -> Appliance | None:
        return self.session.appliance if self.session is not None else None

    def set_state(self, state: DiskState, message: str) -> None:
        if (state, message) != (self.state, self.message):
            level = logging.WARNING if state is DiskState.FAILED else logging.INFO
            log.log(level, "disk state client=%s state=%s message=%r", self.client,
                    state.value, message)
            if state != self.state:
                self.since = time.time()
            self.state, self.message = state, message
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def touch(self) -> None:
        self.last_access = time.time()
        self.used_mono = _now()

    def configured(self, config: DiskConfig | None) -> None:
        """A new config (or none): whatever was attached or under way belongs to the old."""
        self.config = config
        self.config_version += 1
        self.failures = 0
        self.next_retry = None
        self.queued = self.launching = False
        if config is not None:
            self.used_mono = _now()

    def enqueue(self) -> None:
        self.queued = True
        self.set_state(DiskState.ATTACHING, f"queued ({self.config.url if self.config else ''})")

    def seen(self, signature: tuple[int, int, int, int] | None) -> None:
        self.signature = signature

    def wanted(self) -> None:
        """A lookup is waiting for this disk: mount it before its batch neighbours."""
        self.wanted_mono = _now()

    def unqueued(self) -> None:
        self.queued = False

    def taken(self) -> None:
        """Taken off the queue into a batch."""
        self.queued = False
        self.launching = True

    def retry_alone(self) -> None:
        """Its shared launch failed: out of that batch; the next launch is its own."""
        self.solo = True
        self.launching = False

    def take_session(self) -> GuestSession | None:
        s, self.session = self.session, None
        return s

    def attached(self, session: GuestSession, seconds: float) -> None:
        self.launching = False
        self.session = session
        self.failures = 0
        self.next_retry = None
        self.solo = False
        self.attach_seconds = seconds
        self.used_mono = max(self.used_mono, _now())  # idle counts from here
        self.set_state(DiskState.READY, f"attached in {seconds:.1f} s "
                       f"(appliance {session.appliance.id if session.appliance else '?'})")

    def fail(self, message: str, *, retryable: bool, retry_min: float = 10.0,
             retry_max: float = 300.0, immediate: bool = False) -> None:
        self.failures += 1
        self.queued = self.launching = False
        self.retryable = retryable
        if retryable:
            delay = 0.0 if immediate and self.failures == 1 else min(
                retry_max, retry_min * 2 ** max(0, self.failures - 1))
            self.next_retry = _now() + delay
        else:
            self.next_retry = None
        self.set_state(DiskState.FAILED, message)

    def stop_retries(self) -> None:
        self.next_retry = None

    def root_node(self) -> Node:
        cfg = self.config
        source = f"{cfg.url}#{cfg.tftp_root}" if cfg else "nbd://"
        return Node(kind=Kind.DIR, size=0, mtime_ns=0, layer="disk", source=source,
                    version=("disk-pending",))


class DiskSource:
    """The disk layer's `SessionSource`: asks the manager, which decides."""

    def __init__(self, manager: DiskManager, disk: Disk) -> None:
        self.manager = manager
        self.disk = disk

    async def session(self, *, lookup: bool) -> GuestSession:
        return await self.manager.session_for(self.disk, lookup=lookup)

    def broken(self, session: GuestSession, error: BaseException) -> None:
        self.manager.broken(self.disk, session, error)

    def peek(self) -> GuestSession | None:
        return self.manager.peek(self.disk)

    def gone(self) -> bool:
        return self.disk.config is None

    def root_node(self) -> Node:
        return self.disk.root_node()


class DiskManager:
    """Every client disk of one source root; see the module docstring."""

    #: Called once per finished attach attempt: (client, seconds, error message or None).
    on_attach_result: Callable[[str, float, str | None], None] | None = None

    def __init__(self, source_root: pathlib.Path, options: DiskOptions) -> None:
        self.source_root = pathlib.Path(source_root)
        self.options = options
        self.disks: dict[str, Disk] = {}
        self.layers: dict[str, GuestLayer] = {}
        self.appliances: set[Appliance] = set()
        self.accelerator: accel.Accelerator | None = None
        self.on_attach_result = None
        self._nursery: trio.Nursery | None = None
        self._launches = trio.CapacityLimiter(options.max_launches)
        self._queue: list[Disk] = []
        self._queue_changed = trio.Event()
        self._closing: set[Appliance] = set()
        self._notify_send, self._notify_recv = trio.open_memory_channel[str](math.inf)

    # --- the interface the daemon uses ---------------------------------------------------

    def layer_for(self, client: str) -> Layer | None:
        """The disk layer of `client`, or None without a usable `SRC/<client>.nbd`."""
        if not is_client_name(client):
            return None
        disk = self.disks.get(client)
        if disk is None or _signature(self._path(client)) != disk.signature:
            disk = self.reload(client)
        if disk is None or disk.config is None:
            return None
        return self.layers[client]

    def notify_config(self, client: str) -> None:
        """`SRC/<client>.nbd` changed in some way; re-read it soon (debounced)."""
        if is_client_name(client):
            self._notify_send.send_nowait(client)

    def status(self) -> dict[str, dict]:
        """`{client: {"state": <str>, ...}}` for every known disk (shape in docs/disks.md)."""
        now = _now() if self._nursery is not None else None
        return {client: self._disk_status(d, now) for client, d in sorted(self.disks.items())}

    def _disk_status(self, d: Disk, now: float | None) -> dict[str, Any]:
        s = d.session
        a = d.appliance
        entry: dict[str, Any] = {
            "state": d.state.value,
            "message": d.message,
            "since": round(d.since, 3),
            "last_access": round(d.last_access, 3) if d.last_access else None,
            "url": str(d.config.url) if d.config else None,
            "appliance": a.id if a is not None else None,
            "appliance_memory_mb": self.options.appliance_memory,
            "appliance_rss_mb": None,
            "failures": d.failures,
            "next_retry_in": None,
            "attach_seconds": round(d.attach_seconds, 2) if d.attach_seconds else None,
            "snapshot_age_s": None,
            "open_transfers": 0,
        }
        if s is not None and s.alive and a is not None:
            rss = a.rss_mb()
            entry["appliance_rss_mb"] = round(rss, 1) if rss else None
            entry["snapshot_age_s"] = round(s.age(), 1)
            entry["open_transfers"] = s.open_readers
        if d.state is DiskState.FAILED and d.next_retry is not None and now is not None:
            entry["next_retry_in"] = round(max(0.0, d.next_retry - now), 1)
        return entry

    def appliance_status(self) -> list[dict[str, Any]]:
        """Every appliance with its disks and memory, oldest first."""
        return [a.status() for a in sorted(self.appliances, key=lambda a: int(a.id[1:]))]

    def status_summary(self) -> dict[str, Any]:
        """What `vfsroot status` shows first, small whatever the fleet size."""
        states: dict[str, int] = {}
        for d in self.disks.values():
            states[d.state.value] = states.get(d.state.value, 0) + 1
        acc = self.accelerator
        return {
            "disks": len(self.disks),
            "pages": max(1, math.ceil(len(self.disks) / STATUS_PAGE)),
            "page_size": STATUS_PAGE,
            "states": states,
            "accelerator": acc.name if acc else None,
            "accelerator_reason": acc.reason if acc else "not decided yet",
            "appliances": self.appliance_status(),
            "memory_mb": round(sum(a.memory_mb() for a in self.appliances), 1),
            "max_memory_mb": self.options.max_memory,
            "queued": len(self._queue),
        }

    def status_page(self, page: int) -> dict[str, dict]:
        """Clients `page * STATUS_PAGE` ... of the sorted status, messages cut short, so one
        page always fits an xattr (the whole status of a big fleet does not)."""
        now = _now() if self._nursery is not None else None
        clients = sorted(self.disks)[page * STATUS_PAGE:(page + 1) * STATUS_PAGE]
        out = {}
        for c in clients:
            entry = self._disk_status(self.disks[c], now)
            if len(entry["message"]) > STATUS_MESSAGE_MAX:
                entry["message"] = entry["message"][:STATUS_MESSAGE_MAX - 3] + "..."
            out[c] = entry
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work until cancelled; detaches everything on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._scan()  # every configured disk is queued now (proactive)
                nursery.start_soon(self._notify_loop)
                nursery.start_soon(self._sweeper)
                nursery.start_soon(self._poll_loop)
                nursery.start_soon(self._batcher)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                for disk in self.disks.values():
                    disk.take_session()
                async with trio.open_nursery() as closer:
                    for a in list(self.appliances | self._closing):
                        closer.start_soon(a.close)
                self.appliances.clear()
                self._closing.clear()
                log.info("disks detached: all")

    # --- the layer's side (through DiskSource) -----------------------------------------------

    async def session_for(self, disk: Disk, *, lookup: bool) -> GuestSession:
        opts = self.options
        quiet_for = _now() - disk.used_mono
        disk.touch()
        ready: GuestSession | None = None
        with trio.move_on_after(opts.attach_wait):
            while True:
                s = disk.session
                if s is not None and not s.alive:
                    self.broken(disk, s, OSError(s.io_error or "appliance died"))
                    s = None
                if s is not None and disk.state is DiskState.READY:
                    ready = s
                    break
                if disk.config is None:
                    raise DiskGone(errno.ENOENT, f"disk of {disk.client}: {disk.message}")
                if (disk.state is DiskState.FAILED and not disk.attaching
                        and disk.next_retry is not None):
                    wait = max(0.0, disk.next_retry - _now())
                    raise LayerUnavailable(f"disk of {disk.client} failed: {disk.message}; "
                                           f"retry in {wait:.0f} s")
                disk.wanted()
                self._want(disk)
                await disk.wait_changed()
        if ready is not None:
            # Outside the wait bound: a remount takes ~2 s under TCG and must not be cut.
            if lookup:
                await self._maybe_refresh(disk, ready, quiet_for)
            return ready
        raise LayerUnavailable(f"disk of {disk.client} is still attaching "
                               f"({disk.config.url if disk.config else 'no config'}); "
                               "try again shortly")

    async def _maybe_refresh(self, disk: Disk, s: GuestSession, quiet_for: float) -> None:
        opts = self.options
        if quiet_for >= opts.refresh_quiet:
            min_age = opts.refresh_quiet
        elif s.age() >= opts.max_staleness:
            min_age = opts.max_staleness
        else:
            return
        try:
            await s.refresh(min_age=min_age)
        except GuestProcessError as e:
            self.broken(disk, s, e)
            raise LayerUnavailable(f"disk of {disk.client}: {e.strerror}") from e
        except OSError as e:
            # The remount failed: the client repartitioned or reformatted.  Re-attach.
            self.broken(disk, s, e)
            raise LayerUnavailable(f"disk of {disk.client}: refresh failed: {e}") from e

    def peek(self, disk: Disk) -> GuestSession | None:
        s = disk.session
        if s is not None and s.alive and disk.state is DiskState.READY:
            return s
        if disk.config is not None and not disk.attaching and disk.state is not DiskState.FAILED:
            disk.touch()
            self._want(disk)
        return None

    def broken(self, disk: Disk, session: GuestSession, error: BaseException) -> None:
        """A session stopped working.  If its appliance died, all of that appliance's disks go
        back to attach; otherwise (EIO on this disk's connection) only this one."""
        if session is not disk.session:
            return
        a = session.appliance
        if a is not None and not a.alive:
            self._appliance_died(a, f"appliance failed: "
                                 f"{getattr(error, 'strerror', None) or error}")
            return
        self._retire(disk, f"disk failed: {error}")
        self._fail(disk, f"disk failed: {getattr(error, 'strerror', None) or error}",
                   immediate=True)

    def _appliance_died(self, a: Appliance, message: str) -> None:
        log.warning("appliance died appliance=%s disks=%s", a.id, sorted(a.members))
        for d in self.disks.values():
            if d.session is not None and d.session.appliance is a:
                self._retire(d, message)
                self._fail(d, message, immediate=True)
        self.appliances.discard(a)
        self._closing.add(a)
        if self._nursery is not None:
            self._nursery.start_soon(self._close_appliance, a)

    def _fail(self, disk: Disk, message: str, *, retryable: bool = True,
              immediate: bool = False) -> None:
        self._dequeue(disk)
        disk.fail(message, retryable=retryable, retry_min=self.options.retry_min,
                  retry_max=self.options.retry_max, immediate=immediate)

    # --- configs --------------------------------------------------------------------------

    def _path(self, client: str) -> pathlib.Path:
        return self.source_root / f"{client}{DISK_CONFIG_SUFFIX}"

    def reload(self, client: str) -> Disk | None:
        """Read `SRC/<client>.nbd` again and act on what changed.  Synchronous: a config is
        one small local file."""
        disk = self.disks.get(client)
        path = self._path(client)
        sig = _signature(path)
        if disk is None:
            if sig is None:
                return None
            disk = self.disks[client] = Disk(client, path)
            self.layers[client] = GuestLayer(DiskSource(self, disk), client)
        if sig == disk.signature and disk.signature is not None:
            return disk
        disk.seen(sig)
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
            self._dequeue(disk)
            disk.configured(None)
            self._retire(disk, "config deleted" if error is None else "config invalid")
            if error is None:
                disk.set_state(DiskState.NONE, "config deleted")
            else:
                log.error("disk config error client=%s error=%r", client, error)
                disk.fail(f"config error: {error}", retryable=False)
            return disk
        if config == disk.config and (disk.attaching or disk.session is not None):
            return disk
        changed = disk.config is not None
        self._dequeue(disk)
        disk.configured(config)
        self._retire(disk, "config changed" if changed else "config appeared")
        log.info("disk config client=%s url=%s %s", client, config.url,
                 "changed" if changed else "found")
        self._want(disk)  # proactive: the client is probably about to boot
        return disk

    async def _scan(self) -> None:
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
            if disk is None or _signature(self._path(client)) != disk.signature:
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

    # --- the queue and batches --------------------------------------------------------------

    def _want(self, disk: Disk) -> None:
        """Queue an attach of `disk` unless one is under way or it is attached."""
        if disk.attaching or disk.config is None or disk.session is not None:
            return
        disk.enqueue()
        self._queue.append(disk)
        self._queue_changed.set()

    def _dequeue(self, disk: Disk) -> None:
        if disk.queued:
            self._queue = [d for d in self._queue if d is not disk]

    async def _batcher(self) -> None:
        """Take batches off the queue, one launch slot each."""
        if self.accelerator is None:
            self.accelerator = await accel.choose(self.options.force_tcg,
                                                  self.options.kvm_timeout,
                                                  self.options.appliance_memory)
        first = True  # the start's batch is whole already: every config was queued at once
        while True:
            while not self._queue:
                self._queue_changed = trio.Event()
                await self._queue_changed.wait()
            token = object()
            await self._launches.acquire_on_behalf_of(token)
            try:
                if not first and len(self._queue) < self.options.disks_per_appliance:
                    await trio.sleep(self.options.batch_window)  # let the batch fill
                first = False
                batch = self._take_batch()
                if not batch:
                    self._launches.release_on_behalf_of(token)
                    continue
                await self._make_room(batch)
            except BaseException:
                self._launches.release_on_behalf_of(token)
                raise
            assert self._nursery is not None
            self._nursery.start_soon(self._run_batch, batch, token)

    def _take_batch(self) -> list[Disk]:
        """The oldest queued disks, up to `disks_per_appliance` (fewer if memory is short);
        a disk that must launch alone (LVM volume names clash between clones of one image, or
        its last shared launch failed) goes alone."""
        size = self.options.disks_per_appliance
        while size > 1 and estimate_mb(size, self.options.appliance_memory) > \
                self.options.max_memory:
            size -= 1
        batch: list[Disk] = []
        rest: list[Disk] = []
        for d in self._queue:
            alone = d.solo or _has_lv(d)
            if d.config is None:
                d.unqueued()
            elif alone and not batch:
                batch = [d]
                size = 1
            elif len(batch) < size and not alone:
                batch.append(d)
            else:
                rest.append(d)
        self._queue = rest
        for d in batch:
            d.taken()
        return batch

    async def _make_room(self, batch: list[Disk]) -> None:
        """Wait until an appliance for `batch` fits in memory and under the appliance cap,
        closing the least recently used appliance whose disks are all idle."""
        need = estimate_mb(len(batch), self.options.appliance_memory)
        while True:
            used = sum(a.memory_mb() for a in self.appliances)
            if (len(self.appliances) < self.options.max_appliances
                    and (used + need <= self.options.max_memory or not self.appliances)):
                return
            victim = self._evictable()
            if victim is not None:
                log.info("appliance evicted appliance=%s for=%s", victim.id, batch[0].client)
                self.appliances.discard(victim)  # no longer counted; closes when unmounted
                self._closing.add(victim)
                for d in self.disks.values():
                    if d.appliance is victim:
                        self._retire(d, "evicted (memory)")
                        d.set_state(DiskState.DETACHED,
                                    f"evicted to make room for {batch[0].client}")
                continue
            for d in batch:
                d.set_state(DiskState.ATTACHING, "waiting for memory (every appliance busy)")
            await trio.sleep(1)

    def _evictable(self) -> Appliance | None:
        now = _now()
        best: tuple[float, Appliance] | None = None
        for a in self.appliances:
            disks = [d for d in self.disks.values() if d.appliance is a]
            if any(d.session is not None and d.session.open_readers for d in disks):
                continue
            last = max((d.used_mono for d in disks), default=-math.inf)
            if now - last < EVICT_MIN_IDLE:
                continue
            if best is None or last < best[0]:
                best = (last, a)
        return best[1] if best else None

    async def _run_batch(self, batch: list[Disk], token: object) -> None:
        """Probe, launch one appliance for `batch`, mount each disk (most wanted first)."""
        t0 = _now()
        versions = {d: d.config_version for d in batch}
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._launches.release_on_behalf_of(token)

        def current(d: Disk) -> bool:
            return d.config is not None and d.config_version == versions[d]

        try:
            batch = await self._probe(batch, t0, versions)
            if not batch:
                return
            a = Appliance(self._attach_options(), label=f"appliance({len(batch)} disks)")
            self.appliances.add(a)
            for d in batch:
                d.set_state(DiskState.ATTACHING,
                            f"launching appliance {a.id} with {len(batch)} disk(s)")
            log.info("appliance launching appliance=%s disks=%s", a.id,
                     ",".join(d.client for d in batch))
            try:
                info = await a.launch([drive_spec(d.client, d.config) for d in batch
                                       if d.config is not None])
            except (OSError, GuestProcessError) as e:
                release()
                self.appliances.discard(a)
                with trio.CancelScope(shield=True):
                    await a.close()
                await self._launch_failed(batch, versions, t0, e)
                return
            release()
            log.info("appliance launched appliance=%s seconds=%.1f qemu_pid=%s added=%d "
                     "failed=%d kernel=%r", a.id, info.get("launch_s", 0), info.get("qemu_pid"),
                     len(info.get("added", [])), len(info.get("failed", {})),
                     info.get("kernel"))
            for d in batch:
                if d.client in info.get("failed", {}) and current(d):
                    self._finish(d, t0, f"attach failed: {info['failed'][d.client][1]}")
            pending = [d for d in batch if d.client in a.members]
            while pending:
                # The client that asked last is the one waiting now: mount it first.
                d = max(pending, key=lambda d: d.wanted_mono)
                pending.remove(d)
                if not current(d):
                    self._report(d.client, t0, "abandoned: config changed")
                    await a.release(d.client)
                    continue
                if not a.alive:
                    self._finish(d, t0, "attach failed: appliance died while mounting",
                                 immediate=True)
                    continue
                assert d.config is not None
                session = GuestSession(d.client, d.config, a.options, appliance=a,
                                       disk_id=d.client)
                try:
                    await session.mount()
                except GuestProcessError as e:
                    self._finish(d, t0, f"attach failed: {e.strerror or e}", immediate=True)
                    continue
                except OSError as e:
                    await a.release(d.client)
                    if current(d):
                        self._finish(d, t0, f"attach failed: {e.strerror or e}")
                    continue
                if not current(d):
                    self._report(d.client, t0, "abandoned: config changed")
                    await a.release(d.client)
                    continue
                d.attached(session, _now() - t0)
                self._report(d.client, t0, None)
                log.info("disk attached client=%s url=%s appliance=%s seconds=%.1f "
                         "mount_s=%.2f", d.client, d.config.url, a.id, _now() - t0,
                         session.info.get("mount_s", 0))
            if not a.members:
                await self._close_appliance(a)
        finally:
            release()
            for d in batch:
                # (a disk whose config changed may be in a newer batch by now: not ours)
                if d.launching and current(d):
                    self._finish(d, t0, "attach failed: interrupted")

    async def _probe(self, batch: list[Disk], t0: float, versions: dict[Disk, int]
                     ) -> list[Disk]:
        """Connect to every disk's server at once; the unreachable ones fail alone, before
        they can cost the others a launch."""
        results: dict[Disk, str | None] = {}

        async def one(d: Disk) -> None:
            assert d.config is not None
            results[d] = await _reachable(d.config.url.server, d.config.url.protocol)

        async with trio.open_nursery() as n:
            for d in batch:
                if d.config is not None:
                    n.start_soon(one, d)
        ok = []
        for d in batch:
            error = results.get(d)
            if d.config is None or d.config_version != versions[d]:
                self._report(d.client, t0, "abandoned: config changed")
            elif error is not None:
                self._finish(d, t0, f"attach failed: {error}")
            else:
                ok.append(d)
        return ok

    async def _launch_failed(self, batch: list[Disk], versions: dict[Disk, int], t0: float,
                             e: BaseException) -> None:
        """A shared launch failed: probe again; the disks whose server went away fail, the
        rest are queued once more, alone next time if the batch had already been retried."""
        message = f"attach failed: {getattr(e, 'strerror', None) or e}"
        log.warning("appliance launch failed disks=%s error=%r",
                    ",".join(d.client for d in batch), message)
        if len(batch) == 1:
            self._finish(batch[0], t0, message)
            return
        for d in batch:
            if d.config is None or d.config_version != versions[d]:
                self._report(d.client, t0, "abandoned: config changed")
                continue
            error = await _reachable(d.config.url.server, d.config.url.protocol)
            if error is not None:
                self._finish(d, t0, f"attach failed: {error}")
            elif d.solo:
                self._finish(d, t0, message)
            else:
                d.retry_alone()  # one retry with the others; alone after that
                self._report(d.client, t0, message)
                self._want(d)

    def _finish(self, d: Disk, t0: float, message: str, immediate: bool = False) -> None:
        self._fail(d, message, immediate=immediate)
        self._report(d.client, t0, message)

    def _report(self, client: str, t0: float, error: str | None) -> None:
        hook = self.on_attach_result
        if hook is not None:
            try:
                hook(client, _now() - t0, error)
            except Exception:
                log.exception("on_attach_result hook failed")

    def _attach_options(self) -> Any:
        opts = self.options.attach_options()
        if self.accelerator is not None and self.accelerator.force_tcg:
            opts.force_tcg = True
        return opts

    # --- detach -----------------------------------------------------------------------------

    def _retire(self, disk: Disk, reason: str) -> None:
        """Stop handing out the disk's session; unmount it once its transfers are done."""
        s = disk.take_session()
        if s is None:
            return
        log.info("disk detaching client=%s reason=%r", disk.client, reason)
        if self._nursery is not None:
            self._nursery.start_soon(self._close_when_idle, s)

    async def _close_when_idle(self, s: GuestSession) -> None:
        with trio.move_on_after(self.options.call_timeout):
            while s.open_readers and s.alive:
                await trio.sleep(0.2)
        a = s.appliance
        with trio.CancelScope(shield=True):
            await s.close()
            if a is not None:
                await a.release(s.disk_id)
                if not a.members:
                    await self._close_appliance(a)

    async def _close_appliance(self, a: Appliance) -> None:
        self.appliances.discard(a)
        self._closing.add(a)
        with trio.CancelScope(shield=True):
            await a.close()
        self._closing.discard(a)
        log.info("appliance closed appliance=%s", a.id)

    async def _sweeper(self) -> None:
        """Idle detach, retries with backoff, dead appliances and broken disks, twice a second."""
        while True:
            await trio.sleep(0.5)
            now = _now()
            for a in list(self.appliances):
                if a.launched_at is not None and not a.alive:
                    self._appliance_died(a, a.death)
            for disk in list(self.disks.values()):
                idle_for = now - disk.used_mono
                s = disk.session
                if s is not None and s.io_error is not None and disk.state is DiskState.READY:
                    # A read failed with EIO (its NBD connection broke: qemu does not
                    # reconnect): say so now and re-attach, not at the next lookup.
                    self.broken(disk, s, OSError(errno.EIO, s.io_error))
                    continue
                if (s is not None and disk.state is DiskState.READY and s.open_readers == 0
                        and idle_for >= self.options.idle_timeout):
                    self._retire(disk, "idle")
                    disk.set_state(DiskState.DETACHED, f"idle for {idle_for:.0f} s")
                elif (disk.state is DiskState.FAILED and disk.retryable and not disk.attaching
                      and disk.next_retry is not None and now >= disk.next_retry):
                    if idle_for < self.options.idle_timeout:
                        self._want(disk)
                    else:
                        disk.stop_retries()  # nobody wants it: retry at the next lookup
                        log.info("disk retries stopped client=%s reason=idle", disk.client)


def _has_lv(d: Disk) -> bool:
    return d.config is not None and any(m.lv for m in d.config.mounts)


async def _reachable(server: str, protocol: str) -> str | None:
    """None if `server` (libguestfs syntax) looks usable, else why not.  An NBD server greets
    first ("NBDMAGIC", in both handshake styles of the NBD protocol document), so one that
    accepts connections but never speaks (a hung server, a wrong port) is caught here too,
    instead of hanging a shared launch until `--attach-timeout`.  An iSCSI target speaks only
    after the initiator's login: for those, the TCP connection is the probe."""
    kind = "iSCSI target" if protocol == "iscsi" else "NBD server"
    where = server.split(":", 1)[1]

    def connect() -> str | None:
        if server.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(PROBE_TIMEOUT)
            try:
                s.connect(where)
            except BaseException:
                s.close()
                raise
        else:
            host, _, port = where.rpartition(":")
            s = socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT)
        with s:
            if protocol != "nbd":
                return None
            greeting = b""
            try:
                while len(greeting) < 8:
                    chunk = s.recv(8 - len(greeting))
                    if not chunk:
                        break
                    greeting += chunk
            except TimeoutError:
                return (f"{kind} {where} accepted the connection but sent no NBD greeting "
                        f"(timed out after {PROBE_TIMEOUT:g} s)")
            if greeting != b"NBDMAGIC":
                return f"{kind} {where} does not speak NBD (greeting {greeting!r})"
        return None

    try:
        return await trio.to_thread.run_sync(connect)
    except OSError as e:
        return f"{kind} {where} unreachable: {e.strerror or e}"


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()
