"""The killable worker process behind every appliance.

`GuestProcess` starts `vfsroot.guestfs_worker` (one libguestfs handle, one appliance, many
disks: see `vfsroot.appliance`) in its own process group and talks to it over a pipe.  Every
call is bounded; on a timeout or cancellation the worker and everything it started (qemu,
libguestfs' recovery process) are killed, so a hung appliance launch costs a timeout, never a
stuck daemon.  Calls are serialised per process: a guestfs handle runs one call at a time
anyway, and the lock is the "one limiter per handle".

It knows nothing of disks or sessions, so `vfsroot.appliance` (which owns processes) and
`vfsroot.guest` (which owns per-disk sessions inside an appliance) both build on it without
importing each other in a circle.
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
from dataclasses import dataclass, field
from typing import Any

import trio

from .framing import FrameDecoder, encode

log = logging.getLogger(__name__)


class GuestProcessError(OSError):
    """The worker died, timed out or answered nonsense: the disk must be re-attached."""


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
                    # The reason is set before the kill's await: the disk's status is read
                    # meanwhile, and our own timeout must not show as a cancellation there.
                    self._dead = (f"{what or op} timed out after {timeout:g} s"
                                  if scope.cancel_called else f"{what or op} was cancelled")
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

    @property
    def dead_reason(self) -> str | None:
        """Why this process was given up ("remount timed out after 30 s", ...), if it was."""
        return self._dead

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
