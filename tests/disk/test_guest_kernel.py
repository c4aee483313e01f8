"""The decompressed-kernel appliance (vfsroot/guest_kernel.py): the kernel inside a bzImage
is found and checked for its PVH note, the fixed-appliance directory holds exactly the
supermin appliance's initrd and root (same inodes) and the decompressed kernel, it is built
once per supermin build, and a supermin appliance older than its inputs is not used."""

from __future__ import annotations

import hashlib
import lzma
import os
import pathlib
import struct

import pytest

from vfsroot import guest_kernel


def _elf(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    """A minimal ELF64 LE image with one PT_NOTE segment holding `notes`."""
    blob = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        blob += struct.pack("<III", len(n), len(desc), ntype)
        blob += n + b"\0" * (-len(n) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(blob), len(blob), 4)
    return bytes(ehdr) + phdr + blob + b"kernel text" * 100


PVH = _elf([(b"Xen", 6, b"linux\0"), (b"Xen", guest_kernel.XEN_ELFNOTE_PHYS32_ENTRY,
                                         b"\0\0\0\x01")])
NO_PVH = _elf([(b"Xen", 6, b"linux\0"), (b"GNU", 18, b"\0" * 4)])


def _bzimage(elf: bytes) -> bytes:
    return b"MZ setup code" * 50 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailer"


def test_pvh_note() -> None:
    assert guest_kernel.has_pvh_note(PVH)
    assert not guest_kernel.has_pvh_note(NO_PVH)  # type 18, but not in a "Xen" note
    assert not guest_kernel.has_pvh_note(b"MZ" + PVH)


def test_decompress() -> None:
    assert guest_kernel.decompress_bzimage(_bzimage(PVH)) == PVH
    assert guest_kernel.decompress_bzimage(b"no xz here" * 10) is None
    gz = b"setup" + b"\x1f\x8b\x08" + b"x" * 100
    assert guest_kernel.decompress_bzimage(gz) is None


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A libguestfs cache dir with a supermin appliance, built after its inputs."""
    db = tmp_path / "dpkg-status"
    db.write_text("packages\n")
    supermin_d = tmp_path / "lib" / "supermin.d"
    supermin_d.mkdir(parents=True)
    (supermin_d / "packages").write_text("kernel\n")
    old = 1_000_000_000
    for p in (db, supermin_d, supermin_d / "packages"):
        os.utime(p, (old, old))
    monkeypatch.setattr(guest_kernel, "PACKAGE_DB", str(db))
    app = tmp_path / "cache" / f".guestfs-{os.geteuid()}" / "appliance.d"
    app.mkdir(parents=True)
    (app / "kernel").write_bytes(_bzimage(PVH))
    (app / "initrd").write_bytes(b"initrd bytes")
    (app / "root").write_bytes(b"root fs bytes")
    return tmp_path


def test_fixed_appliance_built_once(cache: pathlib.Path) -> None:
    app = cache / "cache" / f".guestfs-{os.geteuid()}" / "appliance.d"
    out = guest_kernel.fast_appliance(str(cache / "cache"), str(cache / "lib"))
    assert out is not None
    fixed = pathlib.Path(out)
    assert hashlib.sha256((fixed / "kernel").read_bytes()).digest() == \
        hashlib.sha256(PVH).digest()
    for name in ("initrd", "root"):
        assert (fixed / name).stat().st_ino == (app / name).stat().st_ino
    assert (fixed / "README.fixed").exists()
    kernel_ino = (fixed / "kernel").stat().st_ino
    # libguestfs touches its appliance at every launch: still the same build
    os.utime(app / "kernel")
    assert guest_kernel.fast_appliance(str(cache / "cache"), str(cache / "lib")) == out
    assert (fixed / "kernel").stat().st_ino == kernel_ino
    # supermin rebuilt it: a new directory, the old one removed
    (app / "initrd").unlink()
    (app / "initrd").write_bytes(b"new initrd")
    out2 = guest_kernel.fast_appliance(str(cache / "cache"), str(cache / "lib"))
    assert out2 is not None and out2 != out
    assert not fixed.exists()
    assert (pathlib.Path(out2) / "initrd").read_bytes() == b"new initrd"


def test_stale_or_unusable_appliance_is_not_used(cache: pathlib.Path) -> None:
    app = cache / "cache" / f".guestfs-{os.geteuid()}" / "appliance.d"
    (app / "kernel").write_bytes(_bzimage(NO_PVH))
    assert guest_kernel.fast_appliance(str(cache / "cache"), str(cache / "lib")) is None
    (app / "kernel").write_bytes(_bzimage(PVH))
    assert guest_kernel.fast_appliance(str(cache / "cache"), str(cache / "lib")) is not None
    # a package was installed after the appliance was built: supermin would rebuild it
    os.utime(guest_kernel.PACKAGE_DB)
    future = os.stat(app / "kernel").st_mtime + 10
    os.utime(guest_kernel.PACKAGE_DB, (future, future))
    assert guest_kernel.fast_appliance(str(cache / "cache"), str(cache / "lib")) is None
    # no supermin appliance at all yet
    assert guest_kernel.fast_appliance(str(cache / "nowhere"), str(cache / "lib")) is None
