"""Hostile packets against a real `vfsroot-tftpd` process, while an honest client fetches.

Shared by tests/security/test_hostile_packets.py (short form, in CI) and bench/hostile.py (long
form).  The server runs as its own process so its memory and descriptors can be read from
/proc without the sprayer's own being counted.  Datagrams come from tests/fuzz.py and go to
three places:

* the listen port, from a sprayer address with its own directory (so some junk requests
  become real sessions, which the junk that follows must not steer or keep alive forever);
* the transfer port of a session the sprayer opened itself, from that session's own client
  port (the one place where an ACK could be accepted: anything but a well-formed ACK or
  ERROR must be ignored, RFC 1350 section 4);
* the transfer port of the honest client's running transfer, from another address (a wrong
  TID: it must be ignored, and the honest transfer must end with the right bytes).

The sprayer paces itself on the server: every `PING_EVERY` datagrams it asks the listen port
for a missing file and waits for the ERROR, so every datagram before it was read (none lost
in a full socket buffer), and the wait is the server's worst answer time under fire.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.fuzz import datagram
from tftpd import packets

HONEST = "127.0.0.10"
SPRAYER = "127.0.0.11"
WRONG_TID = "127.0.0.12"
PINGER = "127.0.0.13"
PING_EVERY = 50
HONEST_FILE = "boot.img"
HONEST_SIZE = 3 * 1024 * 1024 + 17


def make_tree(root: Path) -> str:
    """The served tree: the honest client's file (returns its sha256) and the sprayer's."""
    rng = random.Random(11)
    data = rng.randbytes(HONEST_SIZE)
    (root / HONEST).mkdir(parents=True, exist_ok=True)
    (root / HONEST / HONEST_FILE).write_bytes(data)
    (root / SPRAYER).mkdir(parents=True, exist_ok=True)
    (root / SPRAYER / "whoami").write_bytes(b"sprayer\n")
    (root / SPRAYER / "big.bin").write_bytes(rng.randbytes(2 * 1024 * 1024))
    return hashlib.sha256(data).hexdigest()


@dataclass
class Sample:
    sent: int
    rss_kib: int
    fds: int
    threads: int


@dataclass
class Report:
    """What a run held; `lines()` is what the test and the bench print."""

    sent: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    honest_ok: int = 0
    honest_bad: list[str] = field(default_factory=list)
    honest_retries: int = 0
    sessions_opened: int = 0
    pings: int = 0
    ping_resends: int = 0
    #: hostile datagrams the kernel dropped at the listen port (its buffer was full)
    kernel_drops: int = 0
    worst_ping: float = 0.0
    #: the server before the storm, after the first `warmup` datagrams (the reference:
    #: first-use allocations are over), every `sample_every`, and idle after the storm
    samples: list[Sample] = field(default_factory=list)
    warm: Sample | None = None
    honest_during: int = 0
    idle_fds: tuple[int, int] = (0, 0)
    exit_code: int | None = None
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def lines(self) -> list[str]:
        first, last = self.warm or self.samples[0], self.samples[-1]
        return [
            f"hostile datagrams: {self.total} in {self.seconds:.1f} s "
            f"({', '.join(f'{k}={v}' for k, v in sorted(self.sent.items()))})",
            f"kinds: {', '.join(f'{k}={v}' for k, v in sorted(self.kinds.items()))}",
            f"honest fetches: {self.honest_ok} ok ({self.honest_during} during the storm), "
            f"{len(self.honest_bad)} bad "
            f"(sha256 of every one checked), {self.honest_retries} ACK re-sends",
            f"sprayer sessions opened and sprayed at: {self.sessions_opened}",
            f"listen port pings: {self.pings}, worst answer {self.worst_ping * 1000:.0f} ms, "
            f"{self.ping_resends} re-sent; datagrams dropped by the kernel before the server "
            f"read them: {self.kernel_drops}",
            f"server RSS before the storm {self.samples[0].rss_kib} KiB; first (after "
            f"{first.sent} datagrams) / last: {first.rss_kib} / {last.rss_kib} KiB "
            f"(max {max(s.rss_kib for s in self.samples)} KiB)",
            f"server fds idle first/last: {self.idle_fds[0]} / {self.idle_fds[1]}; "
            f"threads first/last: {first.threads} / {last.threads}",
            f"server exit code after SIGTERM: {self.exit_code}",
        ]


def proc_sample(pid: int, sent: int) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return Sample(sent, rss, len(os.listdir(f"/proc/{pid}/fd")), threads)


class Server:
    """`vfsroot-tftpd --root ROOT --listen 127.0.0.1:0` with fast retransmits; stopped by
    SIGTERM (its exit code is part of the report)."""

    def __init__(self, root: Path, log: Path) -> None:
        self._log = log.open("wb")
        launcher = "import sys; from tftpd.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launcher, "--root", str(root), "--listen", "127.0.0.1:0",
             "--retransmit", "0.2", "--retries", "3", "--log-level", "INFO"],
            stdout=subprocess.DEVNULL, stderr=self._log, cwd=Path(__file__).parents[2])
        self.log = log
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = re.search(rb"listening addresses=127\.0\.0\.1:(\d+)", log.read_bytes())
            if m:
                self.address = ("127.0.0.1", int(m.group(1)))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("vfsroot-tftpd did not start:\n" + log.read_text(errors="replace"))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                return None
        self._log.close()
        return self.proc.returncode


def _udp(bind: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.setblocking(False)
    return s


def _drain(s: socket.socket) -> list[tuple[bytes, tuple]]:
    out = []
    while True:
        try:
            out.append(s.recvfrom(70000))
        except BlockingIOError:
            return out


class Honest:
    """A lock-step client fetching the same file again and again; `peer` is the transfer
    port of the fetch in progress (the sprayer aims at it)."""

    def __init__(self, server: tuple[str, int], want: str, report: Report) -> None:
        self.server, self.want, self.report = server, want, report
        self.peer: tuple[str, int] | None = None
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            await self.fetch_once()

    async def fetch_once(self) -> None:
        rep = self.report
        with _udp(HONEST) as s:
            s.sendto(packets.encode_request(packets.OP_RRQ, HONEST_FILE, "octet",
                                            {"blksize": "1468"}), self.server)
            digest, expected, last_sent, size = hashlib.sha256(), 1, b"", 0
            peer: tuple[str, int] | None = None
            quiet_rounds = 0
            while True:
                got = None
                with trio.move_on_after(1.0):
                    while got is None:
                        await trio.lowlevel.wait_readable(s)
                        with contextlib.suppress(BlockingIOError):
                            got = s.recvfrom(70000)
                if got is None:
                    quiet_rounds += 1
                    if quiet_rounds > 5:
                        rep.honest_bad.append(f"stalled at {size} bytes")
                        return
                    rep.honest_retries += 1
                    if peer is None:
                        s.sendto(packets.encode_request(packets.OP_RRQ, HONEST_FILE, "octet",
                                                        {"blksize": "1468"}), self.server)
                    else:
                        s.sendto(last_sent, peer)
                    continue
                data, addr = got
                if peer is None:
                    peer = addr
                    self.peer = addr
                if addr != peer:
                    rep.honest_bad.append(f"packet from {addr}, transfer is {peer}")
                    return
                quiet_rounds = 0
                pkt = packets.parse(data)
                if isinstance(pkt, packets.OptionAck):
                    last_sent = packets.encode_ack(0)
                    s.sendto(last_sent, peer)
                    continue
                if isinstance(pkt, packets.Error):
                    rep.honest_bad.append(f"ERROR {pkt.code} {pkt.message!r} at {size} bytes")
                    return
                if not isinstance(pkt, packets.Data):
                    rep.honest_bad.append(f"unexpected {pkt!r}")
                    return
                if pkt.block == expected & 0xFFFF:
                    digest.update(pkt.payload)
                    size += len(pkt.payload)
                    expected += 1
                    last_sent = packets.encode_ack(pkt.block)
                    s.sendto(last_sent, peer)
                    if len(pkt.payload) < 1468:
                        break
                else:
                    s.sendto(last_sent, peer)  # a retransmission: ACK where we are
            self.peer = None
        if digest.hexdigest() == self.want and size == HONEST_SIZE:
            rep.honest_ok += 1
        else:
            rep.honest_bad.append(f"wrong bytes: {size} bytes sha256 {digest.hexdigest()}")


async def _ping(pinger: socket.socket, server: tuple[str, int], n: int, report: Report) -> None:
    """Ask for a missing file; the ERROR proves every earlier datagram was read.  A ping
    lost in a full socket buffer is sent again after a second (and counted)."""
    request = packets.encode_request(packets.OP_RRQ, f"ping-{n}", "octet", {})
    t0 = time.monotonic()
    for _attempt in range(10):
        pinger.sendto(request, server)
        with trio.move_on_after(1.0):
            while True:
                await trio.lowlevel.wait_readable(pinger)
                for data, _addr in _drain(pinger):
                    pkt = packets.parse(data)
                    if isinstance(pkt, packets.Error) and pkt.code == 1:
                        report.pings += 1
                        report.worst_ping = max(report.worst_ping, time.monotonic() - t0)
                        return
        report.ping_resends += 1
    raise AssertionError(f"the listen port did not answer ping-{n} for 10 s")


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at 127.0.0.1:`port` because its buffer was full."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == f"0100007F:{port:04X}":
            return int(cols[-1])
    return 0


async def _wait_idle_fds(pid: int, want: int, timeout: float) -> int:
    """Descriptor count once sessions have ended (they time out after ~1 s)."""
    deadline = time.monotonic() + timeout
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    while fds != want and time.monotonic() < deadline:
        await trio.sleep(0.1)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    return fds


async def storm(root: Path, log: Path, count: int, seed: int = 1,
                sample_every: int = 5000, warmup: int = 2000) -> Report:
    """Send `count` hostile datagrams while the honest client fetches; the report says
    what held.  Runs the server from start to SIGTERM."""
    want = make_tree(root)
    report = Report()
    server = Server(root, log)
    pid = server.proc.pid
    rng = random.Random(seed)
    try:
        honest = Honest(server.address, want, report)
        before_ok = 0
        await honest.fetch_once()  # warm: code paths, thread pool, page cache
        first_idle = await _wait_idle_fds(pid, -1, 0.5)
        report.samples.append(proc_sample(pid, 0))
        t0 = time.monotonic()
        with _udp(SPRAYER) as listen_spray, _udp(WRONG_TID) as tid_spray, \
                _udp(PINGER) as pinger:
            own: socket.socket | None = None
            own_peer: tuple[str, int] | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(honest.run)
                for i in range(1, count + 1):
                    # a session of our own to aim at: (re)open it when it ended
                    if (own is None and i % 50 == 1) or i % 500 == 0:
                        if own is not None:
                            own.close()
                        own, own_peer = _udp(SPRAYER), None
                        own.sendto(packets.encode_request(packets.OP_RRQ, "big.bin", "octet",
                                                          {}), server.address)
                        report.sessions_opened += 1
                    for data, addr in (_drain(own) if own is not None else []):
                        if data[:2] == b"\x00\x03" and own_peer is None:
                            own_peer = addr
                        elif data[:2] == b"\x00\x05":
                            own.close()
                            own = None
                            break
                    target = i % 10
                    if target < 6 or (target < 8 and own_peer is None) or (
                            target >= 8 and honest.peer is None):
                        kind, data = datagram(rng)
                        listen_spray.sendto(data, server.address)
                        report.sent["listen"] += 1
                    elif target < 8:
                        kind, data = datagram(rng, errors=False)
                        assert own is not None and own_peer is not None
                        own.sendto(data, own_peer)
                        report.sent["own-session"] += 1
                    else:
                        kind, data = datagram(rng)
                        tid_spray.sendto(data, honest.peer)  # type: ignore[arg-type]
                        report.sent["honest-session-wrong-tid"] += 1
                    report.kinds[kind] += 1
                    if i % 50 == 0:
                        _drain(listen_spray)
                        _drain(tid_spray)
                    if i % PING_EVERY == 0:
                        await _ping(pinger, server.address, i, report)
                    if i % sample_every == 0 or i == warmup:
                        report.samples.append(proc_sample(pid, i))
                        if i == warmup:
                            report.warm = report.samples[-1]
                            before_ok = report.honest_ok
                honest.stop = True
            report.honest_during = report.honest_ok - before_ok
            if own is not None:
                own.close()
        report.seconds = time.monotonic() - t0
        report.kernel_drops = udp_drops(server.address[1])
        await honest.fetch_once()  # still served after the storm
        last_idle = await _wait_idle_fds(pid, first_idle, 10)
        report.samples.append(proc_sample(pid, count))
        report.idle_fds = (first_idle, last_idle)
    finally:
        report.exit_code = server.stop()
    return report
