"""A disk-backed client boots on its first try with the daemon just started (docs/disks.md).

Every boot file of the client (pxelinux.0, ldlinux.c32, its per-MAC config, kernel, initrd)
is on its own NBD disk; `default/` is empty.  `vfsroot serve` and `vfsroot-tftpd` start and
the firmware boots at once, while the disk's appliance is still launching: the client's
requests are held (it retransmits) until the disk is attached, never answered with an error,
and the one boot passes (token of its per-MAC config on the kernel command line, sha256 of
the initrd payload).

What holding can promise: iPXE retransmits an unanswered request for ~16 s (retry timer
0.25 s doubling until it would exceed 10 s; measured: first request ~6 s after the firmware
starts, "Connection timed out" ~16 s later), so the boot passes when the appliance is ready
within ~22 s of the firmware's start.  A TCG launch takes 15-45 s here (KVM: ~2 s): 17 s median
on a quiet host since the appliance boots its kernel decompressed (docs/disks.md, "Launch
time under TCG"), but this test's own firmware qemu and any other load share the host's two
cores with it.  When this run's disk was ready beyond the window, the test says so and skips
instead of blaming the product (that the client was held, never refused, is checked either
way).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import MAC_IPXE, BootFiles
from .harness import (
    CLIENT_IP,
    LDLINUX,
    PXELINUX,
    NbdServer,
    Netns,
    VfsrootMount,
    boot_ipxe,
    build_disk,
    dnsmasq_argv,
    nbd_config,
    stop_process,
    tail,
    vfsroot_tftpd_argv,
)

pytestmark = [pytest.mark.e2e, pytest.mark.disk]


@pytest.fixture(scope="module")
def disk_source(boot_files: BootFiles, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[Path, Path]]:
    work = tmp_path_factory.mktemp("diskboot")
    source = work / "source"
    (source / "default").mkdir(parents=True)
    tree = {"pxelinux.0": PXELINUX, "ldlinux.c32": LDLINUX, **boot_files.boot_tree()}
    disk = work / "client.img"
    build_disk(disk, {f"/boot/{k}": v for k, v in tree.items()})
    nbd = NbdServer(disk, work / "nbdkit.log").start()
    try:
        (source / f"{CLIENT_IP}.nbd").write_text(nbd_config(nbd.url))
        yield work, source
    finally:
        nbd.stop()


def test_first_boot_while_the_disk_attaches(disk_source: tuple[Path, Path],
                                            boot_files: BootFiles) -> None:
    work, source = disk_source
    mount = work / "mount"
    daemon_log = work / "vfsroot.log"
    with Netns(work) as ns, VfsrootMount(source, mount, daemon_log):
        started = time.monotonic()
        tftpd_log = work / "vfsroot-tftpd.log"
        tftpd = ns.popen(vfsroot_tftpd_argv(mount), tftpd_log)
        try:
            ns.popen(dnsmasq_argv(work, {MAC_IPXE: CLIENT_IP}), work / "dnsmasq.log")
            state = json.loads(os.getxattr(mount, "user.vfsroot.status"))[CLIENT_IP]["state"]
            # The point of the test: the firmware starts before the disk is there.
            assert state == "attaching", f"disk already {state} before the boot started"
            boot_wall = time.time()
            result = boot_ipxe(ns, MAC_IPXE, work / "ipxe.console", timeout=150)
            logs = "\n".join(f"--- {p.name} ---\n{tail(p, 3000)}"
                             for p in (tftpd_log, daemon_log))
            context = (f"boot ended {time.monotonic() - started:.0f} s after the daemon "
                       f"started; console ends:\n{result.console[-3000:]}\n{logs}")
            # Held, not refused: no TFTP error went out for the files the disk holds.
            assert "Input/output error" not in tftpd_log.read_text(errors="replace"), logs
            booted = (result.value("TOKEN") == boot_files.tokens[MAC_IPXE]
                      and result.value("SHA256") == boot_files.small.payload_sha256)
            if not booted:
                disk = json.loads(os.getxattr(mount, "user.vfsroot.status"))[CLIENT_IP]
                assert disk["state"] == "ready", f"{disk}\n{context}"
                ready_after = disk["since"] - boot_wall
                # DHCP with the router advertisement takes iPXE ~6 s, then ~16 s of retries
                if ready_after > 6 + 16:
                    pytest.skip(f"the disk was ready {ready_after:.0f} s after the firmware "
                                "started, beyond iPXE's retransmit window (~22 s): a TCG "
                                "launch is too slow for a cold first boot here")
            assert result.value("TOKEN") == boot_files.tokens[MAC_IPXE], context
            assert result.value("SHA256") == boot_files.small.payload_sha256, context
        finally:
            stop_process(tftpd)
            subprocess.run(["sync"], check=False)
