"""One libguestfs appliance (a worker process and its qemu) hosting many client disks.

Why many: a launch costs 25-45 s and ~450 MiB under TCG, and each further drive in the same
appliance costs ~30 MiB and no launch (32 drives: one 29 s launch, 1.4 GiB, measured here).
Drives can only be added before `launch()`, so the disks of an appliance are fixed when it
starts; a disk that leaves (idle, evicted, config changed, its NBD connection broken) is
unmounted and forgotten, and the appliance closes when its last disk has left.

This module owns the appliance's life and its memory figures; which disks go into which
appliance, and when, is `vfsroot.disks.DiskManager`'s business.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any

from .guest_process import AttachOptions, GuestProcess, rss_mb

#: Estimated resident memory of an appliance before it is measured: qemu and the guest
#: kernel, plus per drive (its qcow2 overlay, caches, page cache of boot files).  Measured
#: here under TCG with the default 512 MiB (bench/fleet.py, daemon and workers included):
#: 442 MiB for one disk, 592 MiB for 32; the per-drive figure keeps a margin for page cache.
BASE_MB = 480.0
PER_DISK_MB = 10.0
#: RSS is read from /proc at most this often per appliance (status of big fleets stays cheap).
RSS_CACHE_S = 1.0

_ids = itertools.count(1)


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie (a dead qemu stays one until libguestfs reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def estimate_mb(disks: int, memsize_mb: int = 512) -> float:
    """Memory an appliance of `disks` drives is expected to use before it is measured."""
    return BASE_MB * memsize_mb / 512 + PER_DISK_MB * max(0, disks - 1)


class Appliance:
    """A launched (or launching) appliance: its process, its member disks, its memory."""

    def __init__(self, options: AttachOptions, label: str = "") -> None:
        self.id = f"a{next(_ids)}"
        self.options = options
        self.process = GuestProcess(label or f"appliance {self.id}", options)
        #: Disk ids launched in it that have not left yet.
        self.members: set[str] = set()
        self.drives = 0
        self.info: dict[str, Any] = {}
        self.launched_at: float | None = None  # wall clock, for people
        self._rss: tuple[float, float | None] = (-RSS_CACHE_S, None)

    async def launch(self, drives: list[dict[str, Any]]) -> dict[str, Any]:
        """Add `drives` and launch.  Returns the worker's answer: `added` ids, `failed` {id:
        (errno, message)} for drives whose server could not be opened.  Raises OSError /
        GuestProcessError when the launch itself fails (the process is killed then)."""
        self.drives = len(drives)
        info = await self.process.start(drives)
        self.info = info
        self.members = set(info.get("added", []))
        if not info.get("launched"):
            await self.process.kill()
        else:
            self.launched_at = time.time()
        return info

    async def call(self, op: str, *args: Any, what: str | None = None) -> Any:
        return await self.process.call(op, *args, what=what)

    async def release(self, disk_id: str) -> None:
        """The disk leaves: unmount it (best effort: a dead appliance has nothing mounted)."""
        if disk_id not in self.members:
            return
        self.members.discard(disk_id)
        if self.alive and self.members:
            # A GuestProcessError has killed it then; the others' sessions notice.
            with contextlib.suppress(OSError):
                await self.process.call("unmount", disk_id, what="unmount")

    @property
    def alive(self) -> bool:
        """The worker answers and its qemu runs (a killed qemu leaves the worker alive, and
        libguestfs notices only at the next call: do not wait for one)."""
        if not self.process.alive:
            return False
        pid = self.qemu_pid
        return pid is None or _running(pid)

    @property
    def death(self) -> str:
        """Why the appliance is dead, for the status of its disks: the call that timed out
        (and got it killed) when that is what happened."""
        reason = self.process.dead_reason
        return f"appliance killed: {reason}" if reason and reason != "closed" else \
            "appliance died (worker or qemu exited)"

    @property
    def qemu_pid(self) -> int | None:
        return self.process.qemu_pid

    def rss_mb(self) -> float | None:
        """Measured resident memory of the appliance's qemu (cached for `RSS_CACHE_S`)."""
        now = time.monotonic()
        at, value = self._rss
        if now - at >= RSS_CACHE_S:
            value = rss_mb(self.qemu_pid) if self.alive else None
            self._rss = (now, value)
        return value

    def memory_mb(self) -> float:
        """What the appliance counts against `--max-memory`: its measured RSS (re-read, so
        page cache that grows is counted), or the estimate while it launches."""
        rss = self.rss_mb()
        return rss if rss else estimate_mb(self.drives or 1, self.options.memsize_mb)

    async def close(self) -> None:
        self.members.clear()
        await self.process.close()

    def status(self) -> dict[str, Any]:
        rss = self.rss_mb()
        return {
            "id": self.id,
            "alive": self.alive,
            "disks": sorted(self.members),
            "drives": self.drives,
            "rss_mb": round(rss, 1) if rss else None,
            "memory_mb": round(self.memory_mb(), 1),
            "launched_at": round(self.launched_at, 3) if self.launched_at else None,
            "launch_s": round(self.info["launch_s"], 2) if self.info.get("launch_s") else None,
            "qemu_pid": self.qemu_pid,
        }
