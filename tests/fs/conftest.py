"""Fixtures for tests/fs: a real `vfsroot serve` in a subprocess, with bounded waits and a
guaranteed unmount."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from vfsroot.mountinfo import mounts_at

START_DEADLINE = 15.0
STOP_DEADLINE = 10.0


def mount_ids(mountpoint: Path) -> set[int]:
    """Mount IDs of whatever is mounted exactly at `mountpoint`."""
    return {m.mount_id for m in mounts_at(mountpoint)}


def mounted(mountpoint: Path) -> bool:
    return bool(mount_ids(mountpoint))


def live(mountpoint: Path) -> bool:
    """A vfsroot whose daemon answers.  A dead mount fails with ENOTCONN, but stat() may be
    answered from the kernel's attribute cache: readdir always reaches the daemon."""
    try:
        return "default" in os.listdir(mountpoint)
    except OSError:
        return False


def force_unmount(mountpoint: Path) -> None:
    for _ in range(5):
        if not mounted(mountpoint):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                       timeout=10)


def vfsroot_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vfsroot.cli", *args]


class Daemon:
    """One `vfsroot serve --no-disks` process."""

    def __init__(self, source: Path, mountpoint: Path, log: Path) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            vfsroot_cmd("serve", "--source", str(self.source), "--mount",
                        str(self.mountpoint), "--no-disks"),
            stdout=self._log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
        )
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            # a dead mount of a killed daemon may be listed too: live means stat works
            if mounted(self.mountpoint) and live(self.mountpoint):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"vfsroot serve exited {self.proc.returncode}:\n"
                                     + self.log())
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"mount not up within {START_DEADLINE}s:\n" + self.log())

    def __enter__(self) -> Self:
        """`with Daemon(...) as d:` starts it and always stops it (no process, no mount left)."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> int | None:
        """Send `signum`, wait for the exit (bounded), return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Always leaves no process and no mount behind."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_DEADLINE)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=STOP_DEADLINE)
        finally:
            force_unmount(self.mountpoint)
            if hasattr(self, "_log"):
                self._log.close()


BIG_SIZE = 64 * 1024 * 1024
#: Clients made in the shared source root besides the named ones.
MANY = 500


def build_source(root: Path) -> dict[str, object]:
    """The shared source root; returns facts the tests check against."""
    default = root / "default"
    (default / "pxelinux.cfg").mkdir(parents=True)
    (default / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT menu\n")
    (default / "vmlinuz").write_bytes(b"default kernel\n")
    (default / "initrd.img").write_bytes(b"default initrd\n")
    (default / "common").write_bytes(b"common file\n")
    (default / "boot").mkdir()
    (default / "boot" / "grub.cfg").write_bytes(b"grub\n")
    (default / "shadowed-dir").mkdir()
    (default / "shadowed-dir" / "inside").write_bytes(b"x")
    (default / "shadowed-file").write_bytes(b"a file in default\n")
    big = os.urandom(BIG_SIZE)
    (default / "big.img").write_bytes(big)

    c1 = root / "10.0.0.1"
    (c1 / "pxelinux.cfg").mkdir(parents=True)
    (c1 / "pxelinux.cfg" / "default").write_bytes(b"CLIENT menu\n")
    (c1 / "pxelinux.cfg" / "extra").write_bytes(b"extra\n")
    (c1 / "vmlinuz").write_bytes(b"client kernel\n")
    (c1 / "shadowed-dir").write_bytes(b"a file shadowing a dir\n")
    (c1 / "shadowed-file").mkdir()
    (c1 / "shadowed-file" / "mine").write_bytes(b"mine\n")
    os.symlink("/etc/passwd", c1 / "escape-abs")
    os.symlink("../../outside/secret", c1 / "escape-rel")
    os.symlink("/etc", c1 / "escape-dir")
    os.symlink("../default/common", c1 / "shared-link")
    os.symlink("../default/boot", c1 / "boot-link")
    os.symlink("nowhere", c1 / "broken")
    (root.parent / "outside").mkdir(exist_ok=True)
    (root.parent / "outside" / "secret").write_bytes(b"secret\n")

    (root / "10.0.0.10").mkdir()
    (root / "10.0.0.10" / "vmlinuz").write_bytes(b"ten kernel\n")
    (root / "10.0.0.20.nbd").write_text("# a disk config: a known client\n")
    for name in ("fe80::1", "2001:db8::5"):
        (root / name).mkdir()
        (root / name / "id").write_bytes(f"I am {name}\n".encode())
    many = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(MANY)]
    for name in many:
        (root / name).mkdir()
    return {"big_sha256": hashlib.sha256(big).hexdigest(), "many": many}


@pytest.fixture(scope="session")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict]]:
    base = tmp_path_factory.mktemp("shared")
    source = base / "src"
    source.mkdir()
    facts = build_source(source)
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    with Daemon(source, mountpoint, base / "daemon.log") as daemon:
        yield daemon, facts


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "default").mkdir(parents=True)
    (source / "default" / "vmlinuz").write_bytes(b"default kernel\n")
    (source / "10.0.0.1").mkdir()
    (source / "10.0.0.1" / "vmlinuz").write_bytes(b"client kernel\n")
    return source


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[type]:
    started: list[Daemon] = []

    class Factory:
        @staticmethod
        def make(source: Path, mountpoint: Path) -> Daemon:
            d = Daemon(source, mountpoint, tmp_path / f"daemon-{len(started)}.log")
            started.append(d)
            return d

    try:
        yield Factory
    finally:
        for d in reversed(started):
            d.stop()


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if have_fuse():
        return
    skip = pytest.mark.skip(reason="no /dev/fuse or fusermount3")
    here = Path(__file__).parent
    for item in items:
        if "mount" in item.keywords and here in Path(str(item.fspath)).parents:
            item.add_marker(skip)
