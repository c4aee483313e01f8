"""Boot storm (issue 11), long form: 200 client IPs fetch the same 30 MiB initrd and each its
own small config, all at once, through `vfsroot serve` + `vfsroot-tftpd` (default flags); in
the same run, tftpd-hpa serves the same bytes from a plain directory laid out per client IP
(hard links to one initrd, its --map-file prefixing the client IP).  Run as root:

    flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/storm.py [--initrd-mib 30]

Clients: tftpd/client.py (our client), blksize 1428 lock-step with tsize, as PXE ROMs ask;
the clients are spread over ``--client-procs`` processes (one trio loop each) that start
together.  Every transfer's sha256 is checked.  Prints failed/corrupt transfers, aggregate
MB/s, the slowest client and each daemon's peak memory.  Exit status 1 if any transfer failed
or was corrupt.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from tests.fs.conftest import Daemon as ServeDaemon  # noqa: E402
from tests.reliability import procs  # noqa: E402
from tests.reliability.bench_setup import bench_work_dir  # noqa: E402
from tests.reliability.servers import tftpd_hpa, vfsroot_tftpd  # noqa: E402
from tests.reliability.storm import (  # noqa: E402
    BLKSIZE,
    StormResult,
    Trees,
    build_trees,
    client_ips,
    storm,
)


def _client_proc(args: tuple) -> StormResult:
    server, name, trees, ips, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    return trio.run(storm, server, name, trees, ips)


def run_storm(server: tuple[str, int], name: str, trees: Trees, ips: list[str],
              nprocs: int) -> StormResult:
    """The storm from ``nprocs`` client processes; their results merged (wall: the longest)."""
    parts = [ips[i::nprocs] for i in range(nprocs)]
    start_at = time.time() + 1.0
    with multiprocessing.get_context("fork").Pool(nprocs) as pool:
        results = pool.map(_client_proc, [(server, name, trees, p, start_at) for p in parts])
    merged = StormResult(name, len(ips))
    for r in results:
        merged.transfers += r.transfers
        merged.failed += r.failed
        merged.corrupt += r.corrupt
        merged.bytes += r.bytes
        merged.acks_resent += r.acks_resent
        merged.client_seconds.update(r.client_seconds)
        merged.wall = max(merged.wall, r.wall)
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--initrd-mib", type=float, default=30.0)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--servers", default="vfsroot,tftpd-hpa",
                   help="comma-separated, in the order they take the storm; "
                        "vfsroot-tftpd-plain = vfsroot-tftpd (default flags) over the plain "
                        "directory, no FUSE: how much of the time is the mount's")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    work = bench_work_dir("bench/storm.py", "FUSE mount, 127.x client addresses", "storm")
    if work is None:
        return 2
    started = time.monotonic()
    ips = client_ips(args.clients)
    size = int(args.initrd_mib * 1024 * 1024)
    trees = build_trees(work, ips, size)
    mnt = work / "mnt"
    mnt.mkdir()
    serve = ServeDaemon(trees.source, mnt, work / "vfsroot.log")
    ours = vfsroot_tftpd(mnt, work / "vfsroot-tftpd.log")
    hpa = tftpd_hpa(trees.plain, work / "tftpd-hpa.log", work / "hpa.map")
    plain = vfsroot_tftpd(trees.plain, work / "vfsroot-tftpd-plain.log")
    results: list[tuple[StormResult, dict[str, float]]] = []
    bad = False
    try:
        serve.start()
        ours.start()
        hpa.start()
        if "vfsroot-tftpd-plain" in args.servers:
            plain.start()
        assert serve.proc is not None
        daemons = {"vfsroot": ({"vfsroot serve": serve.proc, "vfsroot-tftpd": ours}, ours),
                   "tftpd-hpa": ({"tftpd-hpa": hpa}, hpa),
                   "vfsroot-tftpd-plain": ({"vfsroot-tftpd": plain}, plain)}
        for name in args.servers.split(","):
            watched, daemon = daemons[name]
            pids = {n: d.pid for n, d in watched.items()}
            with procs.PeakSampler(pids) as peak:
                res = run_storm(daemon.address, name, trees, ips, args.client_procs)
            mem = {}
            for n in pids:
                mem[f"{n} RSS"] = peak.peak_kib[n] / 1024
                mem[f"{n} PSS"] = peak.peak_pss_kib[n] / 1024
                mem[f"{n} largest process"] = peak.largest_process_kib[n] / 1024
            results.append((res, mem))
            bad |= not res.ok
            print(f"{name} done: {res.line()}", file=sys.stderr, flush=True)
    finally:
        codes = {"vfsroot-tftpd": ours.stop(), "tftpd-hpa": hpa.stop(),
                 "vfsroot-tftpd-plain": plain.stop()}
        serve.stop()
    print(f"\nboot storm: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {args.clients} clients "
          f"x (config + {size} B initrd), our client blksize {BLKSIZE} lock-step + tsize, "
          f"{args.client_procs} client processes, {os.cpu_count()} CPUs; run took "
          f"{time.monotonic() - started:.0f} s")
    print(f"{'server':<19} {'transfers':>9} {'failed':>6} {'corrupt':>7} {'MB/s':>7} "
          f"{'wall s':>7} {'slowest client':>22}  peak memory of each daemon's process tree, "
          "sampled every 0.1 s (RSS sum, PSS sum, largest one process's VmHWM)")
    for res, mem in results:
        ip, secs = res.slowest
        memtext = ", ".join(f"{n} {v:.1f} MiB" for n, v in mem.items())
        print(f"{res.server:<19} {res.transfers:>9} {len(res.failed):>6} {len(res.corrupt):>7} "
              f"{res.mbps:>7.1f} {res.wall:>7.1f} {ip + f' {secs:.1f} s':>22}  {memtext}")
        for line in (res.failed + res.corrupt)[:10]:
            print(f"    {line}")
    print(f"exit codes after SIGTERM: {codes}")
    if args.keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print("held" if not bad else "FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
