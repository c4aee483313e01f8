"""Where a boot storm's CPU goes, per DATA packet: the servers in turn, many rounds.

bench/tftp.py says how fast each server gets through a storm; this one says why two of them
differ.  On a two-CPU machine the storm's clients run on the same CPUs as the server, and
the machine is (almost) saturated, so the rate is two CPUs divided by what one packet costs
*everyone*: the server, its clients and the kernel between them, plus whatever time the CPUs
spend idle because every runnable task happens to wait on the other one.  Per round and
server it prints:

* the aggregate rate (the same storm as bench/tftp.py: ``--clients`` atftp clients fetching
  16 MiB at blksize 1428, lock-step, every file checked by sha256);
* the machine's idle share of both CPUs during the round (/proc/stat);
* microseconds per DATA packet: all busy time, the clients (``getrusage`` of the reaped atftp
  processes), the server (its cpuacct group: every process it forked), and the rest (kernel
  work charged to neither, softirq mostly);
* the clients' voluntary context switches and the machine's rescheduling and call-function
  IPIs per packet (/proc/interrupts RES and CAL): in a VM, waking a halted vCPU exits to the
  host.

Then the median of every figure per server, and each server's median rate over the first
one's.  ``--pinned`` adds ``vfsroot-pinned``: a second vfsroot-tftpd whose worker processes
are pinned one per CPU once started (the experiment in docs/tftpd.md that it does not pay).
``--unbatched`` adds ``vfsroot-send``, whose compiled lane sends one ``send()`` per ACK
(``--no-batch-sends``): what sending a batch in one ``io_uring_enter`` is worth.
Run as root, with nothing else running:

    flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/storm_split.py \\
        [--clients 16] [--rounds 10] [--servers vfsroot,tftpd-hpa] [--pinned] [--unbatched]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tftp  # noqa: E402
import tftp_peers  # noqa: E402

BLKSIZE = 1428
FIGURES = ("MB/s", "idle%", "busy", "clients", "server", "rest", "cl_csw", "IPIs")


def cpu_ticks() -> tuple[int, int]:
    """(busy, idle) jiffies of the whole machine so far (/proc/stat's first line; iowait
    counts as idle)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, idle


def ipis() -> int:
    """Rescheduling plus call-function interrupts over every CPU so far."""
    total = 0
    for line in Path("/proc/interrupts").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("RES:", "CAL:"):
            total += sum(int(x) for x in parts[1:] if x.isdigit())
    return total


def pin_workers(server: tftp_peers.Running) -> list[int]:
    """Pin the vfsroot-tftpd worker processes (the parent and the children it forked; not
    the opener helpers) one per CPU, round robin; their pids."""
    pids = [server.pid]
    for child in tftp_peers._children(server.pid):
        try:
            if b"tftpd.cli" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(child)
        except OSError:
            continue
    cpus = sorted(os.sched_getaffinity(0))
    for k, pid in enumerate(sorted(pids)):
        os.sched_setaffinity(pid, {cpus[k % len(cpus)]})
    return pids


def one_round(server: tftp_peers.Running, clients: int, size: int, want: str,
              out: Path) -> dict[str, float]:
    """One storm against ``server`` and what it cost, per DATA packet."""
    busy0, idle0 = cpu_ticks()
    ipi0 = ipis()
    srv0 = tftp_peers.server_cpu_seconds(server)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = tftp.concurrent(server.port, clients, size, want, out)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    srv1 = tftp_peers.server_cpu_seconds(server)
    ipi1 = ipis()
    busy1, idle1 = cpu_ticks()
    packets = res["bytes"] / BLKSIZE
    tick = 1e6 / os.sysconf("SC_CLK_TCK")
    busy = (busy1 - busy0) * tick / packets
    cl = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1e6 / packets
    srv = (srv1 - srv0) * 1e6 / packets
    return {"MB/s": res["agg"], "failures": res["failures"],
            "idle%": 100 * (idle1 - idle0) / max(1, busy1 - busy0 + idle1 - idle0),
            "busy": busy, "clients": cl, "server": srv, "rest": busy - cl - srv,
            "cl_csw": (ru1.ru_nvcsw - ru0.ru_nvcsw) / packets,
            "IPIs": (ipi1 - ipi0) / packets}


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if args.pinned:
        names.append("vfsroot-pinned")
    if args.unbatched:
        names.append("vfsroot-send")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="vfsroot-split-", dir="/dev/shm"))
    servers: list[tftp_peers.Running] = []
    try:
        root = work / "root"
        digests = tftp.make_data(root, 1024, size)
        out = work / "out"
        out.mkdir()
        bins = tftp_peers.fetch_peers(args.cache)
        servers = tftp_peers.start_servers(
            bins, root, work, args.clients,
            second_vfsroot="vfsroot-pinned" if args.pinned else None,
            unbatched=args.unbatched, only=set(names))
        by_name = {s.name: s for s in servers}
        if args.pinned:
            print("vfsroot-pinned workers:", pin_workers(by_name["vfsroot-pinned"]))
        results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names:
                row = one_round(by_name[name], args.clients, size, digests["small.bin"], out)
                results[name].append(row)
                print(f"round {r + 1:2d} {name:15s} " + " ".join(
                    f"{k}={row[k]:.2f}" for k in FIGURES)
                    + (f" FAILURES={row['failures']:.0f}" if row["failures"] else ""),
                    flush=True)
        print(f"\nmedians over {args.rounds} rounds, {args.clients} clients x "
              f"{args.size_mib} MiB @{BLKSIZE} (busy/clients/server/rest: us per DATA packet; "
              "cl_csw, IPIs: per packet)")
        print(f"{'':15s}" + "".join(f"{k:>9s}" for k in FIGURES) + f"{'failures':>9s}"
              + f"   rate / {names[0]}")
        first = statistics.median(x["MB/s"] for x in results[names[0]])
        failed = 0
        for name in names:
            rows = results[name]
            med = {k: statistics.median(x[k] for x in rows) for k in FIGURES}
            fails = sum(x["failures"] for x in rows)
            failed += int(fails)
            print(f"{name:15s}" + "".join(f"{med[k]:9.2f}" for k in FIGURES)
                  + f"{fails:9.0f}   {med['MB/s'] / first:.3f}x")
        return 1 if failed else 0
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--size-mib", type=int, default=16)
    p.add_argument("--servers", default="vfsroot,tftpd-hpa",
                   help="comma-separated, first is the reference: "
                        + ",".join(tftp.SERVERS))
    p.add_argument("--unbatched", action="store_true",
                   help="add vfsroot-send: its lane sends one send() per ACK, not one "
                        "io_uring_enter per batch (--no-batch-sends)")
    p.add_argument("--pinned", action="store_true",
                   help="add vfsroot-pinned: its workers pinned one per CPU")
    p.add_argument("--cache", type=Path, default=Path("/var/cache/vfsroot-bench"))
    args = p.parse_args(argv)
    unknown = set(args.servers.split(",")) - set(tftp.SERVERS)
    if unknown:
        p.error(f"--servers: unknown {', '.join(sorted(unknown))}")
    status = tftp_peers.in_private_netns(__file__, argv, args.cache)
    if status is not None:
        return status
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
