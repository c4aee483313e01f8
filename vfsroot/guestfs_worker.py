"""The libguestfs side of a client disk: one worker process per disk, one handle per process.

This is the only module that imports `guestfs`, and only inside the worker process, so the
daemon, the layers and the tests import without it.

Why a process and not a thread: `launch()` boots a qemu appliance and can hang forever (nested
KVM does on some hosts, this one included).  A thread stuck in C cannot be stopped; a process
can be killed, with its qemu.  The parent (`vfsroot.guest.GuestProcess`) bounds every call and
kills this process (and its descendants) on timeout.

Protocol on stdin/stdout: frames of a 4-byte big-endian length and a pickle.  Requests are
`(op, args)`; replies `("ok", value)` or `("err", errno, message)`.  Pickle is fine here: both
ends are this package, over a private pipe.

Everything the worker returns is already resolved inside the *guest* tree: symlinks (absolute
ones against the guest root, never the host's), loops (ELOOP), escapes above the guest root
(ENOENT, i.e. None), names that are not UTF-8 (skipped, reported as warnings).  The guest view
is a snapshot: results are cached until `refresh`, which remounts so the appliance re-reads
what the live client wrote through the NBD server.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import stat
import struct
import sys
import tempfile
import time
from typing import Any

from vfsroot.fileio import read_exact

#: libguestfs refuses single preads above its message limit (4 MiB); 2 MiB is safe and large.
PREAD_CHUNK = 2 * 1024 * 1024
#: lstatnslist/readlinklist batches: large enough to list a /boot in one round trip, small
#: enough to stay far below the protocol's message limit.
LIST_BATCH = 1000
MAX_SYMLINKS = 40
#: lstat results remembered per snapshot before the cache starts over.
MAX_CACHED = 100_000

#: Mount options per filesystem type.  Read-only always; ext3/4 and xfs must not replay their
#: journal (a live client's disk usually has a dirty one); the overlay absorbs anything else.
MOUNT_OPTIONS = {
    "ext2": "ro",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery",
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


class Worker:
    """State of one disk inside the worker process."""

    def __init__(self) -> None:
        self.g: Any = None
        self.spec: dict[str, Any] = {}
        self.devices: list[tuple[str, str, str, str]] = []  # (device, mountpoint, options, label)
        self.warnings: list[str] = []
        self._lstat: dict[str, dict | None] = {}
        self._link: dict[str, str] = {}
        self._scratch: Any = None

    # --- life -------------------------------------------------------------------------------

    def attach(self, spec: dict[str, Any]) -> dict[str, Any]:
        try:
            import guestfs  # noqa: PLC0415  (lazy: only the worker needs it)
        except ImportError as e:
            raise GuestError(errno.ENOSYS, f"python3-guestfs is not importable by "
                             f"{sys.executable} ({e}); install python3-guestfs and run "
                             "vfsroot from a venv made with --system-site-packages") from None
        self.spec = spec
        g = guestfs.GuestFS(python_return_dict=True)
        self.g = g
        if spec.get("memsize"):
            g.set_memsize(int(spec["memsize"]))
        # force_tcg arrives through LIBGUESTFS_BACKEND_SETTINGS (the parent sets it):
        # set_backend_setting("force_tcg", "") segfaults at launch with Debian 12's 1.48.
        if spec.get("scratch"):
            # `vfsroot check`: a launch without network.  (add_drive_scratch segfaults in
            # Debian 12's binding at launch, so an empty sparse file instead.)
            self._scratch = tempfile.NamedTemporaryFile(prefix="vfsroot-check-")  # noqa: SIM115
            self._scratch.truncate(int(spec["scratch"]))
            self._scratch.flush()
            g.add_drive_opts(self._scratch.name, format="raw", readonly=True)
        else:
            # readonly=True creates the qcow2 overlay right here, and qemu-img connects to
            # the NBD server to do it: an unreachable server fails (or hangs) in this call.
            try:
                g.add_drive_opts(spec["export"], format="raw", readonly=True, protocol="nbd",
                                 server=[spec["server"]])
            except RuntimeError as e:
                raise self._nbd_error(e) from None
        t0 = time.monotonic()
        try:
            g.launch()
        except RuntimeError as e:
            if spec.get("scratch"):
                raise
            raise self._nbd_error(e, launching=True) from None
        launched = time.monotonic() - t0
        self._mount_all(first=True)
        return {"launch_s": launched, "mount_s": time.monotonic() - t0 - launched,
                "qemu_pid": g.get_pid(), "mounts": self.devices}

    def _nbd_error(self, e: RuntimeError, launching: bool = False) -> GuestError:
        """libguestfs says "qemu-img exited with error status 1"; say what is wrong."""
        server = self.spec["server"]
        where = server.split(":", 1)[1]
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
                              f"NBD server {where} unreachable: {reason}")
        if launching:
            return GuestError(errno_of(e), f"appliance launch failed: {_one_line(str(e))}")
        return GuestError(errno_of(e), f"NBD server {where} is reachable but the disk could "
                          f"not be opened (export {self.spec['export']!r}?): "
                          f"{_one_line(str(e))}")

    def _device_for(self, m: dict[str, Any]) -> str:
        g = self.g
        if m.get("lv"):
            dev = "/dev/" + m["lv"]
            lvs = g.lvs()
            if dev not in lvs:
                raise GuestError(errno.ENOENT, f"logical volume {m['lv']} not found on the disk "
                                 f"(found: {', '.join(lvs) or 'none'})")
            return dev
        disk = g.list_devices()[0]
        n = m["partition"]
        if n == 0:
            return disk
        for part in g.list_partitions():
            if g.part_to_dev(part) == disk and g.part_to_partnum(part) == n:
                return part
        found = [str(g.part_to_partnum(p)) for p in g.list_partitions()]
        raise GuestError(errno.ENOENT, f"partition {n} does not exist on the disk "
                         f"(partitions: {', '.join(found) or 'none'})")

    def _mount_all(self, first: bool) -> None:
        g = self.g
        if first:
            self.devices = []
            for m in self.spec["mounts"]:
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
        for dev, mountpoint, opts, label in self.devices:
            try:
                g.mount_options(opts, dev, mountpoint)
            except RuntimeError as e:
                raise GuestError(errno_of(e), f"mounting {label} ({dev}) at {mountpoint}: "
                                 f"{e}") from None
        self._lstat.clear()
        self._link.clear()

    def refresh(self) -> dict[str, Any]:
        """Remount everything so the next answers reflect what the client wrote since."""
        g = self.g
        t0 = time.monotonic()
        g.umount_all()
        for dev in {d for d, *_ in self.devices}:
            g.blockdev_flushbufs(dev)
        g.drop_caches(3)
        self._mount_all(first=False)
        return {"mount_s": time.monotonic() - t0}

    def close(self) -> None:
        if self.g is not None:
            try:
                self.g.shutdown()
            finally:
                self.g.close()
                self.g = None

    # --- resolution -----------------------------------------------------------------------

    def _lstat_path(self, path: str) -> dict | None:
        if path in self._lstat:
            return self._lstat[path]
        if len(self._lstat) >= MAX_CACHED:
            self._lstat.clear()
            self._link.clear()
        try:
            st = self.g.lstatns(path)
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
                self._link[path] = self.g.readlink(path)
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
                stats = self.g.lstatnslist(real, batch)
            except RuntimeError as e:
                raise GuestError(errno_of(e), str(e)) from None
            links = [n for n, s in zip(batch, stats, strict=True)
                     if s["st_ino"] != -1 and stat.S_ISLNK(s["st_mode"])]
            if links:
                try:
                    targets = self.g.readlinklist(real, links)
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
            entries = self.g.readdir(real)
            return [e["name"] for e in entries if e["name"] not in (".", "..")]
        except UnicodeDecodeError:
            pass  # some name is not UTF-8: list raw bytes instead, and skip those names
        except RuntimeError as e:
            raise GuestError(errno_of(e), str(e)) from None
        with tempfile.NamedTemporaryFile(prefix="vfsroot-ls0-") as tmp:
            try:
                self.g.ls0(real, tmp.name)
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
                return self.g.pread(path, count, at)
            except RuntimeError as e:
                raise GuestError(errno_of(e), str(e)) from None
        return read_exact(one, size, offset, chunk=PREAD_CHUNK)


def _one_line(text: str) -> str:
    """libguestfs' launch errors come with a paragraph of advice: keep the first line, for
    the log and `vfsroot status`."""
    return text.strip().splitlines()[0] if text.strip() else text


def _read_frame(stream: Any) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (length,) = struct.unpack(">I", head)
    body = stream.read(length)
    if len(body) < length:
        return None
    return pickle.loads(body)


def _write_frame(stream: Any, value: Any) -> None:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def main() -> int:
    """Serve requests from the parent until it closes the pipe or says "close"."""
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    # Nothing else may write to the protocol stream (libguestfs debug output goes to stderr).
    sys.stdout = sys.stderr
    worker = Worker()
    ops = {"attach": worker.attach, "lookup": worker.lookup, "listdir": worker.listdir,
           "pread": worker.pread, "refresh": worker.refresh, "ping": lambda: "pong"}
    try:
        while True:
            req = _read_frame(stdin)
            if req is None or req[0] == "close":
                break
            op, args = req
            try:
                reply = ("ok", ops[op](*args))
            except GuestError as e:
                reply = ("err", e.errno, _one_line(str(e)))
            except RuntimeError as e:
                reply = ("err", errno_of(e), _one_line(str(e)))
            except Exception as e:  # a bug here must be an answer, not a silent worker
                reply = ("err", errno.EIO, f"{type(e).__name__}: {e}")
            _write_frame(stdout, reply)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
