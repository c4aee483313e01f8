"""How far the pump is from the floor: a 16-client lock-step storm served by two bare-bones
Python servers and by vfsroot-tftpd (and tftpd-hpa), same run, interleaved.  Run as root:

    flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/pump_floor.py [--rounds 3]

The floors do nothing but lock-step DATA from a file held in memory as ready-made frames (no
timers, retransmissions, limits, logging, read-ahead or trio), with ``--workers`` processes on
one SO_REUSEPORT address like ours:

- ``floor-per``: a connected socket per transfer, one ``epoll`` over them, ``recv_into`` and
  ``send`` per ACK: our pump's design with nothing else in it.
- ``floor-mmsg``: one unconnected data socket per process shared by every transfer, ACKs
  demultiplexed by the client's address, one ``recvmmsg`` for every ACK queued and one
  ``sendmmsg`` for all the DATA they call for (ctypes: the socket module has neither).  The
  design that trades the per-transfer port (a TID per transfer, ICMP errors per transfer) for
  two system calls per batch.

It answers two questions with figures: what the server's own Python and bookkeeping cost over
a bare loop (``vfsroot-tftpd`` against ``floor-per``), and whether batching the system calls
across transfers would pay (``floor-mmsg`` against ``floor-per``).  Clients: atftp, blksize
1428, every file checked by sha256.  Prints medians, the server's user and system CPU per
packet, its voluntary and involuntary context switches per packet (main threads), and ratios
to ``floor-per``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tftp  # noqa: E402
import tftp_peers  # noqa: E402

BLK = 1428
PORT = 7001
OACK = b"\x00\x06blksize\x001428\x00"  # atftp asks for exactly this
CACHE = Path("/var/cache/vfsroot-bench")


# -- the floor servers ---------------------------------------------------------------------------

class Frames:
    """The whole file as DATA datagrams back to back, headers written once."""

    def __init__(self, data: bytes) -> None:
        self.count = len(data) // BLK + 1  # the last block is short (maybe empty)
        self.buf = bytearray(self.count * (BLK + 4))
        self.lens: list[int] = []
        for i in range(self.count):
            chunk = data[i * BLK:(i + 1) * BLK]
            off = i * (BLK + 4)
            struct.pack_into("!HH", self.buf, off, 3, (i + 1) & 0xFFFF)
            self.buf[off + 4:off + 4 + len(chunk)] = chunk
            self.lens.append(4 + len(chunk))
        self.view = memoryview(self.buf)

    def frame(self, index: int) -> memoryview:
        off = index * (BLK + 4)
        return self.view[off:off + self.lens[index]]


def _listen(port: int, workers: int) -> socket.socket:
    """One SO_REUSEPORT socket per process, like vfsroot-tftpd's workers."""
    for _ in range(workers - 1):
        if os.fork() == 0:
            break
    lis = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lis.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    lis.bind(("127.0.0.1", port))
    lis.setblocking(False)
    return lis


def serve_per(frames: Frames, lis: socket.socket) -> None:
    """A connected socket per transfer; one ACK taken and one DATA sent per ready socket."""
    ep = select.epoll()
    ep.register(lis.fileno(), select.EPOLLIN)
    transfers: dict[int, list] = {}  # fd -> [socket, index of the next frame]
    buf = bytearray(64)
    while True:
        for fd, _ in ep.poll(-1, 512):
            if fd == lis.fileno():
                try:
                    _, addr = lis.recvfrom(600)
                except BlockingIOError:
                    continue
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("127.0.0.1", 0))
                s.connect(addr)
                s.setblocking(False)
                s.send(OACK)
                transfers[s.fileno()] = [s, 0]
                ep.register(s.fileno(), select.EPOLLIN)
                continue
            t = transfers[fd]
            t[0].recv_into(buf)
            cur = t[1]
            if ((buf[2] << 8) | buf[3]) != (cur & 0xFFFF):
                continue
            if cur == frames.count:  # the last block's ACK
                ep.unregister(fd)
                t[0].close()
                del transfers[fd]
                continue
            t[0].send(frames.frame(cur))
            t[1] = cur + 1


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint32)]


def serve_mmsg(frames: Frames, lis: socket.socket, batch: int = 64) -> None:
    """One data socket for every transfer; a batch of ACKs in, a batch of DATA out."""
    libc = ctypes.CDLL(None, use_errno=True)
    recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                         ctypes.c_void_p]
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data.bind(("127.0.0.1", 0))
    data.setblocking(False)
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    ep = select.epoll()
    ep.register(lis.fileno(), select.EPOLLIN)
    ep.register(data.fileno(), select.EPOLLIN)
    # Receiving: a 16-byte sockaddr and a 32-byte buffer per slot.
    names = ctypes.create_string_buffer(16 * batch)
    bufs = ctypes.create_string_buffer(32 * batch)
    riov = (_Iovec * batch)()
    rmsgs = (_Mmsghdr * batch)()
    for i in range(batch):
        riov[i].base, riov[i].len = ctypes.addressof(bufs) + 32 * i, 32
        rmsgs[i].hdr.name, rmsgs[i].hdr.namelen = ctypes.addressof(names) + 16 * i, 16
        rmsgs[i].hdr.iov, rmsgs[i].hdr.iovlen = ctypes.addressof(riov) + 16 * i, 1
    # Sending: per slot the client's sockaddr and one iovec into the frames, written in place.
    slots = bytearray(32 * batch)
    slots_at = ctypes.addressof(ctypes.c_char.from_buffer(slots))
    frames_at = ctypes.addressof(ctypes.c_char.from_buffer(frames.buf))
    smsgs = (_Mmsghdr * batch)()
    for i in range(batch):
        smsgs[i].hdr.name, smsgs[i].hdr.namelen = slots_at + 32 * i, 16
        smsgs[i].hdr.iov, smsgs[i].hdr.iovlen = slots_at + 32 * i + 16, 1
    name_view = memoryview(names).cast("B")
    buf_view = memoryview(bufs).cast("B")
    fd, rmsgs_at, smsgs_at = data.fileno(), ctypes.addressof(rmsgs), ctypes.addressof(smsgs)
    pack_into, lens = struct.pack_into, frames.lens
    transfers: dict[bytes, list[int]] = {}  # client sockaddr -> [index of the next frame]
    while True:
        for ready, _ in ep.poll(-1, 8):
            if ready != lis.fileno():
                continue
            try:
                _, addr = lis.recvfrom(600)
            except BlockingIOError:
                continue
            key = struct.pack("=H", socket.AF_INET) + struct.pack(
                "!H4s8x", addr[1], socket.inet_aton(addr[0]))
            transfers[key] = [0]
            data.sendto(OACK, addr)
        while True:
            n = recvmmsg(fd, rmsgs_at, batch, socket.MSG_DONTWAIT, None)
            if n <= 0:
                break
            out = 0
            for i in range(n):
                key = bytes(name_view[16 * i:16 * i + 16])
                t = transfers.get(key)
                if t is None:
                    continue
                cur = t[0]
                if ((buf_view[32 * i + 2] << 8) | buf_view[32 * i + 3]) != (cur & 0xFFFF):
                    continue
                if cur == frames.count:
                    del transfers[key]
                    continue
                slots[32 * out:32 * out + 16] = key
                pack_into("QQ", slots, 32 * out + 16, frames_at + cur * (BLK + 4), lens[cur])
                t[0] = cur + 1
                out += 1
            if out:
                sendmmsg(fd, smsgs_at, out, 0)
            if n < batch:
                break


def serve(mode: str, port: int, path: Path, workers: int) -> None:
    frames = Frames(path.read_bytes())
    lis = _listen(port, workers)
    (serve_per if mode == "floor-per" else serve_mmsg)(frames, lis)


# -- the harness ---------------------------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    """The process and its live descendants (the floors' and our workers)."""
    return [pid, *(p for c in tftp_peers._children(pid) for p in _tree(c))]


def _ticks(pids: list[int], group: Path | None) -> tuple[int, int, int, int]:
    """utime, stime (clock ticks: from the server's cpuacct group when it has one, which
    counts tftpd-hpa's per-transfer children, else from /proc), voluntary and involuntary
    switches of the main threads."""
    user = system = vol = inv = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        if group is None:
            user, system = user + int(fields[11]), system + int(fields[12])
        for line in status:
            if line.startswith("voluntary_ctxt_switches"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                inv += int(line.split()[1])
    if group is not None:
        with contextlib.suppress(OSError, ValueError):
            stat = dict(line.split() for line in (group / "cpuacct.stat").read_text().splitlines())
            user, system = int(stat["user"]), int(stat["system"])
    return user, system, vol, inv


def run(args: argparse.Namespace) -> None:
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="vfsroot-floor-", dir="/dev/shm"))
    servers: list[tftp_peers.Running] = []
    try:
        root = work / "root"
        digests = tftp.make_data(root, 4096, size)
        small = root / "127.0.0.1" / "small.bin"
        outdir, logdir = work / "out", work / "logs"
        outdir.mkdir()
        logdir.mkdir()
        modes = args.modes.split(",")
        peers = [m for m in modes if not m.startswith("floor-")]
        if peers:
            bins = tftp_peers.fetch_peers(CACHE)
            servers = tftp_peers.start_servers(bins, root, logdir, max_clients=64,
                                               workers=args.workers,
                                               python_lane="vfsroot-py" in modes)
            for s in servers:
                if s.name not in peers:
                    s.stop()
        ports = {s.name: s.port for s in servers}
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for rnd in range(args.rounds):
            for mode in modes[rnd % len(modes):] + modes[:rnd % len(modes)]:
                proc = None
                if mode.startswith("floor-"):
                    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode,
                                             str(PORT), str(small), str(args.workers)],
                                            start_new_session=True)  # its workers too
                    time.sleep(1.0)
                    pid, port = proc.pid, PORT
                else:
                    pid, port = next(s.pid for s in servers if s.name == mode), ports[mode]
                server = next((s for s in servers if s.name == mode), None)
                group = server.cgroup if server else None
                cpu0 = tftp_peers.server_cpu_seconds(server) if server else 0.0
                t0 = _ticks(_tree(pid), group)
                c = tftp.concurrent(port, args.clients, size, digests["small.bin"], outdir)
                t1 = _ticks(_tree(pid), group)
                cpu = (tftp_peers.server_cpu_seconds(server) - cpu0 if server
                       else (t1[0] + t1[1] - t0[0] - t0[1]) / os.sysconf("SC_CLK_TCK"))
                if proc is not None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
                packets = c["bytes"] / BLK
                tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
                row = {"MB/s": c["agg"], "CPU s/GB": cpu / (c["bytes"] / 1e9),
                       "usr us/pkt": (t1[0] - t0[0]) * tick_us / packets,
                       "sys us/pkt": (t1[1] - t0[1]) * tick_us / packets,
                       "vol cs/pkt": (t1[2] - t0[2]) / packets,
                       "inv cs/pkt": (t1[3] - t0[3]) / packets,
                       "failures": c["failures"]}
                results[mode].append(row)
                print(f"round {rnd + 1} {mode:14s}",
                      " ".join(f"{k}={v:.2f}" for k, v in row.items()), file=sys.stderr,
                      flush=True)
        print_table(results, args)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    print(f"\n{args.clients} clients x {args.size_mib} MiB lock-step @{BLK} (atftp), medians of "
          f"{args.rounds}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          "usr/sys: server CPU per DATA packet; cs: context switches of its main threads")
    keys = list(next(iter(results.values()))[0])
    print(f"{'':16s}" + "".join(f"{k:>12s}" for k in keys) + f"{'vs floor-per':>14s}")
    base = results.get("floor-per")
    base_rate = statistics.median(r["MB/s"] for r in base) if base else None
    for mode, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        ratio = f"{med['MB/s'] / base_rate:.2f}x" if base_rate else "-"
        print(f"{mode:16s}" + "".join(f"{med[k]:12.2f}" for k in keys) + f"{ratio:>14s}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--size-mib", type=int, default=16)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes per server (default: one per CPU, vfsroot's default)")
    p.add_argument("--modes", default="floor-per,floor-mmsg,vfsroot,tftpd-hpa")
    p.add_argument("--serve", nargs=4, metavar=("MODE", "PORT", "FILE", "WORKERS"),
                   help=argparse.SUPPRESS)  # the floor server itself, started by the harness
    args = p.parse_args(argv)
    if args.serve:
        mode, port, path, workers = args.serve
        serve(mode, int(port), Path(path), int(workers))
        return 0
    status = tftp_peers.in_private_netns(__file__, argv, CACHE)
    if status is not None:
        return status
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
