"""The libguestfs side of client disks: one worker process per appliance, many disks in it.

This is the only module that imports `guestfs`, and only inside the worker process, so the
daemon, the layers and the tests import without it.

Why a process and not a thread: `launch()` boots a qemu appliance and can hang forever (nested
KVM does on some hosts, this one included).  A thread stuck in C cannot be stopped; a process
can be killed, with its qemu.  The parent (`vfsroot.guest_process.GuestProcess`) bounds every
call and kills this process (and its descendants) on timeout.

Protocol on stdin/stdout: frames (`vfsroot.framing`).  Requests are `(op, args)`; replies
`("ok", value)` or `("err", errno, message)`.

One appliance hosts many disks (a launch costs 10-45 s and ~450 MiB under TCG; each further
drive costs ~30 MiB and no launch).  `launch` adds every drive, each under a label, before the
one `launch()` (drives cannot be added later).  With `readonly=True`, `add_drive_opts` builds
the overlay with qemu-img, which connects to the server: an unreachable disk fails its own add,
is reported in the answer and left out, and the others launch.  Each disk is then mounted on
its own (`mount`, so the first one asked for is served before the rest of the batch) under a
mountpoint of its own, `/<n>`, made with `mkmountpoint` (which is why nothing here may use
`umount_all`).  Every later call names its disk; paths in answers are the disk's own.

Everything the worker returns is already resolved inside the *guest* tree: symlinks (absolute
ones against the guest root, never the host's), loops (ELOOP), escapes above the guest root
(ENOENT, i.e. None), names that are not UTF-8 (skipped, reported as warnings).  The guest view
is a snapshot: results are cached until `refresh`, which remounts so the appliance re-reads
what the live client wrote through the NBD server.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from vfsroot.fileio import read_exact
from vfsroot.framing import FrameDecoder, encode
from vfsroot.guest_kernel import fast_appliance
from vfsroot.guest_kernel import parts as appliance_parts

#: libguestfs refuses single preads above its message limit (4 MiB); 2 MiB is safe and large.
PREAD_CHUNK = 2 * 1024 * 1024
#: lstatnslist/readlinklist batches: large enough to list a /boot in one round trip, small
#: enough to stay far below the protocol's message limit.
LIST_BATCH = 1000
MAX_SYMLINKS = 40
#: lstat results remembered per snapshot before the cache starts over.
MAX_CACHED = 100_000
#: Room a new qcow2 overlay needs in libguestfs' temporary directory (it is created at ~200
#: KiB and grows only with writes, which a read-only mount does not make), with a margin.
OVERLAY_ROOM = 1024 * 1024

#: Mount options per filesystem type.  Read-only always; ext3/4 and xfs must not replay their
#: journal (a live client's disk usually has a dirty one); the overlay absorbs anything else.
MOUNT_OPTIONS = {
    "ext2": "ro",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    # nouuid: disks of a fleet cloned from one image share their XFS UUID, and XFS refuses
    # to mount a second filesystem with a UUID already mounted in the same kernel.
    "xfs": "ro,norecovery,nouuid",
    "vfat": "ro",
    "msdos": "ro",
    "btrfs": "ro,nologreplay",
}

_STRERRORS = {os.strerror(e): e for e in (
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EIO,
    errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL, errno.ENOMEM, errno.ENXIO, errno.ENODEV,
    errno.EROFS, errno.EBUSY, errno.ESTALE,
)}


class GuestError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def errno_of(e: BaseException) -> int:
    """guestfs raises only RuntimeError("op: path: strerror"); recover the errno if we can."""
    text = str(e)
    for msg, num in _STRERRORS.items():
        if text.endswith(msg):
            return num
    return errno.EIO


#: libguestfs names partitions of its (virtio-scsi) drives /dev/sd<letters><number>.
_PARTITION = re.compile(r"^(/dev/sd[a-z]+)([1-9][0-9]*)$")


def _label(index: int) -> str:
    """A drive label for libguestfs (letters only): 0 -> "vfsrootA", 27 -> "vfsrootBB"."""
    out = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        out = chr(ord("A") + r) + out
    return "vfsroot" + out


class Worker:
    """The appliance: one guestfs handle and the disks launched in it."""

    def __init__(self) -> None:
        self.g: Any = None
        self.disks: dict[str, GuestDisk] = {}
        self._scratch: Any = None
        self._partitions: dict[str, dict[int, str]] | None = None
        self._lvm_active = False

    def activate_lvm(self) -> None:
        """Activate every volume group, once per appliance, when a config first names an LV:
        the lean appliance's /init no longer does it at every launch (`vfsroot.guest_init`),
        and for the usual appliance, which did, it changes nothing."""
        if not self._lvm_active:
            self.g.vg_activate_all(True)
            self._lvm_active = True

    def partitions(self) -> dict[str, dict[int, str]]:
        """{device: {number: partition}} of every drive, listed once per appliance: under TCG
        each guest call costs tens of ms, and asking part_to_dev/part_to_partnum for every
        partition of 32 drives at every disk's mount took minutes (measured)."""
        if self._partitions is None:
            out: dict[str, dict[int, str]] = {}
            for part in self.g.list_partitions():
                m = _PARTITION.match(part)
                dev, num = (m.group(1), int(m.group(2))) if m else (
                    self.g.part_to_dev(part), self.g.part_to_partnum(part))
                out.setdefault(dev, {})[num] = part
            self._partitions = out
        return self._partitions

    def launch(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Add every drive of `spec["drives"]` (a failed add is that disk's error, reported,
        not the launch's), then launch once."""
        try:
            import guestfs  # noqa: PLC0415  (lazy: only the worker needs it)
        except ImportError as e:
            raise GuestError(errno.ENOSYS, f"python3-guestfs is not importable by "
                             f"{sys.executable} ({e}); install python3-guestfs and run "
                             "vfsroot from a venv made with --system-site-packages") from None
        g = guestfs.GuestFS(python_return_dict=True)
        self.g = g
        if spec.get("memsize"):
            g.set_memsize(int(spec["memsize"]))
        # Under TCG qemu keeps translated guest code in a cache of up to 1 GiB, keyed by
        # virtual address: with address-space randomisation every mount/blkid the appliance
        # runs (two per filesystem) is translated anew, and a 32-disk appliance's RSS grew by
        # ~15 MiB/s while mounting (measured).  Fixed addresses let those runs reuse it.
        g.set_append("norandmaps")
        kernel = "bzImage"
        if spec.get("fast_kernel", True):
            # The same appliance without its kernel's ~5 s self-decompression under TCG, and
            # without the initrd modules and /init scans vfsroot does not need.
            fixed = fast_appliance(g.get_cachedir(), g.get_path(),
                                   lean_initrd=spec.get("lean_initrd", True),
                                   lean_init=spec.get("lean_init", True))
            if fixed is not None:
                g.set_path(fixed)
                kernel = appliance_parts(fixed)
        # force_tcg arrives through LIBGUESTFS_BACKEND_SETTINGS (the parent sets it):
        # set_backend_setting("force_tcg", "") segfaults at launch with Debian 12's 1.48.
        failed: dict[str, tuple[int, str]] = {}
        added: list[str] = []
        if spec.get("scratch"):
            # `vfsroot check` and the KVM probe: a launch without network.  (add_drive_scratch
            # segfaults in Debian 12's binding at launch, so an empty sparse file instead.)
            self._scratch = tempfile.NamedTemporaryFile(prefix="vfsroot-check-")  # noqa: SIM115
            self._scratch.truncate(int(spec["scratch"]))
            self._scratch.flush()
            g.add_drive_opts(self._scratch.name, format="raw", readonly=True)
        for i, drive in enumerate(spec.get("drives", [])):
            label = _label(i)
            # readonly=True creates the qcow2 overlay right here, and qemu-img connects to
            # the server to do it: an unreachable server fails (or hangs) in this call.
            try:
                g.add_drive_opts(drive["export"], format="raw", readonly=True,
                                 protocol=drive["protocol"], server=[drive["server"]],
                                 label=label)
            except RuntimeError as e:
                err = _overlay_dir_error(g) or _server_error(drive, e)
                failed[drive["id"]] = (err.errno, _one_line(str(err)))
                continue
            self.disks[drive["id"]] = GuestDisk(g, drive, label, f"/{len(added)}",
                                                self.partitions, self.activate_lvm)
            added.append(drive["id"])
        if not added and not spec.get("scratch"):
            return {"launched": False, "added": [], "failed": failed}
        t0 = time.monotonic()
        try:
            g.launch()
        except RuntimeError as e:
            raise GuestError(errno_of(e), f"appliance launch failed: {_one_line(str(e))}"
                             ) from None
        launched = time.monotonic() - t0
        labels = g.list_disk_labels() if added else {}
        for disk in self.disks.values():
            disk.device = labels.get(disk.label, "")
            g.mkmountpoint(disk.prefix)
        return {"launched": True, "launch_s": launched, "qemu_pid": g.get_pid(),
                "added": added, "failed": failed, "kernel": kernel}

    def disk(self, disk_id: str) -> GuestDisk:
        try:
            return self.disks[disk_id]
        except KeyError:
            raise GuestError(errno.ENODEV, f"disk {disk_id} is not in this appliance") from None

    def mount(self, disk_id: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
        t0 = time.monotonic()
        self.disk(disk_id).mount_first(mounts)
        return {"mount_s": time.monotonic() - t0}

    def unmount(self, disk_id: str) -> None:
        """The disk leaves this appliance (detached, or moved to another); its drive stays in
        qemu until the appliance closes (the direct backend cannot unplug drives)."""
        disk = self.disks.pop(disk_id, None)
        if disk is not None:
            disk.umount()

    def close(self) -> None:
        if self.g is not None:
            try:
                self.g.shutdown()
            except RuntimeError:
                pass  # qemu is already gone (killed, or crashed): nothing to shut down
            finally:
                self.g.close()
                self.g = None


def _overlay_dir_error(g: Any) -> GuestError | None:
    """Why no overlay can be made in libguestfs' temporary directory, or None if one can.

    `add_drive_opts(readonly=True)` writes the disk's qcow2 overlay there; when that directory
    is full (or read-only), libguestfs reports only "qemu-img ... exited with error status 1",
    which `_server_error` would blame on the NBD export.  Writing `OVERLAY_ROOM` bytes there
    tells the real cause."""
    try:
        where = g.get_tmpdir()
    except RuntimeError:
        return None
    try:
        with tempfile.TemporaryFile(dir=where, prefix="vfsroot-room-") as f:
            f.write(b"\0" * OVERLAY_ROOM)
            f.flush()
    except OSError as e:
        return GuestError(e.errno or errno.EIO, f"cannot write the disk's overlay in {where} "
                          f"(LIBGUESTFS_TMPDIR, else TMPDIR): {e.strerror or e}")
    return None


def _server_error(drive: dict[str, Any], e: RuntimeError) -> GuestError:
    """libguestfs says "qemu-img exited with error status 1"; say what is wrong."""
    server = drive["server"]
    where = server.split(":", 1)[1]
    kind = "iSCSI target" if drive["protocol"] == "iscsi" else "NBD server"
    try:
        if server.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(where)
        else:
            host, _, port = where.rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as probe:
        reason = probe.strerror or str(probe)
        return GuestError(probe.errno or errno.EHOSTUNREACH,
                          f"{kind} {where} unreachable: {reason}")
    what = "target/LUN" if drive["protocol"] == "iscsi" else "export"
    return GuestError(errno_of(e), f"{kind} {where} is reachable but the disk could "
                      f"not be opened ({what} {drive['export']!r}?): {_one_line(str(e))}")


class GuestDisk:
    """One client disk inside the appliance: its drive, mounts and lookup caches."""

    def __init__(self, g: Any, drive: dict[str, Any], label: str, prefix: str,
                 partitions: Callable[[], dict[str, dict[int, str]]],
                 activate_lvm: Callable[[], None] = lambda: None) -> None:
        self.g = g
        self.partitions = partitions
        self.activate_lvm = activate_lvm
        self.drive = drive
        self.label = label
        self.prefix = prefix
        self.device = ""
        self.devices: list[tuple[str, str, str, str]] = []  # (device, mountpoint, options, label)
        self.mounted: list[str] = []  # appliance paths, in mount order
        self._lstat: dict[str, dict | None] = {}
        self._link: dict[str, str] = {}

    def _g(self, path: str) -> str:
        """The appliance path of the disk path `path`."""
        return self.prefix if path in ("", "/") else self.prefix + path

    def _device_for(self, m: dict[str, Any]) -> str:
        g = self.g
        if m.get("lv"):
            dev = "/dev/" + m["lv"]
            self.activate_lvm()
            lvs = g.lvs()
            if dev not in lvs:
                raise GuestError(errno.ENOENT, f"logical volume {m['lv']} not found on the disk "
                                 f"(found: {', '.join(lvs) or 'none'})")
            return dev
        disk = self.device
        if not disk:
            raise GuestError(errno.ENODEV, "the disk's drive is missing from the appliance")
        n = m["partition"]
        if n == 0:
            return disk
        parts = self.partitions().get(disk, {})
        if n in parts:
            return parts[n]
        found = [str(p) for p in sorted(parts)]
        raise GuestError(errno.ENOENT, f"partition {n} does not exist on the disk "
                         f"(partitions: {', '.join(found) or 'none'})")

    def mount_first(self, mounts: list[dict[str, Any]]) -> None:
        g = self.g
        self.devices = []
        for m in mounts:
            dev = self._device_for(m)
            try:
                fstype = g.vfs_type(dev)
            except RuntimeError as e:
                raise GuestError(errno_of(e), f"{m['label']}: no filesystem ({e})") from None
            opts = MOUNT_OPTIONS.get(fstype)
            if opts is None:
                raise GuestError(errno.EINVAL, f"{m['label']}: unsupported filesystem "
                                 f"{fstype or 'none'!r}")
            self.devices.append((dev, m["mountpoint"], opts, m["label"]))
        self._mount()

    def _mount(self) -> None:
        for dev, mountpoint, opts, label in self.devices:
            target = self._g(mountpoint)
            try:
                self._check_mountpoint(mountpoint, label)
                before = self._mountpoints()
                self.g.mount_options(opts, dev, target)
                landed = self._mountpoints() - before
                if landed != {target}:
                    for where in landed:
                        self.g.umount(where)
                    where = ", ".join(sorted(landed)) or "no path of the appliance's sysroot"
                    raise GuestError(errno.EACCES, f"{label} ({dev}) at {mountpoint}: the mount "
                                     f"landed on {where}, not on the disk's {mountpoint}: "
                                     "refused")
            except GuestError:
                self.umount()
                raise
            except RuntimeError as e:
                self.umount()
                raise GuestError(errno_of(e), f"mounting {label} ({dev}) at {mountpoint}: "
                                 f"{e}") from None
            self.mounted.append(target)
        self._forget_paths()

    def _forget_paths(self) -> None:
        """Drop the lookups of the disk's paths (lstat and readlink answers) together: one
        without the other would resolve a path from a stale half."""
        self._lstat.clear()
        self._link.clear()

    def _check_mountpoint(self, mountpoint: str, label: str) -> None:
        """Refuse a mountpoint with a symlink on the way, before mounting on it.

        The appliance mounts on a path, and mount(8) follows symlinks in it -- outside the
        guest tree, in the appliance, where the other clients' disks of this appliance are:
        a client that makes its own `/boot` a link to `../1/boot` would mount its partition
        over another client's tree.  So every component must be a plain directory (checked
        from the top, so each check's parents are checked ones), and `_mount` checks where the
        mount really landed afterwards (the disk can change in between)."""
        parts = [p for p in mountpoint.split("/") if p]
        for i in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:i])
            try:
                st = self.g.lstatns(self._g(path))
            except RuntimeError as e:
                raise GuestError(errno_of(e), f"{label} at {mountpoint}: {path} on the disk: "
                                 f"{e}") from None
            if stat.S_ISLNK(st["st_mode"]):
                raise GuestError(errno.EACCES, f"{label} at {mountpoint}: {path} on the disk "
                                 "is a symlink; a mountpoint must be a directory")
            if not stat.S_ISDIR(st["st_mode"]):
                raise GuestError(errno.ENOTDIR, f"{label} at {mountpoint}: {path} on the disk "
                                 "is not a directory")

    def _mountpoints(self) -> set[str]:
        """Where the appliance has filesystems mounted, as paths of its sysroot."""
        found = self.g.mountpoints()
        return set(found.values() if isinstance(found, dict) else (m for _, m in found))

    def umount(self) -> None:
        while self.mounted:
            self.g.umount(self.mounted.pop())

    def refresh(self) -> dict[str, Any]:
        """Remount this disk so the next answers reflect what the client wrote since; the
        other disks of the appliance are not touched."""
        g = self.g
        t0 = time.monotonic()
        self.umount()
        for dev in {d for d, *_ in self.devices}:
            g.blockdev_flushbufs(dev)
        g.drop_caches(3)
        self._mount()
        return {"mount_s": time.monotonic() - t0}

    # --- resolution (disk paths; `_g` maps them into the appliance) ---------------------

    def _lstat_path(self, path: str) -> dict | None:
        if path in self._lstat:
            return self._lstat[path]
        if len(self._lstat) >= MAX_CACHED:
            self._forget_paths()
        try:
            st = self.g.lstatns(self._g(path))
        except RuntimeError as e:
            err = errno_of(e)
            if err not in (errno.ENOENT, errno.ENOTDIR):
                raise GuestError(err, str(e)) from None
            st = None
        self._lstat[path] = st
        return st

    def _readlink(self, path: str) -> str:
        if path not in self._link:
            try:
                self._link[path] = self.g.readlink(self._g(path))
            except RuntimeError as e:
                raise GuestError(errno_of(e), str(e)) from None
        return self._link[path]

    def resolve(self, components: list[str]) -> tuple[str, dict] | None:
        """Follow `components` from the guest root, symlinks included, inside the guest tree.

        Returns (real path, stat) or None when nothing is there, including a symlink that
        climbs above the guest root (an escape is "not found", never the host's file).
        """
        todo = list(reversed(components))
        cur: list[str] = []
        st: dict | None = self._lstat_path("/")
        links = 0
        while todo:
            c = todo.pop()
            if st is None or not stat.S_ISDIR(st["st_mode"]):
                return None  # "file/x", "file/.", "file/..": ENOTDIR, as the kernel says
            if c in ("", "."):
                continue
            if c == "..":
                if not cur:
                    return None  # above the guest root: an escape
                cur.pop()
                st = self._lstat_path("/" + "/".join(cur))
                continue
            path = "/" + "/".join([*cur, c])
            st = self._lstat_path(path)
            if st is None:
                return None
            if stat.S_ISLNK(st["st_mode"]):
                links += 1
                if links > MAX_SYMLINKS:
                    raise GuestError(errno.ELOOP, f"too many levels of symbolic links at {path}")
                target = self._readlink(path)
                if not target:
                    return None
                if target.startswith("/"):
                    cur = []
                st = self._lstat_path("/" + "/".join(cur))
                todo.extend(reversed(target.split("/")))
                continue
            cur.append(c)
        return "/" + "/".join(cur), st  # type: ignore[return-value]

    def _node(self, real: str, st: dict) -> tuple | None:
        mode = st["st_mode"]
        if stat.S_ISDIR(mode):
            kind = "dir"
        elif stat.S_ISREG(mode):
            kind = "file"
        else:
            return None  # devices, fifos, sockets: nothing a boot client should fetch
        mtime_ns = st["st_mtime_sec"] * 1_000_000_000 + st["st_mtime_nsec"]
        ctime_ns = st["st_ctime_sec"] * 1_000_000_000 + st["st_ctime_nsec"]
        size = st["st_size"] if kind == "file" else 0
        return (kind, size, mtime_ns, real, (st["st_dev"], st["st_ino"], size, mtime_ns, ctime_ns))

    def lookup(self, components: list[str]) -> tuple | None:
        found = self.resolve(components)
        if found is None:
            return None
        return self._node(*found)

    def listdir(self, components: list[str]) -> tuple[dict[str, tuple], list[str]]:
        found = self.resolve(components)
        if found is None:
            raise GuestError(errno.ENOENT, "/" + "/".join(components) + ": no such directory")
        real, st = found
        if not stat.S_ISDIR(st["st_mode"]):
            raise GuestError(errno.ENOTDIR, f"{real}: not a directory")
        warnings: list[str] = []
        names = self._names(real, warnings)
        out: dict[str, tuple] = {}
        base = real.rstrip("/")
        for i in range(0, len(names), LIST_BATCH):
            batch = names[i:i + LIST_BATCH]
            try:
                stats = self.g.lstatnslist(self._g(real), batch)
            except RuntimeError as e:
                raise GuestError(errno_of(e), str(e)) from None
            links = [n for n, s in zip(batch, stats, strict=True)
                     if s["st_ino"] != -1 and stat.S_ISLNK(s["st_mode"])]
            if links:
                try:
                    targets = self.g.readlinklist(self._g(real), links)
                except RuntimeError as e:
                    raise GuestError(errno_of(e), str(e)) from None
                for n, t in zip(links, targets, strict=True):
                    self._link[f"{base}/{n}"] = t
            for n, s in zip(batch, stats, strict=True):
                child = f"{base}/{n}"
                if s["st_ino"] == -1:
                    continue  # vanished between readdir and lstat
                self._lstat[child] = s
                try:
                    node = self.lookup([*components, n]) if stat.S_ISLNK(s["st_mode"]) \
                        else self._node(child, s)
                except GuestError as e:
                    if e.errno != errno.ELOOP:
                        raise
                    warnings.append(f"{child}: symlink loop, not listed")
                    node = None
                if node is not None:
                    out[n] = node
        return out, warnings

    def _names(self, real: str, warnings: list[str]) -> list[str]:
        try:
            entries = self.g.readdir(self._g(real))
            return [e["name"] for e in entries if e["name"] not in (".", "..")]
        except UnicodeDecodeError:
            pass  # some name is not UTF-8: list raw bytes instead, and skip those names
        except RuntimeError as e:
            raise GuestError(errno_of(e), str(e)) from None
        with tempfile.NamedTemporaryFile(prefix="vfsroot-ls0-") as tmp:
            try:
                self.g.ls0(self._g(real), tmp.name)
            except RuntimeError as e:
                raise GuestError(errno_of(e), str(e)) from None
            raw = tmp.read()
        names = []
        for name in raw.split(b"\0"):
            if not name or name in (b".", b".."):
                continue
            try:
                names.append(name.decode("utf-8"))
            except UnicodeDecodeError:
                warnings.append(f"{real}/{name!r}: name is not UTF-8, skipped")
        return names

    def pread(self, path: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes from `offset`, fewer only at end of file."""
        def one(count: int, at: int) -> bytes:
            try:
                return self.g.pread(self._g(path), count, at)
            except RuntimeError as e:
                raise GuestError(errno_of(e), str(e)) from None
        data = read_exact(one, size, offset, chunk=PREAD_CHUNK)
        self._still_unlinked(path)
        return data

    def _still_unlinked(self, path: str) -> None:
        """Refuse what was just read from `path` if a symlink now lies on its way.

        `path` is resolved (`resolve`: no links left in it), but the appliance opens it in its
        whole sysroot, following links, where the other clients' disks of this appliance are
        too.  The live client may have replaced a component with a link since (into `/1/...`,
        the next disk), and once the appliance re-reads its disk (a cache drop, another
        disk's refresh) that read would be another client's file.  The kernel's own answer,
        `realpath` right after the read, finds any such link; then the read is refused and
        the snapshot forgotten.  (To be fooled it would take a link to appear and vanish
        again, both seen by the appliance, within one read.)"""
        want = self._g(path)
        try:
            real = self.g.realpath(want)
        except RuntimeError as e:
            raise GuestError(errno_of(e), str(e)) from None
        if real != want:
            self._forget_paths()
            raise GuestError(errno.ESTALE, f"{path} changed on the disk while it was read "
                             "(a link now on its way): refused; read again after a refresh")


def _one_line(text: str) -> str:
    """libguestfs' launch errors come with a paragraph of advice: keep the first line, for
    the log and `vfsroot status`."""
    return text.strip().splitlines()[0] if text.strip() else text


def main() -> int:
    """Serve requests from the parent until it closes the pipe or says "close"."""
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    stdin = sys.stdin.buffer.raw
    stdout = sys.stdout.buffer
    # Nothing else may write to the protocol stream (libguestfs debug output goes to stderr).
    sys.stdout = sys.stderr
    worker = Worker()

    def on_disk(name: str) -> Any:
        return lambda disk_id, *args: getattr(worker.disk(disk_id), name)(*args)

    ops = {"launch": worker.launch, "mount": worker.mount, "unmount": worker.unmount,
           "lookup": on_disk("lookup"), "listdir": on_disk("listdir"),
           "pread": on_disk("pread"), "refresh": on_disk("refresh"), "ping": lambda: "pong"}
    decoder = FrameDecoder()
    try:
        while True:
            while not decoder:
                try:
                    decoder.feed(stdin.read(1 << 20))
                except EOFError:
                    return 0
            op, args = decoder.pop()
            if op == "close":
                break
            try:
                reply = ("ok", ops[op](*args))
            except GuestError as e:
                reply = ("err", e.errno, _one_line(str(e)))
            except RuntimeError as e:
                reply = ("err", errno_of(e), _one_line(str(e)))
            except Exception as e:  # a bug here must be an answer, not a silent worker
                reply = ("err", errno.EIO, f"{type(e).__name__}: {e}")
            stdout.write(encode(reply))
            stdout.flush()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
