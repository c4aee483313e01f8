"""The guest worker's symlink resolution (`GuestDisk.resolve`), against a fake libguestfs handle.

What a client's own disk holds is the client's to decide (a live client writes it), so guest
links are hostile input: they must resolve inside the *guest* tree, never the host's, and the
walk must end (ELOOP) whatever the links do.
"""

from __future__ import annotations

import errno
import stat

import pytest

from vfsroot.guestfs_worker import MAX_SYMLINKS, GuestDisk, GuestError

DIR, FILE = "dir", "file"


#: Where the disk is mounted inside the (shared) appliance: every call must stay under it.
PREFIX = "/disks/d0"


def _disk_path(path: str) -> str:
    assert path == PREFIX or path.startswith(PREFIX + "/"), f"left the disk's tree: {path}"
    return path[len(PREFIX):] or "/"


class FakeGuestFS:
    """lstatns/readlink over a dict: path -> "dir" | "file" | ("link", target), the disk
    mounted at PREFIX in the appliance (as the worker mounts every disk of a batch)."""

    def __init__(self, tree: dict[str, object]) -> None:
        self.tree = {"/": DIR, **tree}
        self.calls: list[str] = []

    def lstatns(self, path: str) -> dict:
        path = _disk_path(path)
        self.calls.append(path)
        kind = self.tree.get(path)
        if kind is None:
            raise RuntimeError(f"lstatns: {path}: No such file or directory")
        mode = {DIR: stat.S_IFDIR | 0o755, FILE: stat.S_IFREG | 0o644}.get(
            kind, stat.S_IFLNK | 0o777)  # type: ignore[arg-type]
        return {"st_mode": mode, "st_size": 7, "st_dev": 1, "st_ino": hash(path) & 0xFFFF,
                "st_mtime_sec": 1, "st_mtime_nsec": 0, "st_ctime_sec": 1, "st_ctime_nsec": 0}

    def readlink(self, path: str) -> str:
        kind = self.tree[_disk_path(path)]
        assert isinstance(kind, tuple)
        return kind[1]


def worker(tree: dict[str, object]) -> GuestDisk:
    return GuestDisk(FakeGuestFS(tree), drive={"id": "d0"}, label="test", prefix=PREFIX,
                     partitions=dict)


TREE: dict[str, object] = {
    "/boot": DIR,
    "/boot/vmlinuz-6.1": FILE,
    "/boot/grub": DIR,
    "/etc": DIR,
    "/etc/shadow": FILE,
    "/vmlinuz-root": FILE,
    "/boot/abs": ("link", "/boot/vmlinuz-6.1"),
    "/boot/rel": ("link", "vmlinuz-6.1"),
    "/boot/up": ("link", "../vmlinuz-root"),
    "/boot/escape-rel": ("link", "../../../../host-etc/passwd"),
    "/boot/escape-just-above": ("link", "../.."),
    "/boot/abs-out": ("link", "/etc/shadow"),
    "/boot/dotdot-abs": ("link", "/../../etc/shadow"),
    "/boot/self": ("link", "self"),
    "/boot/ping": ("link", "pong"),
    "/boot/pong": ("link", "ping"),
    "/boot/empty": ("link", ""),
    "/boot/dir": ("link", "grub"),
    "/boot/root": ("link", "/"),
    "/boot/through-file": ("link", "vmlinuz-6.1/../vmlinuz-6.1"),
    "/boot/slashes": ("link", "//boot///./vmlinuz-6.1"),
}


@pytest.mark.parametrize("components, real", [
    (["boot", "abs"], "/boot/vmlinuz-6.1"),
    (["boot", "rel"], "/boot/vmlinuz-6.1"),
    (["boot", "up"], "/vmlinuz-root"),  # may leave tftp_root, stays in the guest (docs)
    (["boot", "abs-out"], "/etc/shadow"),  # documented: inside the guest is allowed
    (["boot", "dir"], "/boot/grub"),
    (["boot", "root"], "/"),
    (["boot", "slashes"], "/boot/vmlinuz-6.1"),
])
def test_links_resolve_inside_the_guest(components: list[str], real: str) -> None:
    found = worker(TREE).resolve(components)
    assert found is not None and found[0] == real


@pytest.mark.parametrize("components", [
    ["boot", "escape-rel"],  # climbs above the guest root: "not found", not the host's /
    ["boot", "escape-just-above"],
    ["boot", "dotdot-abs"],  # the kernel would clamp /.. to /; vfsroot calls it an escape
    ["boot", "empty"],
    ["boot", "missing"],
    ["boot", "vmlinuz-6.1", "x"],  # a file in the middle of a path
])
def test_escapes_and_nothing_are_none(components: list[str]) -> None:
    w = worker(TREE)
    assert w.resolve(components) is None
    assert all(not p.startswith("/host-etc") for p in w.g.calls), w.g.calls


@pytest.mark.parametrize("name", ["self", "ping"])
def test_loops_end_with_eloop(name: str) -> None:
    with pytest.raises(GuestError) as info:
        worker(TREE).resolve(["boot", name])
    assert info.value.errno == errno.ELOOP


def test_long_chain_is_bounded() -> None:
    tree: dict[str, object] = {f"/l{i}": ("link", f"l{i + 1}") for i in range(MAX_SYMLINKS + 5)}
    tree[f"/l{MAX_SYMLINKS + 5}"] = FILE
    with pytest.raises(GuestError) as info:
        worker(tree).resolve(["l0"])
    assert info.value.errno == errno.ELOOP
    ok = {f"/l{i}": ("link", f"l{i + 1}") for i in range(MAX_SYMLINKS)}
    ok[f"/l{MAX_SYMLINKS}"] = FILE
    found = worker(ok).resolve(["l0"])
    assert found is not None and found[0] == f"/l{MAX_SYMLINKS}"


def test_wide_link_fanout_does_not_explode() -> None:
    """Each link expands to many components that are links again (a "billion laughs" of
    symlinks): the walk must stay bounded by MAX_SYMLINKS, not by the expansion."""
    tree: dict[str, object] = {"/d": DIR}
    for i in range(10):
        tree[f"/d/x{i}"] = ("link", "/".join(["."] * 50 + [f"x{i + 1}"]))
    tree["/d/x10"] = FILE
    w = worker(tree)
    found = w.resolve(["d", "x0"])
    assert found is not None and found[0] == "/d/x10"
    assert len(w.g.calls) < 200


def test_dotdot_after_a_file_is_enotdir_like_the_kernel() -> None:
    assert worker(TREE).resolve(["boot", "through-file"]) is None
