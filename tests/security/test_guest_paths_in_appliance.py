"""Paths the appliance's kernel resolves itself, not `GuestDisk.resolve`.

Many clients' disks share one appliance, each under its own prefix (`/0`, `/1`, ...) of the
appliance's sysroot.  `GuestDisk.resolve` confines guest symlinks to the disk's own prefix,
but two calls hand a *path* to guestfsd, whose kernel follows symlinks in it:

* `mount_options(opts, dev, "/0/boot")`: mount(8) follows a symlink there, so a client whose
  own root filesystem has `/boot -> ../1/boot` would mount its boot partition over *another
  client's* tree.  Refused before the mount (a link on the way) and after it (where the
  kernel says it landed, for a disk that changed in between).
* `pread("/0/boot/vmlinuz")`: guestfsd opens the path in the whole sysroot, following links.
  The live client rewrites its disk, and once the appliance re-reads it, a component
  swapped for a link into `/1/...` would read the next client's file.  Refused after the
  read (`realpath`).

The fake below resolves paths the way the appliance's kernel does (all of the appliance's
sysroot, symlinks followed).
"""

from __future__ import annotations

import errno
import posixpath
import stat

import pytest

from vfsroot.guestfs_worker import GuestDisk, GuestError

DIR, FILE = "dir", "file"


class KernelLikeGuestFS:
    """The appliance's sysroot as a dict: path -> "dir" | ("file", bytes) | ("link", target).

    lstatns/readlink do not follow the last component (like guestfsd); pread and the mount
    target follow every symlink, absolute ones against the sysroot (guestfsd's chroot)."""

    def __init__(self, tree: dict[str, object]) -> None:
        self.tree: dict[str, object] = {"/": DIR, **tree}
        self.mount_targets: list[str] = []
        self.mounts: dict[str, str] = {}  # device -> where the kernel mounted it

    # -- what the kernel does with a path ---------------------------------------------------
    def _follow(self, path: str, depth: int = 0) -> str:
        assert depth < 40
        parts = [p for p in path.split("/") if p]
        cur = "/"
        for i, part in enumerate(parts):
            nxt = posixpath.normpath(posixpath.join(cur, part))
            kind = self.tree.get(nxt)
            if isinstance(kind, tuple) and kind[0] == "link":
                target = kind[1]
                base = "/" if target.startswith("/") else cur
                rest = "/".join(parts[i + 1:])
                return self._follow(posixpath.normpath(posixpath.join(base, target, rest)),
                                    depth + 1)
            cur = nxt
        return cur

    def _stat(self, kind: object) -> dict:
        if kind == DIR:
            mode, size = stat.S_IFDIR | 0o755, 0
        elif isinstance(kind, tuple) and kind[0] == "file":
            mode, size = stat.S_IFREG | 0o644, len(kind[1])
        else:
            mode, size = stat.S_IFLNK | 0o777, 1
        return {"st_mode": mode, "st_size": size, "st_dev": 1, "st_ino": 7,
                "st_mtime_sec": 1, "st_mtime_nsec": 0, "st_ctime_sec": 1, "st_ctime_nsec": 0}

    # -- the guestfs calls GuestDisk makes ------------------------------------------------
    def lstatns(self, path: str) -> dict:
        parent, name = posixpath.split(path)
        real = posixpath.join(self._follow(parent), name) if path != "/" else "/"
        kind = self.tree.get(real)
        if kind is None:
            raise RuntimeError(f"lstatns: {path}: No such file or directory")
        return self._stat(kind)

    def readlink(self, path: str) -> str:
        parent, name = posixpath.split(path)
        kind = self.tree[posixpath.join(self._follow(parent), name)]
        assert isinstance(kind, tuple) and kind[0] == "link"
        return kind[1]

    def pread(self, path: str, count: int, offset: int) -> bytes:
        kind = self.tree.get(self._follow(path))
        if not (isinstance(kind, tuple) and kind[0] == "file"):
            raise RuntimeError(f"open: {path}: No such file or directory")
        return kind[1][offset:offset + count]

    def vfs_type(self, dev: str) -> str:
        return "ext4"

    def realpath(self, path: str) -> str:
        return self._follow(path)

    def mount_options(self, opts: str, dev: str, mountpoint: str) -> None:
        real = self._follow(mountpoint)
        if self.tree.get(real) != DIR:
            raise RuntimeError(f"mount: {mountpoint}: No such file or directory")
        self.mount_targets.append(real)
        self.mounts[dev] = real

    def mountpoints(self) -> dict[str, str]:
        return dict(self.mounts)

    def umount(self, mountpoint: str) -> None:
        self.mounts = {d: m for d, m in self.mounts.items() if m != mountpoint}


class SwapsAtMount(KernelLikeGuestFS):
    """The disk changes between the worker's check and the mount: `/0/boot` is a directory
    when looked at, a link when mounted on."""

    def __init__(self, tree: dict[str, object], link: str) -> None:
        super().__init__(tree)
        self.link = link

    def mount_options(self, opts: str, dev: str, mountpoint: str) -> None:
        if mountpoint == "/0/boot":
            self.tree["/0/boot"] = ("link", self.link)
        super().mount_options(opts, dev, mountpoint)


def _disk(g: KernelLikeGuestFS, prefix: str = "/0") -> GuestDisk:
    d = GuestDisk(g, drive={"id": "10.0.0.5"}, label="vfsrootA", prefix=prefix,
                  partitions=lambda: {"/dev/sda": {1: "/dev/sda1", 2: "/dev/sda2"}})
    d.device = "/dev/sda"
    return d


#: Client 10.0.0.6's disk, mounted at /1 of the same appliance.
OTHER_DISK: dict[str, object] = {
    "/1": DIR,
    "/1/boot": DIR,
    "/1/boot/vmlinuz": ("file", b"client 6 kernel"),
    "/1/etc": DIR,
    "/1/etc/shadow": ("file", b"root:client-6-secret-hash"),
}


@pytest.mark.parametrize("link", ["../1/boot", "../1"])  # relative: mount(8) runs unchrooted
def test_a_mountpoint_that_is_a_guest_symlink_never_mounts_over_another_disk(link: str) -> None:
    """Config `mounts: [{partition 2 at /}, {partition 1 at /boot}]` (the documented
    example); the client's own root filesystem has `/boot -> <link>`."""
    g = KernelLikeGuestFS({**OTHER_DISK, "/0": DIR, "/0/boot": ("link", link)})
    disk = _disk(g)
    mounts = [{"partition": 2, "lv": None, "mountpoint": "/", "label": "partition 2"},
              {"partition": 1, "lv": None, "mountpoint": "/boot", "label": "partition 1"}]
    with pytest.raises(GuestError, match="symlink"):
        disk.mount_first(mounts)
    outside = [t for t in g.mount_targets if not (t == "/0" or t.startswith("/0/"))]
    assert not outside, f"client 10.0.0.5's partition was mounted on {outside} (another disk)"
    assert g.mounts == {}  # the root filesystem mounted first is taken down with the disk


def test_a_mount_that_lands_on_another_disk_after_all_is_undone_and_refused() -> None:
    g = SwapsAtMount({**OTHER_DISK, "/0": DIR, "/0/boot": DIR}, "../1/boot")
    disk = _disk(g)
    mounts = [{"partition": 2, "lv": None, "mountpoint": "/", "label": "partition 2"},
              {"partition": 1, "lv": None, "mountpoint": "/boot", "label": "partition 1"}]
    with pytest.raises(GuestError, match="landed on /1/boot"):
        disk.mount_first(mounts)
    assert g.mount_targets == ["/0", "/1/boot"]  # it did land there for a moment...
    assert g.mounts == {}  # ...and nothing of it is left, on either disk


def test_a_plain_layout_mounts_where_it_says() -> None:
    g = KernelLikeGuestFS({**OTHER_DISK, "/0": DIR, "/0/boot": DIR})
    disk = _disk(g)
    disk.mount_first([
        {"partition": 2, "lv": None, "mountpoint": "/", "label": "partition 2"},
        {"partition": 1, "lv": None, "mountpoint": "/boot", "label": "partition 1"}])
    assert g.mounts == {"/dev/sda2": "/0", "/dev/sda1": "/0/boot"}
    assert disk.mounted == ["/0", "/0/boot"]


def test_pread_does_not_follow_a_file_swapped_for_a_link_into_another_disk() -> None:
    """The live client replaces its (already looked up) /boot/vmlinuz with a link into the
    next disk of the appliance; the worker's snapshot still says "regular file"."""
    g = KernelLikeGuestFS({**OTHER_DISK, "/0": DIR, "/0/boot": DIR,
                           "/0/boot/vmlinuz": ("file", b"client 5 kernel" + b"." * 40)})
    disk = _disk(g)
    node = disk.lookup(["boot", "vmlinuz"])
    assert node is not None and node[0] == "file"
    assert disk.pread(node[3], 0, 15) == b"client 5 kernel"  # the honest case reads
    g.tree["/0/boot/vmlinuz"] = ("link", "/1/etc/shadow")  # written by client 10.0.0.5
    with pytest.raises(GuestError) as refused:
        disk.pread(node[3], 0, node[1])
    assert refused.value.errno == errno.ESTALE
