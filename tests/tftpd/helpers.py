"""Test helpers: a running server in a nursery, a raw packet-level client, a lossy UDP relay."""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from tftpd import packets
from tftpd.server import ListenSpec, ServerConfig, TftpServer
from tftpd.session import TransferPolicy

#: io_uring_setup's number: the same on every architecture (the syscall table's common part).
_NR_IO_URING_SETUP = 425

#: Fast timings for tests: a lost packet costs 0.1 s, not the 1 s default.
FAST = TransferPolicy(retransmit_timeout=0.1, retries=8)


def io_uring_refused() -> str | None:
    """Why this machine refuses a process an io_uring, asked of the kernel itself (one
    ``io_uring_setup``: a kernel before 5.7, the ``kernel.io_uring_disabled`` sysctl, a
    seccomp filter, an LSM all answer there), or None: then the compiled lane must batch its
    sends, and a lane that does not is a failure, not a skip."""
    major, minor = (int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    if (major, minor) < (5, 7):  # no IORING_FEAT_FAST_POLL (nor IORING_OP_SEND before 5.6)
        return f"kernel {os.uname().release} is older than 5.7"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(_NR_IO_URING_SETUP, 1, params)
    if fd < 0:
        return f"io_uring_setup: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_config(root: Path, **kw: object) -> ServerConfig:
    base = ServerConfig(
        root=root,
        listen=(ListenSpec("127.0.0.1", 0, socket.AF_INET),),
        policy=FAST,
        grace=1.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(root: Path, **kw: object) -> AsyncIterator[tuple[TftpServer, tuple[str, int]]]:
    """A server on 127.0.0.1:<free port>; yields (server, address) once it is bound."""
    server = TftpServer(make_config(root, **kw))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.run)
        try:
            yield server, addrs[0]
            # A client returns as soon as it sent its last ACK; let the server see it.
            with trio.move_on_after(0.5):
                await server.wait_idle()
        finally:
            nursery.cancel_scope.cancel()


class RawClient:
    """One client UDP port speaking raw packets, for behaviour no well-behaved client shows."""

    def __init__(self, server: tuple[str, int], bind: str = "127.0.0.1") -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind, 0))
        self.sock.setblocking(False)
        self.peer: tuple[str, int] | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rrq(self, filename: str, mode: str = "octet", **options: object) -> None:
        self.send_raw(packets.encode_request(
            packets.OP_RRQ, filename, mode, {k: str(v) for k, v in options.items()}))

    def send_raw(self, data: bytes, to: tuple[str, int] | None = None) -> None:
        self.sock.sendto(data, to or self.server)

    def send_peer(self, data: bytes) -> None:
        assert self.peer is not None, "no packet from the server yet"
        self.sock.sendto(data, self.peer)

    def ack(self, block: int) -> None:
        self.send_peer(packets.encode_ack(block))

    async def recv(self, timeout: float = 2.0) -> tuple[packets.Packet, tuple[str, int]] | None:
        """Next packet (any source), or None after ``timeout``; remembers the first server TID."""
        with trio.move_on_after(timeout):
            while True:
                try:
                    data, addr = self.sock.recvfrom(70000)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.sock)
                    continue
                if self.peer is None and addr[1] != self.server[1]:
                    self.peer = addr
                return packets.parse(data), addr
        return None

    async def expect(self, kind: type, timeout: float = 2.0) -> packets.Packet:
        got = await self.recv(timeout)
        assert got is not None, f"expected {kind.__name__}, got nothing within {timeout}s"
        assert isinstance(got[0], kind), f"expected {kind.__name__}, got {got[0]!r}"
        return got[0]

    async def quiet(self, seconds: float) -> list[packets.Packet]:
        """Everything that arrives within ``seconds`` (expected: nothing)."""
        seen = []
        deadline = trio.current_time() + seconds
        while (left := deadline - trio.current_time()) > 0:
            got = await self.recv(left)
            if got is None:
                break
            seen.append(got[0])
        return seen


class DaemonProcess:
    """vfsroot-tftpd (or any daemon) in a trio subprocess whose stderr is its log: tests wait
    for log lines instead of sleeping, and keep the whole log for their assertions."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = b""

    async def read_until(self, pattern: bytes, timeout: float = 15) -> re.Match[bytes]:
        """The first match of ``pattern`` in the log, reading more of it until it appears."""
        assert self.proc.stderr is not None
        with trio.fail_after(timeout):
            while (m := re.search(pattern, self.log)) is None:
                chunk = await self.proc.stderr.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"exited before {pattern!r}: {self.log.decode()}")
                self.log += chunk
        return m

    async def wait(self, timeout: float = 15) -> int:
        """Read the log to its end and return the exit status."""
        assert self.proc.stderr is not None
        with trio.fail_after(timeout):
            while chunk := await self.proc.stderr.receive_some(65536):
                self.log += chunk
            return await self.proc.wait()

    async def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then :meth:`wait`."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)


@dataclass
class Impairment:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # fraction of packets held back 1-5 ms (so later ones overtake)
    delay: float = 0.0  # seconds added to every packet


class LossyRelay:
    """A UDP relay between TFTP clients and a server that drops, duplicates, reorders and
    delays datagrams in both directions.

    TFTP changes ports mid-conversation (the server answers from a new TID), so the relay keeps
    one upstream socket per client and one client-facing socket per (client, server port): the
    client sees a new TID just as it would from the server.
    """

    def __init__(self, server: tuple[str, int], impairment: Impairment, seed: int = 1) -> None:
        self.server = server
        self.imp = impairment
        self.rng = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setblocking(False)
        self.address = self.front.getsockname()
        self.forwarded = self.dropped = self.duplicated = self.reordered = 0
        self._up: dict[tuple, socket.socket] = {}
        self._down: dict[tuple, socket.socket] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._pump, self.front, self._from_client_front)
            task_status.started()

    async def _pump(self, sock: socket.socket, handler) -> None:
        try:
            while True:
                try:
                    data, addr = sock.recvfrom(70000)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError:
                    continue
                handler(data, addr)
        finally:
            sock.close()

    def _upstream(self, client: tuple) -> socket.socket:
        sock = self._up.get(client)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self._up[client] = sock
            assert self._nursery is not None
            self._nursery.start_soon(
                self._pump, sock, lambda d, a, c=client: self._from_server(c, d, a))
        return sock

    def _from_client_front(self, data: bytes, client: tuple) -> None:
        self._forward(self._upstream(client), data, self.server)

    def _from_server(self, client: tuple, data: bytes, server: tuple) -> None:
        key = (client, server)
        down = self._down.get(key)
        if down is None:
            down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            down.bind(("127.0.0.1", 0))
            down.setblocking(False)
            self._down[key] = down
            up = self._up[client]
            assert self._nursery is not None
            self._nursery.start_soon(
                self._pump, down, lambda d, a, u=up, s=server: self._forward(u, d, s))
        self._forward(down, data, client)

    def _forward(self, sock: socket.socket, data: bytes, to: tuple) -> None:
        imp, rng = self.imp, self.rng
        if rng.random() < imp.drop:
            self.dropped += 1
            return
        copies = 1
        if rng.random() < imp.duplicate:
            copies = 2
            self.duplicated += 1
        for _ in range(copies):
            delay = imp.delay
            if rng.random() < imp.reorder:
                delay += rng.uniform(0.001, 0.005)
                self.reordered += 1
            if delay > 0:
                assert self._nursery is not None
                self._nursery.start_soon(self._later, sock, data, to, delay)
            else:
                self._send(sock, data, to)

    async def _later(self, sock: socket.socket, data: bytes, to: tuple, delay: float) -> None:
        await trio.sleep(delay)
        self._send(sock, data, to)

    def _send(self, sock: socket.socket, data: bytes, to: tuple) -> None:
        try:
            sock.sendto(data, to)
            self.forwarded += 1
        except OSError:
            pass


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """Write ``size`` pseudo-random bytes (fast even for 33 MiB); returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            chunk = rng.randbytes(n)
            f.write(chunk)
            h.update(chunk)
            left -= n
    return h.hexdigest()


def ensure_dir(path: Path) -> Path:
    os.makedirs(path, exist_ok=True)
    return path
