"""An iSCSI disk (`iscsi://host:port/<iqn>/<lun>`) against a real userspace target (tgt)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import trio

from vfsroot.disks import DiskManager, DiskOptions

from .conftest import config_text, needs_guestfs
from .images import Image, free_port
from .test_manager import LAUNCH, read_file, state, wait_for

pytestmark = [pytest.mark.disk, needs_guestfs,
              pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed")]

IQN = "iqn.2024-01.org.vfsroot:client61"
CLIENT = "127.0.0.61"


class Target:
    """tgtd on 127.0.0.1 with its own control port, one read-only file-backed LUN."""

    def __init__(self, backing: pathlib.Path, log: pathlib.Path) -> None:
        self.port = free_port()
        self.control = str(random.randint(100, 30000))  # tgtd accepts up to 32767
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", self.control, "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"tgtd did not start: {log.read_text()}") from None
                time.sleep(0.1)
        self.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", IQN)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                 "-b", str(backing))
        self.adm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                 "--params", "readonly=1")
        self.adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")

    def adm(self, *args: str) -> None:
        subprocess.run(["tgtadm", "-C", self.control, "--lld", "iscsi", *args], check=True,
                       capture_output=True, timeout=30)

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/1"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # tgtd ignores SIGTERM while it has targets
        self.proc.wait(timeout=30)


@pytest.fixture
def target(disk_image: Image, tmp_path: pathlib.Path) -> Iterator[Target]:
    t = Target(disk_image.path, tmp_path / "tgtd.log")
    yield t
    t.close()


async def test_iscsi_disk_through_tgt(tmp_path: pathlib.Path, target: Target,
                                      disk_image: Image) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{CLIENT}.nbd").write_text(config_text(target.url))
    m = DiskManager(src, DiskOptions(attach_timeout=LAUNCH, attach_wait=1.0, config_poll=0.5))
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        await wait_for(lambda: state(m, CLIENT) in ("ready", "failed"), LAUNCH, "the attach")
        st = m.status()[CLIENT]
        assert st["state"] == "ready", st
        assert st["url"] == target.url
        kernel = await read_file(m, CLIENT, ("vmlinuz-6.1",))
        assert hashlib.sha256(kernel).hexdigest() == hashlib.sha256(
            disk_image.files["/boot/vmlinuz-6.1"]).hexdigest()
        assert await read_file(m, CLIENT, ("efi", "config.txt")) == \
            disk_image.files["/boot/efi/config.txt"]
        json.dumps(m.status())
        nursery.cancel_scope.cancel()


async def test_unreachable_iscsi_target_fails_clearly(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    port = free_port()
    (src / f"{CLIENT}.nbd").write_text(config_text(f"iscsi://127.0.0.1:{port}/{IQN}/1"))
    m = DiskManager(src, DiskOptions(retry_min=600, retry_max=600, config_poll=0.5))
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        await wait_for(lambda: state(m, CLIENT) == "failed", 20, "the probe")
        assert f"iSCSI target 127.0.0.1:{port} unreachable" in m.status()[CLIENT]["message"]
        assert not m.appliances
        nursery.cancel_scope.cancel()
