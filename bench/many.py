"""Many clients (issue 11), long form: N client directories and N `.nbd` configs (whose NBD
port nothing listens on: every disk fails its probe, no appliance starts) under one
`vfsroot serve` with disks on.  Prints the time of `ls MOUNT`, of N config reads (sha256
each), of `vfsroot status` (issue 9 asks < 1 s with 1,000 configs), and the daemon's RSS,
threads, descriptors and CPU while the disks back off.  Run as root:

    flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/many.py [--clients 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.bench_setup import bench_work_dir  # noqa: E402
from tests.reliability.many import build_source, measure  # noqa: E402
from tests.security.mount import ServeDaemon  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000,
                   help="client directories, and as many disk configs (default 1000)")
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="how long the daemon's CPU is measured while the disks back off")
    args = p.parse_args(argv)
    work = bench_work_dir("bench/many.py", "FUSE mount", "many", raise_nofile=False)
    if work is None:
        return 2
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")  # no KVM probe launch
    started = time.monotonic()
    try:
        source, mnt = work / "src", work / "mnt"
        t = time.monotonic()
        expected = build_source(source, args.clients)
        built = time.monotonic() - t
        mnt.mkdir()
        t = time.monotonic()
        daemon = ServeDaemon(source, mnt, work / "vfsroot.log", disks=True).start()
        up = time.monotonic() - t
        try:
            assert daemon.proc is not None
            fig = measure(mnt, daemon.proc.pid, expected, args.clients,
                          idle_seconds=args.idle_seconds)
        finally:
            daemon.stop()
        print(f"\nmany clients: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
              f"run took {time.monotonic() - started:.0f} s; source built in {built:.1f} s, "
              f"mount up {up:.1f} s after the start")
        for line in fig.lines():
            print(f"  {line}")
        ok = not fig.reads_bad and fig.status_disks == args.clients and fig.qemu == 0
        print("held" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
