"""Stopping a `vfsroot serve` subprocess the way every test and bench that starts one must:
SIGTERM (a clean unmount), a bounded wait, SIGKILL if it hangs, and a lazy unmount if the
mount outlived the process — so no test leaves a dead FUSE mount behind for the next one."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stop_serve(proc: subprocess.Popen, mountpoint: Path, timeout: float = 60.0) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
