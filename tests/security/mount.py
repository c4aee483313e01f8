"""A `vfsroot serve` subprocess for attack tests (tests/fs's helpers, with or without disks)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.fs.conftest import Daemon, have_fuse, live, mounted, vfsroot_cmd

__all__ = ["ServeDaemon", "have_fuse"]


class ServeDaemon(Daemon):
    """tests/fs's Daemon; `disks=True` leaves the disk manager on (no config, no appliance)."""

    def __init__(self, source: Path, mountpoint: Path, log: Path, disks: bool = False) -> None:
        super().__init__(source, mountpoint, log)
        self.disks = disks

    def start(self) -> ServeDaemon:
        if not self.disks:
            super().start()
            return self
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            vfsroot_cmd("serve", "--source", str(self.source), "--mount", str(self.mountpoint)),
            stdout=self._log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if mounted(self.mountpoint) and live(self.mountpoint):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise AssertionError("vfsroot serve did not come up:\n" + self.log())
