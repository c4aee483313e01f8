"""A `vfsroot serve` subprocess with its disks on, for the tests and benches that attach real
disks: `serving` starts it and waits for the mount; `stop_serve` stops it the way every test
and bench that starts one must: SIGTERM (a clean unmount), a bounded wait, SIGKILL if it hangs,
and a lazy unmount if the mount outlived the process — so no test leaves a dead FUSE mount
behind for the next one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).parents[1]


@contextlib.contextmanager
def serving(source: Path, mountpoint: Path, log: Path, *flags: str,
            env: Mapping[str, str] | None = None, up_within: float = 30.0,
            stop_timeout: float = 60.0) -> Iterator[subprocess.Popen]:
    """`vfsroot serve --source SOURCE --mount MOUNTPOINT --force-tcg FLAGS` (KVM hangs on these
    hosts), its output in `log`; yields the process once the mount is up, and always stops it
    (`stop_serve`) on the way out.  Fails with the log's end if it exits first or the mount is
    not up within `up_within` seconds."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vfsroot.cli", "serve", "--source", str(source),
             "--mount", str(mountpoint), "--force-tcg", *flags],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + up_within
        while not os.path.ismount(mountpoint):
            assert proc.poll() is None, \
                f"vfsroot serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"no mount within {up_within} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield proc
    finally:
        stop_serve(proc, mountpoint, timeout=stop_timeout)


def stop_serve(proc: subprocess.Popen, mountpoint: Path, timeout: float = 60.0) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
