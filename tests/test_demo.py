"""The README's demo, run for real: bundled tree, nbdkit disk, FUSE mount, TFTP.

This is the newcomer's first experience, so it is tested the way they would use it: the
commands the demo prints, with plain tools, against the bytes of the bundled files.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfsroot.mountinfo import mounted_fstype

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "demo"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.mount, pytest.mark.disk]

#: The disk attaches through a libguestfs appliance: 25-45 s under TCG, more on a busy machine.
ATTACH_DEADLINE = 240.0


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tftp(client_ip: str, port: int, path: str) -> bytes:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--interface", client_ip,
         f"tftp://127.0.0.1:{port}/{path}"],
        check=True, capture_output=True, timeout=30).stdout


@pytest.fixture
def demo(tmp_path: Path):
    mount = tmp_path / "mnt"
    port = _free_udp_port()
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    log = open(tmp_path / "demo.log", "w+b")  # noqa: SIM115 - closed in the teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfsroot.demo", "--mount", str(mount),
         "--workdir", str(tmp_path / "work"), "--tftp-listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"vfsroot demo is running" not in (tmp_path / "demo.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()
            assert time.monotonic() < deadline, "demo did not start within 60 s"
            time.sleep(0.2)
        yield proc, mount, port, tmp_path / "demo.log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if mounted_fstype(mount) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False)
        log.close()


def test_demo_serves_every_layer_and_stops_cleanly(demo) -> None:
    proc, mount, port, log = demo
    assert sorted(os.listdir(mount)) == ["127.0.0.10", "127.0.0.11", "default"]

    own = (BUNDLE / "source/127.0.0.10/hello.txt").read_bytes()
    default = (BUNDLE / "source/default/hello.txt").read_bytes()
    assert (mount / "127.0.0.10/hello.txt").read_bytes() == own
    assert (mount / "127.0.0.99/hello.txt").read_bytes() == default

    xattrs = subprocess.run(["getfattr", "-d", str(mount / "127.0.0.10/hello.txt")],
                            check=True, capture_output=True, text=True).stdout
    assert 'user.vfsroot.layer="client"' in xattrs
    explain = subprocess.run([str(BIN / "vfsroot"), "explain", "127.0.0.10", "hello.txt",
                              "--mount", str(mount)], check=True, capture_output=True,
                             text=True).stdout
    assert "served by client" in explain and "shadows   default" in explain

    # TFTP: each client IP gets its own tree.
    assert _tftp("127.0.0.10", port, "hello.txt") == own
    assert _tftp("127.0.0.12", port, "hello.txt") == default

    # The disk client: files from its NBD disk once the appliance is up.
    disk_cfg = (BUNDLE / "disk/pxelinux.cfg/default").read_bytes()
    deadline = time.monotonic() + ATTACH_DEADLINE
    while True:
        try:
            got = (mount / "127.0.0.11/pxelinux.cfg/default").read_bytes()
            if got == disk_cfg:
                break
        except OSError:
            pass  # EIO while attaching: the lookup waits a bounded time, then fails
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "disk not attached in time:\n" + log.read_text()
        time.sleep(2)
    assert _tftp("127.0.0.11", port, "pxelinux.cfg/default") == disk_cfg
    layer = subprocess.run(["getfattr", "-n", "user.vfsroot.layer", "--only-values",
                            str(mount / "127.0.0.11/vmlinuz")], check=True,
                           capture_output=True, text=True).stdout
    assert layer == "disk"
    status = subprocess.run([str(BIN / "vfsroot"), "status", "--mount", str(mount)],
                            check=True, capture_output=True, text=True).stdout
    assert "127.0.0.11" in status and "ready" in status

    # Ctrl-C / SIGTERM: everything stops, the mount is gone.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert mounted_fstype(mount) is None
    leftovers = subprocess.run(["pgrep", "-f", str(mount)], capture_output=True, text=True)
    assert leftovers.stdout == "", leftovers.stdout


def test_the_demo_refuses_a_mountpoint_in_use_and_leaves_it_mounted(tmp_path: Path) -> None:
    """By default the demo mounts at /run/vfsroot, the systemd service's mountpoint: a mount
    already there is refused, and never unmounted on the way out."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "someone-else", str(mount)], check=True)
    try:
        (mount / "theirs").write_text("in use\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "vfsroot.demo", "--mount", str(mount),
             "--workdir", str(tmp_path / "work"), "--tftp-listen", f"127.0.0.1:{port}"],
            capture_output=True, timeout=120)
        assert proc.returncode != 0
        assert b"already mounted" in proc.stderr
        assert mounted_fstype(mount) == "tmpfs", (
            "the demo unmounted a filesystem it did not mount:\n"
            + proc.stdout.decode() + proc.stderr.decode())
    finally:
        if mounted_fstype(mount) is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)
