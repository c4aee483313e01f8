"""Real firmware PXE-boots through a TFTP server (tftpd-hpa as the control, then vfsroot).

Each boot passes only if the kernel command line of the client's per-MAC config (its random
token) reaches the serial console and the busybox initrd's sha256 of its payload is the one
the test built: the wrong config, a truncated or corrupted file, or a boot that never ends
(bounded) all fail.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    GRUB_CORE,
    IPXE_SCRIPT,
    MAC_BIG,
    MAC_GRUB,
    MAC_IPXE,
    MAC_SCRIPT,
    MAC_UBOOT,
    BootFiles,
    Rig,
)
from .harness import BootResult, UBoot, boot_ipxe, crc32_file, mac_config_name

pytestmark = pytest.mark.e2e


def _check_boot(result: BootResult, token: str, sha256: str, rig: Rig) -> None:
    context = f"after {result.seconds:.0f} s; console ends:\n{result.console[-3000:]}\n{rig.logs()}"
    assert result.value("TOKEN") == token, f"per-MAC config's token missing {context}"
    assert result.value("SHA256") == sha256, f"payload checksum wrong {context}"


def test_ipxe_pxelinux_per_mac(rig: Rig, boot_files: BootFiles,
                               dhcp: Callable[..., Path]) -> None:
    """iPXE ROM → pxelinux.0 + ldlinux.c32 (default/) → 01-<mac> → kernel + initrd."""
    dhcp(MAC_IPXE)
    result = boot_ipxe(rig.ns, MAC_IPXE, rig.work / "ipxe-small.console", timeout=180)
    _check_boot(result, boot_files.tokens[MAC_IPXE], boot_files.small.payload_sha256, rig)


def test_ipxe_initrd_over_100mb(rig: Rig, boot_files: BootFiles,
                                dhcp: Callable[..., Path]) -> None:
    """The same chain with a >100 MB initrd: the transfer wraps the 16-bit block number."""
    if rig.kind != "vfsroot":
        pytest.skip("the control server runs the short boots only (CI time); rollover is ours")
    size = boot_files.big.path.stat().st_size
    assert size > 100 * 1000 * 1000 and size // 1468 > 65535
    dhcp(MAC_BIG)
    result = boot_ipxe(rig.ns, MAC_BIG, rig.work / "ipxe-big.console", timeout=420,
                       memory_mb=1024)
    _check_boot(result, boot_files.tokens[MAC_BIG], boot_files.big.payload_sha256, rig)
    # Our server's transfer line: the whole file, in one transfer, at a blksize that wraps.
    m = re.search(rf"file='initrd-big.img' bytes={size} .*blksize=(\d+).* outcome=ok",
                  rig.server_log.read_text(errors="replace"))
    assert m, f"no complete transfer of initrd-big.img in the server log:\n{rig.logs()}"
    assert -(-size // int(m.group(1))) > 65535, "the transfer did not need a block-number wrap"


def test_uboot_pxe_get_and_tftpboot(rig: Rig, boot_files: BootFiles,
                                    dhcp: Callable[..., Path]) -> None:
    """U-Boot: `dhcp; pxe get` picks 01-<mac>; `tftpboot` with a window; crc32s match; boots."""
    dhcp(MAC_UBOOT)
    config = boot_files.boot_tree()[f"pxelinux.cfg/{mac_config_name(MAC_UBOOT)}"]
    assert isinstance(config, bytes)
    files = {"vmlinuz": boot_files.kernel, "initrd.img": boot_files.small.path}
    with UBoot(rig.ns, MAC_UBOOT, rig.work) as ub:
        ub.command("setenv autoload no")
        out = ub.command("dhcp", timeout=60)
        assert "10.77.0.100" in out, f"U-Boot DHCP failed: {out}"
        # pxe get loads the config at pxefile_addr_r (unset on qemu-x86: set it).
        ub.command("setenv pxefile_addr_r 0x7000000")
        out = ub.command("pxe get", timeout=120)
        wanted = f"pxelinux.cfg/{mac_config_name(MAC_UBOOT)}"
        assert f"Retrieving file: {wanted}" in out, f"pxe get output:\n{out}\n{rig.logs()}"
        assert ub.crc32("${pxefile_addr_r}") == zlib.crc32(config), (
            f"pxe get did not load the per-MAC config:\n{out}\n{rig.logs()}")
        ub.command("setenv tftpwindowsize 8")
        for name, addr in (("vmlinuz", "${kernel_addr_r}"),
                           ("initrd.img", "${ramdisk_addr_r}")):
            out = ub.command(f"tftpboot {addr} {name}", timeout=180)
            size = files[name].stat().st_size
            assert f"Bytes transferred = {size} " in out, f"tftpboot {name}:\n{out}\n{rig.logs()}"
            assert ub.crc32(addr) == crc32_file(files[name]), f"crc32 of {name} differs"
        # And they boot: zboot (x86 bzImage) with the initrd just fetched and the config's
        # command line.  (`pxe boot` would tell the kernel the initrd is 12 bytes: U-Boot bug.)
        token = boot_files.tokens[MAC_UBOOT]
        ub.command(f"setenv bootargs console=ttyS0 quiet panic=-1 vfsroot_token={token}")
        initrd_size = files["initrd.img"].stat().st_size
        console = ub.run_until(f"zboot ${{kernel_addr_r}} 0 ${{ramdisk_addr_r}} {initrd_size:x}",
                               b"VFSROOT-SHA256=", timeout=180)
        digest = ub.expect(b"\n", 10).decode(errors="replace").strip()
        assert f"VFSROOT-TOKEN={token}" in console, console[-3000:]
        assert digest == boot_files.small.payload_sha256, console[-3000:]


def test_ipxe_script(rig: Rig, boot_files: BootFiles, dhcp: Callable[..., Path]) -> None:
    """iPXE runs the client's own boot.ipxe (the disk's, shadowing default/'s) directly."""
    dhcp(MAC_SCRIPT, IPXE_SCRIPT)
    result = boot_ipxe(rig.ns, MAC_SCRIPT, rig.work / "ipxe-script.console", timeout=180)
    _check_boot(result, boot_files.tokens[IPXE_SCRIPT], boot_files.small.payload_sha256, rig)


def test_grub_per_mac(rig: Rig, boot_files: BootFiles, dhcp: Callable[..., Path]) -> None:
    """iPXE ROM → GRUB's core.0 (default/) → modules → grub.cfg-01-<mac> → kernel + initrd."""
    dhcp(MAC_GRUB, GRUB_CORE)
    result = boot_ipxe(rig.ns, MAC_GRUB, rig.work / "grub.console", timeout=240)
    _check_boot(result, boot_files.tokens[MAC_GRUB], boot_files.small.payload_sha256, rig)
