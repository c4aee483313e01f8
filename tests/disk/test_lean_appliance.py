"""The lean appliance's parts, without launching one: the newc reader/writer, the initrd that
keeps only the modules reaching the root (dependencies closed), the /init without the
storage scans (refused unless every line is found), the root image rewritten with debugfs
(a real ext2 image, read back by sha256), and `fast_appliance` putting them together with
supermin's own part as the fallback of each."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess

import pytest

from vfsroot import guest_init, guest_initrd, guest_kernel, newc

from .test_guest_kernel import PVH, _bzimage

#: A libguestfs-1.48-like /init (the lines lean_init removes, among others it keeps).
INIT = """#!/bin/bash
echo Starting /init script ...
$UDEVD --daemon #--debug
udevadm trigger
udevadm settle --timeout=600
mdadm -As --auto=yes --no-degraded
LVM_SYSTEM_DIR=/tmp/lvm
export LVM_SYSTEM_DIR
lvmetad
modprobe dm_mod ||:
lvm pvscan --cache --activate ay
mdadm -As --auto=yes --run
ldmtool create all
guestfsd
"""

#: name -> depends of the fake modules (file names as supermin writes them).
MODULES = {
    "scsi_common.ko": "", "scsi_mod.ko": "scsi_common", "crct10dif_common.ko": "",
    "crc-t10dif.ko": "crct10dif_common", "crc64.ko": "", "crc64-rocksoft.ko": "crc64",
    "t10-pi.ko": "crc-t10dif,crc64-rocksoft", "sd_mod.ko": "scsi_mod,t10-pi",
    "libata.ko": "scsi_mod,scsi_common", "ata_piix.ko": "libata",
    "virtio_ring.ko": "", "virtio.ko": "virtio_ring", "virtio_net.ko": "virtio_ring,virtio",
    "virtio_blk.ko": "virtio,virtio_ring",
    "virtio_console.ko": "virtio,virtio_ring", "virtio_scsi.ko": "scsi_mod,virtio_ring,virtio",
    "virtio_pci_legacy_dev.ko": "", "virtio_pci_modern_dev.ko": "",
    "virtio_pci.ko": "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
    "jbd2.ko": "", "mbcache.ko": "", "crc16.ko": "", "ext4.ko": "jbd2,mbcache,crc16",
    "fuse.ko": "", "virtiofs.ko": "fuse,virtio,virtio_ring",
}
DROPPED = {"libata.ko", "ata_piix.ko", "virtio_net.ko", "fuse.ko", "virtiofs.ko"}


def _ko(name: str, deps: str) -> bytes:
    return (b"\x7fELF" + name.encode() * 20 + b"\0license=GPL\0depends=" + deps.encode()
            + b"\0retpoline=Y\0intree=Y\0name=" + name.removesuffix(".ko").encode() + b"\0")


def _initrd(modules: dict[str, str], raw: dict[str, bytes] | None = None) -> bytes:
    """supermin's layout: init, the .ko files, `modules` listing them in load order; `raw`
    replaces some modules' bytes."""
    raw = raw or {}
    entries = [newc.Entry(".", 0o40755), newc.Entry("init", 0o100755, b"\x7fELF init" * 99)]
    entries += [newc.Entry(n, 0o100644, raw.get(n, _ko(n, d)), mtime=1234)
                for n, d in modules.items()]
    entries.append(newc.Entry("modules", 0o100644, "".join(f"{n}\n" for n in modules).encode()))
    return newc.write(entries)


def test_newc_round_trip_and_cpio_agrees(tmp_path: pathlib.Path) -> None:
    entries = [newc.Entry(".", 0o40755), newc.Entry("a.ko", 0o100644, b"x" * 5, 1, 2, 3),
               newc.Entry("sub", 0o40700), newc.Entry("sub/b", 0o100755, b""),
               newc.Entry("link", 0o120777, b"sub/b")]
    archive = newc.write(entries)
    assert newc.read(archive) == entries
    if shutil.which("cpio") is None:
        pytest.skip("no cpio to cross-check with")
    out = subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path,
                         capture_output=True, check=True)
    assert out.returncode == 0
    assert (tmp_path / "a.ko").read_bytes() == b"xxxxx"
    assert os.readlink(tmp_path / "link") == "sub/b"
    listed = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True,
                            check=True).stdout.decode().split()
    assert listed == [".", "a.ko", "sub", "sub/b", "link"]
    with pytest.raises(newc.NewcError):
        newc.read(archive[:200])
    with pytest.raises(newc.NewcError):
        newc.read(b"070707" + archive[6:])


def test_lean_initrd_keeps_the_closure_in_order() -> None:
    lean = guest_initrd.lean_initrd(_initrd(MODULES))
    assert lean is not None
    entries = {e.name: e for e in newc.read(lean)}
    kept = [n for n in MODULES if n not in DROPPED]
    assert entries["modules"].data.decode().split() == kept  # supermin's order, kept
    assert sorted(n for n in entries if n.endswith(".ko")) == sorted(kept)
    for n in kept:  # bytes and metadata unchanged
        assert entries[n].data == _ko(n, MODULES[n]) and entries[n].mtime == 1234
    assert entries["init"].data == b"\x7fELF init" * 99 and entries["init"].mode == 0o100755


def test_lean_initrd_refuses_what_it_cannot_close() -> None:
    missing_dep = {**MODULES, "ext4.ko": "jbd2,mbcache,crc16,nosuchmod"}
    assert guest_initrd.lean_initrd(_initrd(missing_dep)) is None
    no_console = {n: d for n, d in MODULES.items() if n != "virtio_console.ko"}
    assert guest_initrd.lean_initrd(_initrd(no_console)) is None
    xz = _initrd(MODULES, {"virtio_pci.ko": b"\xfd7zXZ\0 compressed module"})
    assert guest_initrd.lean_initrd(xz) is None
    assert guest_initrd.lean_initrd(_initrd(MODULES)) is not None
    assert guest_initrd.lean_initrd(b"\x1f\x8b gzip, not newc") is None


def test_lean_init_text() -> None:
    lean = guest_init.lean_init(INIT)
    assert lean is not None
    kept = [line for line in lean.splitlines() if not line.startswith(guest_init.MARK)]
    trigger = ("udevadm trigger --subsystem-match=block --subsystem-match=virtio-ports  "
               "# vfsroot: was 'udevadm trigger' (only the subsystems guestfsd uses)")
    assert kept == [trigger if line == "udevadm trigger" else line
                    for line in INIT.splitlines() if line not in guest_init.SKIPPED]
    assert "udevadm settle --timeout=600" in kept and "modprobe dm_mod ||:" in kept
    assert lean.count(guest_init.MARK) == len(guest_init.SKIPPED)
    assert guest_init.lean_init(INIT.replace("udevadm trigger\n", "udevadm trigger -v\n")) \
        is None
    # another version's /init: leave it alone
    assert guest_init.lean_init(INIT.replace("ldmtool create all\n", "")) is None
    assert guest_init.lean_init(INIT + "mdadm -As --auto=yes --run\n") is None


def _ext2(path: pathlib.Path, tree: pathlib.Path) -> None:
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-d", str(tree), str(path), "8M"],
                   check=True, capture_output=True)


needs_e2fs = pytest.mark.skipif(not (shutil.which("mke2fs") and shutil.which("debugfs")),
                                reason="e2fsprogs missing")


@needs_e2fs
def test_write_root_rewrites_init_in_a_copy(tmp_path: pathlib.Path) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "init").write_text(INIT)
    (tree / "bin" / "other").write_bytes(b"other file" * 1000)
    src = tmp_path / "root"
    _ext2(src, tree)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    assert guest_init.read_init(str(src)) == INIT.encode()
    new = guest_init.lean_init(INIT).encode()
    dst = tmp_path / "root.lean"
    assert guest_init.write_root(str(src), str(dst), new)
    assert hashlib.sha256(guest_init.read_init(str(dst))).digest() == \
        hashlib.sha256(new).digest()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # the source untouched
    stat = subprocess.run(["debugfs", "-R", "stat /init", str(dst)], capture_output=True,
                          check=True).stdout.decode()
    assert "Mode:  0755" in stat and "User:     0" in stat
    cat = subprocess.run(["debugfs", "-R", "cat /bin/other", str(dst)], capture_output=True,
                         check=True).stdout
    assert cat == b"other file" * 1000
    fsck = subprocess.run(["e2fsck", "-fn", str(dst)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode()
    # not an ext2 image: no copy is left behind
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 65536)
    assert guest_init.read_init(str(junk)) is None
    assert not guest_init.write_root(str(junk), str(tmp_path / "junk.lean"), new)
    assert not (tmp_path / "junk.lean").exists()


@needs_e2fs
def test_fast_appliance_lean_parts(tmp_path: pathlib.Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "dpkg-status"
    db.write_text("packages\n")
    supermin_d = tmp_path / "lib" / "supermin.d"
    supermin_d.mkdir(parents=True)
    for p in (db, supermin_d):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(guest_kernel, "PACKAGE_DB", str(db))
    app = tmp_path / "cache" / f".guestfs-{os.geteuid()}" / "appliance.d"
    app.mkdir(parents=True)
    (app / "kernel").write_bytes(_bzimage(PVH))
    (app / "initrd").write_bytes(_initrd(MODULES))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "init").write_text(INIT)
    _ext2(app / "root", tree)
    cache, lib = str(tmp_path / "cache"), str(tmp_path / "lib")

    plain = guest_kernel.fast_appliance(cache, lib, lean_initrd=False, lean_init=False)
    assert plain is not None
    # a lean build by a vfsroot that edited differently: stale once this one is built
    stale = app.parent / f"vfsroot-pvh-initrd-init-deadbeef-{plain.rsplit('-', 1)[1]}"
    stale.mkdir()
    (stale / "README.fixed").write_text("older edits\n")
    lean = guest_kernel.fast_appliance(cache, lib)
    assert lean is not None and plain != lean
    assert not stale.exists() and pathlib.Path(plain).exists()  # other kinds are kept
    assert guest_kernel.parts(plain) == "decompressed kernel (PVH entry)"
    assert guest_kernel.parts(lean) == \
        "decompressed kernel (PVH entry), lean initrd, lean /init"
    plain_d, lean_d = pathlib.Path(plain), pathlib.Path(lean)
    for name in ("initrd", "root"):
        assert (plain_d / name).stat().st_ino == (app / name).stat().st_ino
        assert (lean_d / name).stat().st_ino != (app / name).stat().st_ino
    assert (lean_d / "kernel").read_bytes() == PVH
    assert (lean_d / "initrd").read_bytes() == guest_initrd.lean_initrd(_initrd(MODULES))
    assert guest_init.read_init(str(lean_d / "root")) == guest_init.lean_init(INIT).encode()
    assert guest_init.read_init(str(app / "root")) == INIT.encode()
    assert guest_kernel.fast_appliance(cache, lib) == lean  # built once
    # an /init from another libguestfs and an initrd it cannot read: supermin's own parts
    (app / "initrd").unlink()
    (app / "initrd").write_bytes(b"not newc")
    (tree / "init").write_text(INIT.replace("ldmtool create all\n", ""))
    (app / "root").unlink()
    _ext2(app / "root", tree)
    other = guest_kernel.fast_appliance(cache, lib)
    assert other is not None and other != lean and not lean_d.exists()
    assert guest_kernel.parts(other) == "decompressed kernel (PVH entry)"
    for name in ("initrd", "root"):
        assert (pathlib.Path(other) / name).stat().st_ino == (app / name).stat().st_ino
