"""Server CPU per small request and per lock-step megabyte, old code against new, in turns.

Wall-clock rates on a shared 2-CPU machine swing by a third between runs; the CPU a server
spends per request moves far less, and comparing two builds run A B A B ... (each run a fresh
server process) cancels most of the drift that remains.  Not a test; run as root (cgroup CPU
accounting, the atftp client):

    .venv/bin/python bench/smallreq.py rate --variant old /tmp/base "" --variant new . "" \
        [--pairs 5] [--requests 3000] [--clients 8] [--workers 1]
    .venv/bin/python bench/smallreq.py lockstep --variant spin200 . "--spin-us 200" \
        --variant spin0 . "--spin-us 0" [--size-mib 32] [--blksize 1428]

A variant is LABEL DIR ARGS: vfsroot-tftpd from the source tree DIR (its own ``tftpd``
package) with the extra command-line ARGS, or DIR ``tftpd-hpa`` / ``atftpd`` for the peers of
bench/tftp.py.  ``rate``: REQUESTS fetches of a 1 KiB file by CLIENTS concurrent clients (our
client, tftpd/client.py, in its own process, the same code for every variant; default flags,
so blksize 512: three DATA blocks and no OACK, as in bench/tftp.py); every fetch's sha256 is
checked.  ``lockstep``: one atftp fetch of SIZE MiB at BLKSIZE (``--windowsize``: with
that window instead).  Each run prints the server's
CPU (its cgroup: every process it forks and every thread) per request or per MB, the client's
CPU and the rate; the summary gives medians and the median of the per-pair ratios to the
first variant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tftp_peers  # noqa: E402
import trio  # noqa: E402

from tftpd.client import TftpError, TransferTimeout, fetch  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
ATFTP = shutil.which("atftp") or "/usr/bin/atftp"


def client_main(port: int, requests: int, clients: int, want: str) -> None:
    """The load: ``requests`` fetches of tiny.bin by ``clients`` tasks; prints one JSON line."""
    done = 0
    failures = 0
    started = 0

    async def worker() -> None:
        nonlocal done, failures, started
        while started < requests:
            started += 1
            try:
                res = await fetch(("127.0.0.1", port), "tiny.bin", retransmit=0.5, retries=3)
                if res.sha256 == want:
                    done += 1
                else:
                    failures += 1
            except (TftpError, TransferTimeout, OSError):
                failures += 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(worker)

    t0 = time.perf_counter()
    trio.run(main)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"done": done, "failures": failures, "seconds": wall,
                      "cpu": ru.ru_utime + ru.ru_stime}))


def start(label: str, where: str, extra: str, root: Path, port: int, workers: int,
          logdir: Path) -> tftp_peers.Running:
    served = root / "127.0.0.1"
    if where == "tftpd-hpa":
        bins = tftp_peers.fetch_peers(Path("/var/cache/vfsroot-bench"))
        cmd = [str(bins["tftpd-hpa"]), "-L", "-a", f"127.0.0.1:{port}", "-s", "-u", "root",
               "-B", "65464", str(served)]
        env = None
    elif where == "atftpd":
        bins = tftp_peers.fetch_peers(Path("/var/cache/vfsroot-bench"))
        cmd = [str(bins["atftpd"]), "--daemon", "--no-fork", "--port", str(port),
               "--bind-address", "127.0.0.1", "--user", "root.root", "--logfile",
               str(logdir / f"{label}.atftpd.log"), "--maxthread", "128", str(served)]
        env = None
    else:
        cmd = [sys.executable, "-m", "tftpd.cli", "--root", str(root), "--listen",
               f"127.0.0.1:{port}", "--blksize-max", "65464", "--max-sessions", "256",
               "--max-sessions-per-ip", "128", "--workers", str(workers),
               "--log-level", "WARNING", *shlex.split(extra)]
        env = dict(os.environ, PYTHONPATH=str(Path(where).resolve()))
    group = tftp_peers._cgroup(label)
    if group is not None:
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    log = open(logdir / f"{label}.log", "ab")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=where if where not in ("tftpd-hpa", "atftpd") else HERE)
    server = tftp_peers.Running(label, port, proc, group)
    deadline = time.monotonic() + 20
    while True:  # ready: one fetch succeeds
        try:
            trio.run(lambda: fetch(("127.0.0.1", port), "tiny.bin", retransmit=0.2, retries=2))
            return server
        except (TftpError, TransferTimeout, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise SystemExit(f"{label} did not start: see {logdir}/{label}.log") from None


def one_rate(server: tftp_peers.Running, args: argparse.Namespace, want: str) -> dict:
    # A warm-up outside the measurement (imports, caches, the thread pool).
    subprocess.run([sys.executable, __file__, "client", str(server.port), "200",
                    str(args.clients), want], check=True, capture_output=True, cwd=HERE)
    cpu0 = tftp_peers.server_cpu_seconds(server)
    out = subprocess.run([sys.executable, __file__, "client", str(server.port),
                          str(args.requests), str(args.clients), want],
                         check=True, capture_output=True, text=True, cwd=HERE).stdout
    cpu = tftp_peers.server_cpu_seconds(server) - cpu0
    res = json.loads(out.strip().splitlines()[-1])
    n = res["done"]
    return {"server_us": cpu / n * 1e6 if n else float("nan"),
            "client_us": res["cpu"] / n * 1e6 if n else float("nan"),
            "rate": n / res["seconds"], "failures": res["failures"]}


def one_lockstep(server: tftp_peers.Running, args: argparse.Namespace, want: str,
                 out: Path) -> dict:
    size = args.size_mib << 20
    cpu0 = tftp_peers.server_cpu_seconds(server)
    t0 = time.perf_counter()
    window = ["--option", f"windowsize {args.windowsize}"] if args.windowsize > 1 else []
    proc = subprocess.run([ATFTP, "-g", "-r", "big.bin", "-l", str(out), "--option",
                           f"blksize {args.blksize}", *window, "127.0.0.1", str(server.port)],
                          capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    cpu = tftp_peers.server_cpu_seconds(server) - cpu0
    h = hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else ""
    out.unlink(missing_ok=True)
    ok = proc.returncode == 0 and h == want
    return {"server_us_per_mb": cpu / (size / 1e6) * 1e6, "mbps": size / wall / 1e6,
            "us_per_block": wall / (size / args.blksize) * 1e6, "failures": 0 if ok else 1}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        client_main(int(argv[1]), int(argv[2]), int(argv[3]), argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["rate", "lockstep"])
    p.add_argument("--variant", nargs=3, action="append", required=True,
                   metavar=("LABEL", "DIR", "ARGS"))
    p.add_argument("--pairs", type=int, default=5, help="rounds of every variant in turn")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--size-mib", type=int, default=32)
    p.add_argument("--blksize", type=int, default=1428)
    p.add_argument("--windowsize", type=int, default=1,
                   help="lockstep mode: ask for this RFC 7440 window (default 1: lock-step)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vfsroot-smallreq-", dir="/dev/shm"))
    try:
        d = work / "root" / "127.0.0.1"
        d.mkdir(parents=True)
        tiny = os.urandom(1024)
        (d / "tiny.bin").write_bytes(tiny)
        big = os.urandom(args.size_mib << 20) if args.mode == "lockstep" else b""
        (d / "big.bin").write_bytes(big)
        wants = {"tiny": hashlib.sha256(tiny).hexdigest(), "big": hashlib.sha256(big).hexdigest()}
        logdir = work / "logs"
        logdir.mkdir()
        results: dict[str, list[dict]] = {v[0]: [] for v in args.variant}
        for rnd in range(args.pairs):
            k = rnd % len(args.variant)
            order = args.variant[k:] + args.variant[:k]
            for i, (label, where, extra) in enumerate(order):
                server = start(label, where, extra, work / "root", 6950 + i, args.workers,
                               logdir)
                try:
                    if args.mode == "rate":
                        r = one_rate(server, args, wants["tiny"])
                    else:
                        r = one_lockstep(server, args, wants["big"], work / "out.bin")
                finally:
                    server.stop()
                results[label].append(r)
                print(f"round {rnd + 1} {label}: "
                      + " ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)
        base = args.variant[0][0]
        print("\nmedians (ratio: median over rounds of variant / first variant, same round)")
        for label, runs in results.items():
            cells = []
            for key in runs[0]:
                med = statistics.median(r[key] for r in runs)
                ratios = [r[key] / b[key] for r, b in zip(runs, results[base], strict=True)
                          if b[key]]
                ratio = f" ({statistics.median(ratios):.3f}x)" if label != base and ratios else ""
                cells.append(f"{key}={med:.1f}{ratio}")
            print(f"{label:>12}: " + "  ".join(cells))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
