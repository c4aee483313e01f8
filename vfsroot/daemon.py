"""`vfsroot serve`: wiring, mountpoint hygiene, signals, readiness.

One trio nursery holds everything: the FUSE loop, the source watcher, the disk manager and
the signal handler.  The mount is made only after the source root and the mountpoint checked
out, READY=1 is sent only once the kernel has the mount, and the unmount runs in a `finally`
so that SIGTERM, SIGINT and crashes alike leave no dead mount behind.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import systemd
from .defaults import DEFAULT_MOUNT, FUSE_TASKS
from .errors import QuietError
from .exporter import MetricsAddress, MetricsError, MetricsServer, bind_metrics
from .fs import VfsOperations
from .metrics import VfsrootCollector
from .mountinfo import mounted_fstype
from .sources import SourceRoot
from .watch import SourceWatcher

log = logging.getLogger(__name__)

FUSE_DEVICE = Path("/dev/fuse")

#: Exit codes (documented in docs/configuration.md).
EXIT_SOURCE = 3
EXIT_MOUNT_BUSY = 4
EXIT_NO_FUSE = 5
EXIT_MOUNT_FAILED = 6
EXIT_METRICS = 7


@dataclass
class ServeOptions:
    source: Path
    mount: Path = DEFAULT_MOUNT
    disks: Any = None  # DiskManager, when client disks are enabled
    metrics: MetricsAddress | None = None  # --metrics HOST:PORT; None: off
    fuse_tasks: int = FUSE_TASKS  # --fuse-tasks


def check_source(source: Path) -> None:
    if not source.exists():
        raise QuietError(f"source root {source} does not exist", EXIT_SOURCE)
    if not source.is_dir():
        raise QuietError(f"source root {source} is not a directory", EXIT_SOURCE)
    if not (source / "default").is_dir():
        log.warning("source root has no default/ directory: unknown clients see an empty tree "
                    "source=%s", source)


def check_fuse() -> None:
    if not FUSE_DEVICE.exists():
        raise QuietError(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or, in a container, "
            "pass the device in", EXIT_NO_FUSE)
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise QuietError("/dev/fuse is not readable and writable by this user", EXIT_NO_FUSE)


def unmount(mountpoint: Path) -> bool:
    """Lazily unmount whatever FUSE left at `mountpoint`; True if something was unmounted."""
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                return True
        except (OSError, subprocess.TimeoutExpired):
            continue
    return False


#: How long a FUSE mount found at the mountpoint may take to answer before it counts as hung.
PROBE_TIMEOUT = 5.0


def _probe_fuse(mountpoint: Path) -> int | None:
    """List a FUSE mount; None if it answered, else the errno (ETIMEDOUT if it hangs).

    `os.stat` is not enough: the kernel answers it from its attribute cache for a while after
    the daemon died.  A directory listing always goes to the daemon.
    """
    result: list[int | None] = []

    def probe() -> None:
        try:
            os.listdir(mountpoint)
            result.append(None)
        except OSError as e:
            result.append(e.errno)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT)
    return result[0] if result else errno.ETIMEDOUT


def _clean_stale(mountpoint: Path) -> None:
    log.warning("stale FUSE mount left by a killed daemon, unmounting mountpoint=%s", mountpoint)
    if not unmount(mountpoint):
        raise QuietError(f"mountpoint {mountpoint} has a dead FUSE mount that could not be "
                         f"unmounted (try: fusermount3 -u -z {mountpoint})", EXIT_MOUNT_BUSY)


def prepare_mountpoint(mountpoint: Path) -> None:
    """Make the mountpoint usable: create it, clean a stale mount, refuse a live one."""
    fstype = mounted_fstype(mountpoint)
    if fstype is not None and fstype.startswith("fuse"):
        err = _probe_fuse(mountpoint)
        if err in (errno.ENOTCONN, errno.ECONNABORTED):
            _clean_stale(mountpoint)
            return
        if err == errno.ETIMEDOUT:
            raise QuietError(f"mountpoint {mountpoint} is busy: {fstype} is mounted there and "
                             f"does not answer (a hung daemon?)", EXIT_MOUNT_BUSY)
    if fstype is not None:
        hint = " (another vfsroot is running?)" if "vfsroot" in fstype else ""
        raise QuietError(f"mountpoint {mountpoint} is busy: {fstype} is mounted there{hint}",
                         EXIT_MOUNT_BUSY)
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        mountpoint.mkdir(parents=True, exist_ok=True)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise QuietError(f"mountpoint {mountpoint}: {e.strerror}", EXIT_MOUNT_BUSY) from None
        _clean_stale(mountpoint)
        return
    if not mountpoint.is_dir():
        raise QuietError(f"mountpoint {mountpoint} is not a directory", EXIT_MOUNT_BUSY)


def mount_options() -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"ro", "allow_other", "fsname=vfsroot", "subtype=vfsroot"}
    return options


async def serve(
    options: ServeOptions, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Mount the client views and serve until cancelled, unmounted or signalled."""
    check_source(options.source)
    check_fuse()
    prepare_mountpoint(options.mount)
    disks = options.disks
    source = SourceRoot(options.source, disks)
    ops = VfsOperations(source, disks)

    def on_config(client: str) -> None:
        if disks is not None:
            disks.notify_config(client)

    watcher = SourceWatcher(
        options.source,
        on_path=ops.invalidate,
        on_client=ops.invalidate_client,
        on_config=on_config,
    )
    endpoint = _start_metrics(options, source, ops)
    try:
        await _serve_mounted(options, ops, watcher, task_status)
    finally:
        if endpoint is not None:
            endpoint.close()


def _start_metrics(options: ServeOptions, source: SourceRoot,
                   ops: VfsOperations) -> MetricsServer | None:
    """Bind and start the /metrics endpoint (before the mount: a busy port leaves nothing)."""
    if options.metrics is None:
        return None
    collector = VfsrootCollector(source, ops, options.disks, trio.lowlevel.current_trio_token())
    try:
        return bind_metrics(options.metrics, [collector], "vfsroot").start()
    except MetricsError as e:
        raise QuietError(str(e), EXIT_METRICS) from None


async def _serve_mounted(options: ServeOptions, ops: VfsOperations, watcher: SourceWatcher,
                         task_status: trio.TaskStatus[Path]) -> None:
    disks = options.disks
    async with trio.open_nursery() as nursery:
        if disks is not None:
            await nursery.start(disks.run)
        await nursery.start(watcher.run)
        try:
            pyfuse3.init(ops, str(options.mount), mount_options())
        except RuntimeError as e:
            raise QuietError(f"cannot mount {options.mount}: {e} (see the FUSE message above)",
                             EXIT_MOUNT_FAILED) from None
        try:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            log.info("mounted source=%s mount=%s", options.source, options.mount)
            systemd.notify("READY=1\nSTATUS=serving " + str(options.mount))
            task_status.started(options.mount)
            await pyfuse3.main(max_tasks=options.fuse_tasks)
            log.info("FUSE loop ended mount=%s", options.mount)
        finally:
            with trio.CancelScope(shield=True):
                systemd.notify("STOPPING=1")
                try:
                    pyfuse3.close(unmount=True)
                except Exception:
                    log.exception("unmount failed mount=%s", options.mount)
                log.info("unmounted mount=%s", options.mount)
            nursery.cancel_scope.cancel()


#: After SIGTERM, requests in flight get this long before they are cancelled.
STOP_GRACE = 5.0


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    """Stop the FUSE loop gracefully on SIGTERM/SIGINT; cancel it if it does not stop."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: nothing to reload, the source root is watched live")
                continue
            log.info("signal=%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            await trio.sleep(STOP_GRACE)
            log.warning("FUSE loop did not stop within %.0fs, cancelling", STOP_GRACE)
            scope.cancel()
            return
