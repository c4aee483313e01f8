"""Client disks through the real mount: `vfsroot serve` in a subprocess, one appliance.

Precedence client dir > disk > default, per file; while the disk attaches the client's own
files and other clients are served at once and disk paths fail (never the default's file);
status over the xattr and `vfsroot status`; a kernel rewritten on the disk is served within
the documented bound.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from ..serving import serving
from .conftest import needs_guestfs, write_config
from .gate import AttachGate
from .images import Image, NbdServer, free_port

pytestmark = [pytest.mark.disk, pytest.mark.mount, needs_guestfs,
              pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                 reason="needs /dev/fuse and root")]

CLIENT = "127.0.0.41"
OTHER = "127.0.0.42"
DOWN = "127.0.0.43"  # its NBD server is unreachable
VFSROOT = [sys.executable, "-m", "vfsroot.cli"]
REFRESH_QUIET = 1.0


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def status(mount: pathlib.Path) -> dict:
    try:
        return json.loads(os.getxattr(mount, "user.vfsroot.status"))
    except OSError:
        return {}


@pytest.fixture(scope="module")
def attach_gate(nbd_server: NbdServer) -> Iterator[AttachGate]:
    """CLIENT's disk goes through this gate: it stays attaching until a test opens it."""
    gate = AttachGate(nbd_server.port)
    yield gate
    gate.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, attach_gate: AttachGate
           ) -> Iterator[tuple[pathlib.Path, pathlib.Path, subprocess.Popen]]:
    base = tmp_path_factory.mktemp("mount")
    src, mnt = base / "src", base / "mnt"
    (src / "default").mkdir(parents=True)
    (src / CLIENT).mkdir()
    mnt.mkdir()
    (src / "default" / "shadow.txt").write_bytes(b"from default\n")
    (src / "default" / "vmlinuz").write_bytes(b"the DEFAULT kernel: must never reach the client\n")
    (src / "default" / "only-default.txt").write_bytes(b"only default\n")
    (src / CLIENT / "shadow.txt").write_bytes(b"from the client dir\n")
    write_config(src, CLIENT, attach_gate.url)
    (src / DOWN).mkdir()
    (src / DOWN / "own.txt").write_bytes(b"served while its disk is down\n")
    write_config(src, DOWN, f"nbd://127.0.0.1:{free_port()}/export")
    with serving(src, mnt, base / "serve.log", "--attach-wait", "1", "--refresh-quiet",
                 str(REFRESH_QUIET), "--idle-timeout", "3600", "--attach-timeout", "240"
                 ) as proc:
        yield src, mnt, proc


def test_while_attaching_nothing_else_waits(served: tuple, attach_gate: AttachGate) -> None:
    """The gate holds the disk in "attaching" however fast this machine launches appliances
    (it is opened by the next test), so these checks always run."""
    src, mnt, _ = served
    t0 = time.monotonic()
    assert (mnt / OTHER / "shadow.txt").read_bytes() == b"from default\n"
    assert (mnt / CLIENT / "shadow.txt").read_bytes() == b"from the client dir\n"
    assert time.monotonic() - t0 < 5
    # a path the disk may shadow: an error, never the default's kernel (this lookup also
    # starts the attach, should the daemon not have started it on its own)
    with pytest.raises(OSError) as e:
        (mnt / CLIENT / "vmlinuz").read_bytes()
    assert e.value.errno == errno.EIO
    # the appliance is up to the NBD handshake and held there: still attaching
    wait_until(lambda: attach_gate.connections > 0, 120, "the appliance to reach the NBD server")
    assert status(mnt)[CLIENT]["state"] == "attaching"
    with pytest.raises(OSError) as e:
        (mnt / CLIENT / "vmlinuz").read_bytes()
    assert e.value.errno == errno.EIO


def test_precedence_through_the_mount(served: tuple, disk_image: Image,
                                     attach_gate: AttachGate) -> None:
    src, mnt, _ = served
    attach_gate.open()
    wait_until(lambda: status(mnt).get(CLIENT, {}).get("state") in ("ready", "failed"), 240,
               "the disk to attach")
    st = status(mnt)[CLIENT]
    assert st["state"] == "ready", st
    client = mnt / CLIENT
    kernel = disk_image.files["/boot/vmlinuz-6.1"]
    assert hashlib.sha256((client / "vmlinuz").read_bytes()).digest() == \
        hashlib.sha256(kernel).digest()  # disk > default
    assert (client / "shadow.txt").read_bytes() == b"from the client dir\n"  # client > disk
    assert (client / "only-default.txt").read_bytes() == b"only default\n"
    assert (client / "only-disk.txt").read_bytes().startswith(b"only on disk")
    assert (client / "efi" / "config.txt").read_bytes() == disk_image.files[
        "/boot/efi/config.txt"]
    assert os.getxattr(client / "vmlinuz", "user.vfsroot.layer") == b"disk"
    assert os.getxattr(client / "shadow.txt", "user.vfsroot.layer") == b"client"
    names = set(os.listdir(client))
    assert {"vmlinuz", "initrd.img", "efi", "only-disk.txt", "only-default.txt",
            "shadow.txt"} <= names
    assert not {"escape", "loop1", "dangling"} & names
    with pytest.raises(FileNotFoundError):
        (client / "escape").stat()
    # the other client never sees this disk
    assert (mnt / OTHER / "vmlinuz").read_bytes().startswith(b"the DEFAULT kernel")
    out = subprocess.run([*VFSROOT, "status", "--mount", str(mnt)], capture_output=True,
                         text=True, check=True, cwd=pathlib.Path(__file__).parents[2]).stdout
    assert CLIENT in out and "ready" in out


def test_rewritten_kernel_visible_within_bound(served: tuple, disk_image: Image,
                                               tmp_path: pathlib.Path) -> None:
    src, mnt, _ = served
    path = mnt / CLIENT / "efi" / "vmlinuz-efi"
    before = path.read_bytes()
    assert before == disk_image.files["/boot/efi/vmlinuz-efi"]
    new = hashlib.sha256(b"v3").digest() * (len(before) // 32) + b"x" * (len(before) % 32)
    disk_image.rewrite_fat_file("vmlinuz-efi", new, tmp_path)
    t0 = time.monotonic()
    time.sleep(REFRESH_QUIET + 0.6)  # a booting client is quiet between its two boots
    assert path.read_bytes() == new
    assert time.monotonic() - t0 < REFRESH_QUIET + 15


def test_unreachable_disk_fails_clearly_other_layers_served(served: tuple) -> None:
    src, mnt, _ = served
    wait_until(lambda: status(mnt).get(DOWN, {}).get("state") == "failed", 240,
               "the unreachable disk to fail")
    assert "unreachable" in status(mnt)[DOWN]["message"]
    down = mnt / DOWN
    assert (down / "own.txt").read_bytes() == b"served while its disk is down\n"
    with pytest.raises(OSError) as e:  # the disk may shadow it: never the default's kernel
        (down / "vmlinuz").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / OTHER / "vmlinuz").read_bytes().startswith(b"the DEFAULT kernel")
    assert status(mnt)[CLIENT]["state"] == "ready"  # everyone else unaffected
