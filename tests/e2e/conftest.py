"""Fixtures for the end-to-end boots: what the clients boot, and a boot rig per TFTP server.

A rig is one network namespace with a TFTP server on `SERVER_IP:69` that serves the client
`CLIENT_IP` one merged boot tree:

- ``tftpd-hpa``: Debian's tftpd-hpa over a plain directory holding that tree; it proves the
  harness and the firmware on their own, so a failure of the product run is the product's.
- ``vfsroot``: the product.  `vfsroot serve` mounts the source root (in the root namespace;
  the mount is visible inside the namespace) and `vfsroot-tftpd` serves the mount.  `default/`
  holds the loaders (pxelinux.0, ldlinux.c32, GRUB's network tree); the per-MAC configs, the
  iPXE script, the kernel and the initrds are on the client's NBD disk (nbdkit on 127.0.0.1),
  whose `/boot` is the TFTP root.

Both trees also hold decoys (`pxelinux.cfg/default`, `boot.ipxe`, `boot/grub/grub.cfg`) with
another token, so a client that misses its own config cannot pass.  DHCP (dnsmasq) is started
per test, for the MAC and boot file the test boots.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    CLIENT_IP,
    LDLINUX,
    PXELINUX,
    Initrd,
    NbdServer,
    Netns,
    VfsrootMount,
    build_disk,
    build_grub_netdir,
    build_initrd,
    dnsmasq_argv,
    grub_config,
    host_kernel,
    ipxe_script,
    mac_config_name,
    nbd_config,
    pxelinux_config,
    stop_process,
    tail,
    tftpd_hpa_argv,
    vfsroot_tftpd_argv,
    wait_file,
    wait_tftp,
)

MAC_IPXE = "52:54:00:e2:e0:01"
MAC_BIG = "52:54:00:e2:e0:02"
MAC_UBOOT = "52:54:00:e2:e0:03"
MAC_SCRIPT = "52:54:00:e2:e0:04"
MAC_GRUB = "52:54:00:e2:e0:05"
#: Over 100 MB: more than 65535 blocks at any blksize the firmware asks for (≤ 1468).
BIG_PAYLOAD = 110 * 1000 * 1000


@pytest.fixture(scope="session")
def e2e_host() -> None:
    """The host can run the boots at all (root for namespaces, a tun device for qemu)."""
    if os.geteuid() != 0:
        pytest.skip("e2e boots need root: network namespaces, taps and FUSE mounts")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("e2e boots need /dev/net/tun for qemu's tap NIC")
    missing = [t for t in ("qemu-system-x86_64", "dnsmasq", "ip", "cpio", "grub-mknetdir",
                           "curl", "sfdisk", "mkfs.ext4", "nbdkit") if not shutil.which(t)]
    assert not missing, f"missing tools (scripts/debian-packages.txt installs them): {missing}"


#: The iPXE script's name (DHCP boot file of the iPXE recipe).
IPXE_SCRIPT = "boot.ipxe"
#: GRUB's network boot image, as grub-mknetdir lays it out (DHCP boot file of the GRUB recipe).
GRUB_CORE = "boot/grub/i386-pc/core.0"


@dataclass(frozen=True)
class BootFiles:
    """What every client boots, and the configs that say so.

    Every config passes its own random token on the kernel command line; the `default/` tree
    holds decoys of the same kinds with other tokens, so a boot that reads a shared config
    instead of the client's own cannot pass.
    """

    kernel: Path
    small: Initrd
    big: Initrd
    grub_dir: Path
    #: MAC -> token its per-MAC PXELINUX / GRUB config passes; IPXE_SCRIPT -> its token
    tokens: dict[str, str]

    def boot_tree(self) -> dict[str, Path | bytes]:
        """The client's own boot files as its TFTP root sees them."""
        t = self.tokens
        tree: dict[str, Path | bytes] = {
            "vmlinuz": self.kernel,
            "initrd.img": self.small.path,
            "initrd-big.img": self.big.path,
            IPXE_SCRIPT: ipxe_script("vmlinuz", "initrd.img", t[IPXE_SCRIPT]).encode(),
            f"boot/grub/grub.cfg-{mac_config_name(MAC_GRUB)}":
                grub_config("/vmlinuz", "/initrd.img", t[MAC_GRUB]).encode(),
        }
        for mac, initrd in ((MAC_IPXE, "initrd.img"), (MAC_BIG, "initrd-big.img"),
                            (MAC_UBOOT, "initrd.img")):
            tree[f"pxelinux.cfg/{mac_config_name(mac)}"] = \
                pxelinux_config("vmlinuz", initrd, t[mac]).encode()
        return tree

    def default_tree(self) -> dict[str, Path | bytes]:
        """What every client shares (the source root's `default/`): loaders and decoys."""
        decoy = "decoy-" + self.tokens["decoy"]
        tree: dict[str, Path | bytes] = {
            "pxelinux.0": PXELINUX, "ldlinux.c32": LDLINUX,
            "pxelinux.cfg/default": pxelinux_config("vmlinuz", "initrd.img",
                                                    decoy).encode(),
            IPXE_SCRIPT: ipxe_script("vmlinuz", "initrd.img", decoy).encode(),
            "boot/grub/grub.cfg": grub_config("/vmlinuz", "/initrd.img", decoy).encode(),
        }
        for f in sorted(self.grub_dir.rglob("*")):
            if f.is_file():
                tree[str(f.relative_to(self.grub_dir))] = f
        return tree


@pytest.fixture(scope="session")
def boot_files(e2e_host: None, tmp_path_factory: pytest.TempPathFactory) -> BootFiles:
    work = tmp_path_factory.mktemp("bootfiles")
    kernel = work / "vmlinuz"
    shutil.copy2(host_kernel(), kernel)
    small = build_initrd(work / "initrd.img", 1_000_000)
    big = build_initrd(work / "initrd-big.img", BIG_PAYLOAD)
    grub_dir = work / "grub-net"
    build_grub_netdir(grub_dir)
    tokens = {k: secrets.token_hex(8)
              for k in (MAC_IPXE, MAC_BIG, MAC_UBOOT, MAC_GRUB, IPXE_SCRIPT, "decoy")}
    return BootFiles(kernel, small, big, grub_dir, tokens)


def _materialise(root: Path, files: dict[str, Path | bytes]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            shutil.copy2(content, p)


@dataclass
class Rig:
    kind: str
    ns: Netns
    work: Path
    server_log: Path
    #: the directory the client's TFTP root is (a plain dir, or the client's vfsroot view)
    client_root: Path
    extra_logs: tuple[Path, ...] = ()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{tail(p, 3000)}"
                         for p in (self.server_log, *self.extra_logs))


SERVERS = ["tftpd-hpa", "vfsroot"]


@pytest.fixture(scope="module", params=SERVERS)
def rig(request: pytest.FixtureRequest, boot_files: BootFiles,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    kind = request.param
    work = tmp_path_factory.mktemp(f"rig-{kind}")
    with Netns(work) as ns:
        if kind == "tftpd-hpa":
            root = work / "tftproot"
            _materialise(root, {**boot_files.default_tree(), **boot_files.boot_tree()})
            log = work / "tftpd-hpa.log"
            ns.popen(tftpd_hpa_argv(root), log)
            wait_tftp(ns, "pxelinux.0", PXELINUX.read_bytes(), log, timeout=90)
            yield Rig(kind, ns, work, log, root)
            return

        source, mount = work / "source", work / "mount"
        _materialise(source / "default", boot_files.default_tree())
        disk = work / "client.img"
        build_disk(disk, {f"/boot/{k}": v for k, v in boot_files.boot_tree().items()})
        nbd = NbdServer(disk, work / "nbdkit.log").start()
        try:
            (source / f"{CLIENT_IP}.nbd").write_text(nbd_config(nbd.url))
            daemon_log = work / "vfsroot.log"
            with VfsrootMount(source, mount, daemon_log):
                client_root = mount / CLIENT_IP
                # Attach the disk (an appliance launch: 25-45 s under TCG) before any firmware
                # asks, and check the disk's bytes come through the mount.
                cfg = f"pxelinux.cfg/{mac_config_name(MAC_IPXE)}"
                wait_file(client_root / cfg, boot_files.boot_tree()[cfg],
                           daemon_log, timeout=240)
                log = work / "vfsroot-tftpd.log"
                tftpd = ns.popen(vfsroot_tftpd_argv(mount), log)
                try:
                    wait_tftp(ns, "pxelinux.0", PXELINUX.read_bytes(), log, timeout=90)
                    yield Rig(kind, ns, work, log, client_root,
                              (daemon_log, work / "nbdkit.log"))
                finally:
                    stop_process(tftpd)  # before the unmount: it may hold files open
        finally:
            nbd.stop()


@pytest.fixture
def dhcp(rig: Rig) -> Iterator[Callable[..., Path]]:
    """Start dnsmasq on the rig's bridge giving `mac` CLIENT_IP and `boot_file`; returns its log."""
    procs: list[subprocess.Popen] = []

    def start(mac: str, boot_file: str = "pxelinux.0") -> Path:
        log = rig.work / "dnsmasq.log"
        (rig.work / "dnsmasq.leases").unlink(missing_ok=True)
        procs.append(rig.ns.popen(dnsmasq_argv(rig.work, {mac: CLIENT_IP}, boot_file), log))
        return log

    yield start
    for proc in procs:
        stop_process(proc, grace=5)
