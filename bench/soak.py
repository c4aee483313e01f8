"""Soak (issue 11), long form: mixed traffic (storm rounds, small files, a lossy client, source
edits: tests/reliability/soak.py) through `vfsroot serve` + `vfsroot-tftpd` with default
flags for ``--minutes``, after a warm-up; prints every category's count, the daemons'
descriptors, threads and RSS (idle, first and last) and a sample every ``--sample-every``
seconds.  Run as root:

    flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from tests.fs.conftest import Daemon as ServeDaemon  # noqa: E402
from tests.reliability.bench_setup import bench_work_dir  # noqa: E402
from tests.reliability.servers import vfsroot_tftpd  # noqa: E402
from tests.reliability.soak import KINDS, Soak, build_source, not_flat, report  # noqa: E402


def _kinds(text: str) -> frozenset[str]:
    kinds = frozenset(text.split(","))
    if not kinds or not kinds <= KINDS:
        raise argparse.ArgumentTypeError(f"unknown kinds {sorted(kinds - KINDS)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--workers", type=int, metavar="N",
                   help="vfsroot-tftpd --workers (default: its own, one per CPU)")
    p.add_argument("--tftpd-arg", action="append", default=[], metavar="ARG",
                   help="one more vfsroot-tftpd argument (repeatable; --tftpd-arg=--flag=VALUE)")
    p.add_argument("--kinds", type=_kinds, default=KINDS,
                   help="traffic kinds to run, comma-separated: " + ",".join(sorted(KINDS))
                   + " (default: all)")
    p.add_argument("--storm-clients", type=int, default=100)
    p.add_argument("--initrd-mib", type=float, default=4.0)
    p.add_argument("--sample-every", type=float, default=10.0, metavar="SECONDS")
    args = p.parse_args(argv)
    work = bench_work_dir("bench/soak.py", "FUSE mount, 127.x client addresses", "soak")
    if work is None:
        return 2
    started = time.monotonic()
    source, expected = build_source(work / "trees", args.storm_clients,
                                    int(args.initrd_mib * 1024 * 1024))
    mnt = work / "mnt"
    mnt.mkdir()
    serve = ServeDaemon(source, mnt, work / "vfsroot.log")
    kinds = args.kinds
    extra = [*args.tftpd_arg, *(() if args.workers is None else ("--workers", str(args.workers)))]
    tftpd = vfsroot_tftpd(mnt, work / "vfsroot-tftpd.log", *extra)
    try:
        serve.start()
        tftpd.start()
        assert serve.proc is not None
        soak = Soak(tftpd.address, source, expected,
                    {"vfsroot serve": serve.proc.pid, "vfsroot-tftpd": tftpd.pid},
                    args.storm_clients)
        seconds = args.minutes * 60

        async def run() -> tuple[dict, dict]:
            await soak.traffic(args.warmup, kinds=kinds)
            first = await soak.idle_sample(0)
            soak.reset()
            await soak.traffic(seconds, sample_every=args.sample_every, kinds=kinds)
            return first, await soak.idle_sample(seconds)

        first, last = trio.run(run)
    finally:
        code = tftpd.stop()
        serve.stop()
    lines = report(soak.result, first, last)
    print(f"\nsoak: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {args.minutes:g} min of mixed traffic "
          f"after a {args.warmup:.0f} s warm-up, {args.storm_clients} storm clients x (config + "
          f"{args.initrd_mib:g} MiB initrd); run took {time.monotonic() - started:.0f} s")
    for line in lines:
        print(f"  {line}")
    print(f"  vfsroot-tftpd exit code after SIGTERM: {code}")
    grew = not_flat(first, last, soak.result)
    print("  flat (slack in tests/reliability/soak.py): " + ("yes" if not grew else
                                                             "NO: " + "; ".join(grew)))
    shutil.rmtree(work, ignore_errors=True)
    ok = not soak.result.bad and code == 0 and not grew
    print("held" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
