"""The guest layer against a real appliance on a real NBD disk (one launch for the module)."""

from __future__ import annotations

import errno
import hashlib
import pathlib
from collections.abc import Iterator

import pytest

from vfsroot.config import parse_config
from vfsroot.guest import AttachOptions, GuestSession
from vfsroot.layers.base import Kind, LayerUnavailable
from vfsroot.layers.guest import GuestLayer, StaticSource

from .conftest import Portal, config_text, needs_guestfs
from .images import Image, NbdServer

pytestmark = [pytest.mark.disk, needs_guestfs]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def session(portal: Portal, nbd_server: NbdServer, disk_image: Image
            ) -> Iterator[GuestSession]:
    config = parse_config(config_text(nbd_server.url, lvm=disk_image.lvm))
    s = GuestSession("127.0.0.5", config, AttachOptions(attach_timeout=180, memsize_mb=512))
    portal.run(s.attach)
    yield s
    portal.run(s.close)


@pytest.fixture
def layer(session: GuestSession) -> GuestLayer:
    return GuestLayer(StaticSource(session), "127.0.0.5")


async def read_all(layer: GuestLayer, path: tuple[str, ...], chunk: int = 131072) -> bytes:
    reader = await layer.open(path)
    try:
        out = bytearray()
        while True:
            data = await reader.read(len(out), chunk)
            if not data:
                return bytes(out)
            out += data
    finally:
        await reader.close()


def test_lookup_file_node(portal: Portal, layer: GuestLayer, nbd_server: NbdServer,
                          disk_image: Image) -> None:
    node = portal.run(layer.lookup, ("vmlinuz-6.1",))
    assert node is not None and node.kind is Kind.FILE
    assert node.layer == "disk"
    assert node.size == len(disk_image.files["/boot/vmlinuz-6.1"])
    assert node.source == f"{nbd_server.url}#/boot/vmlinuz-6.1"
    assert portal.run(layer.lookup, ("nope",)) is None
    assert portal.run(layer.lookup, ("vmlinuz-6.1", "below-a-file")) is None
    root = portal.run(layer.lookup, ())
    assert root is not None and root.is_dir


@pytest.mark.parametrize(("name", "guest"), [
    (("vmlinuz",), "/boot/vmlinuz-6.1"),           # relative symlink
    (("initrd.img",), "/boot/initrd.img-6.1"),     # absolute symlink, guest root
    (("hostname",), "/etc/hostname"),              # absolute, outside tftp_root, in the guest
    (("etc", "hostname"), "/etc/hostname"),        # through a symlinked directory
    (("efilink",), "/boot/efi/config.txt"),        # into the FAT mount
    (("efi", "EFI", "BOOT", "BOOTX64.EFI"), "/boot/efi/EFI/BOOT/BOOTX64.EFI"),
    (("pxelinux.cfg", "default"), "/boot/pxelinux.cfg/default"),
])
def test_symlinks_resolve_inside_the_guest(portal: Portal, layer: GuestLayer, disk_image: Image,
                                           name: tuple[str, ...], guest: str) -> None:
    node = portal.run(layer.lookup, name)
    assert node is not None and node.kind is Kind.FILE
    assert node.source.endswith("#" + guest)
    assert sha(portal.run(read_all, layer, name)) == sha(disk_image.files[guest])


def test_guest_hostname_is_not_the_hosts(portal: Portal, layer: GuestLayer) -> None:
    assert portal.run(read_all, layer, ("hostname",)) == b"guest-host\n"
    assert pathlib.Path("/etc/hostname").read_bytes() != b"guest-host\n"


def test_escape_dangling_and_loop(portal: Portal, layer: GuestLayer) -> None:
    assert portal.run(layer.lookup, ("escape",)) is None
    assert portal.run(layer.lookup, ("dangling",)) is None
    with pytest.raises(OSError) as e:
        portal.run(layer.lookup, ("loop1",))
    assert e.value.errno == errno.ELOOP
    assert not isinstance(e.value, LayerUnavailable)


def test_listdir(portal: Portal, layer: GuestLayer, caplog: pytest.LogCaptureFixture) -> None:
    entries = portal.run(layer.listdir, ())
    assert set(entries) == {
        "vmlinuz", "vmlinuz-6.1", "initrd.img", "initrd.img-6.1", "big.bin", "hostname",
        "etc", "efi", "efilink", "pxelinux.cfg", "shadow.txt", "only-disk.txt", "lvm",
    }  # no escape, dangling, loops, nor the non-UTF-8 name
    assert entries["etc"].kind is Kind.DIR and entries["vmlinuz"].kind is Kind.FILE
    assert entries["vmlinuz"].size == entries["vmlinuz-6.1"].size
    assert all(n.layer == "disk" for n in entries.values())
    assert any("not UTF-8" in r.getMessage() for r in caplog.records)
    assert entries["lvm"].kind is Kind.DIR
    efi = portal.run(layer.listdir, ("efi",))
    assert set(efi) == {"EFI", "config.txt", "vmlinuz-efi"}


def test_reads_are_exact(portal: Portal, layer: GuestLayer, disk_image: Image) -> None:
    data = disk_image.files["/boot/big.bin"]

    async def probe() -> list[bytes]:
        r = await layer.open(("big.bin",))
        try:
            return [await r.read(o, n) for o, n in [
                (0, 1), (1, 4095), (5_000_000, 3_000_000), (len(data) - 10, 4096),
                (len(data), 10), (len(data) + 100, 10), (123, 1468),
            ]]
        finally:
            await r.close()

    got = portal.run(probe)
    assert got[0] == data[:1] and got[1] == data[1:4096]
    assert got[2] == data[5_000_000:8_000_000]
    assert got[3] == data[-10:] and got[4] == b"" and got[5] == b""
    assert got[6] == data[123:123 + 1468]
    assert sha(portal.run(read_all, layer, ("big.bin",), 1468)) == sha(data)


def test_open_directory_and_missing(portal: Portal, layer: GuestLayer) -> None:
    with pytest.raises(IsADirectoryError):
        portal.run(layer.open, ("efi",))
    with pytest.raises(FileNotFoundError):
        portal.run(layer.open, ("nope",))


def test_rewrite_visible_after_refresh_never_mid_transfer(
    portal: Portal, layer: GuestLayer, session: GuestSession, disk_image: Image,
    tmp_path: pathlib.Path,
) -> None:
    """A kernel the client rewrites on its disk shows up after a refresh; an open transfer
    keeps its snapshot (refresh waits), so it never mixes old and new."""
    old = disk_image.files["/boot/efi/vmlinuz-efi"]
    assert portal.run(read_all, layer, ("efi", "vmlinuz-efi")) == old

    reader = portal.run(layer.open, ("efi", "vmlinuz-efi"))
    first = portal.run(reader.read, 0, 4096)
    new = bytes(reversed(old))[:len(old) + 1000]  # same size
    disk_image.rewrite_fat_file("vmlinuz-efi", new, tmp_path)
    assert portal.run(session.refresh) is False  # a transfer is open: keep the snapshot
    rest = portal.run(reader.read, 4096, len(old))
    portal.run(reader.close)
    assert first + rest == old

    assert portal.run(session.refresh) is True
    assert portal.run(read_all, layer, ("efi", "vmlinuz-efi")) == new


def test_dirty_ext4_journal_mounts(portal: Portal, layer: GuestLayer, disk_image: Image) -> None:
    """p2 carries an unreplayed journal transaction (needs_recovery), as a live client's root
    does; it mounts (ro,noload on the overlay) and serves files, and the image is unchanged
    (the session fixture checks its sha256 at the end)."""
    from .images import P2_START

    with disk_image.path.open("rb") as f:
        f.seek(P2_START + 1024 + 0x60)  # ext4 superblock: s_feature_incompat
        incompat = int.from_bytes(f.read(4), "little")
    assert incompat & 0x4, "fixture lost its dirty journal"  # EXT4_FEATURE_INCOMPAT_RECOVER
    assert portal.run(read_all, layer, ("etc", "hostname")) == b"guest-host\n"


def test_lvm_logical_volume(portal: Portal, layer: GuestLayer, disk_image: Image,
                            nbd_server: NbdServer) -> None:
    """A mount may name an LVM logical volume ("lv": "vg/lv")."""
    if not disk_image.lvm:
        pytest.skip(f"this machine cannot build the LVM partition: {disk_image.lvm_missing}")
    node = portal.run(layer.lookup, ("lvm", "lv-kernel"))
    assert node is not None and node.source == f"{nbd_server.url}#/boot/lvm/lv-kernel"
    assert portal.run(read_all, layer, ("lvm", "lv-kernel")) == disk_image.files[
        "/boot/lvm/lv-kernel"]
