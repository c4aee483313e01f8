"""The transfer pump (tftpd/pump.py) with real sockets: batching, UDP GSO and its fallback,
losses with GSO on and off, and limits shared by worker processes."""

from __future__ import annotations

import errno
import heapq
import json
import os
import select
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from tftpd import pump as pump_mod
from tftpd.client import fetch
from tftpd.limits import BUSY, PER_IP, SessionLimits

from .conftest import CLIENT_A, LOCAL
from .helpers import FAST, Impairment, LossyRelay, file_sha256, make_file, running


@pytest.mark.parametrize("lane", [True, False], ids=["compiled-lane", "python-lane"])
@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize("windowsize", [1, 16])
async def test_lossy_relay_with_and_without_gso(tree: Path, windowsize: int, gso: bool,
                                                lane: bool) -> None:
    """Drop, duplicate and reorder between client and server: the bytes arrive exactly,
    whether lock-step ACKs are answered by the compiled lane or in Python."""
    make_file(tree / LOCAL / "400k.bin", 400_000, seed=windowsize)
    want = file_sha256(tree / LOCAL / "400k.bin")
    imp = Impairment(drop=0.03, duplicate=0.05, reorder=0.1)
    policy = replace(FAST, retransmit_timeout=0.03, retries=20, gso=gso, compiled_lane=lane)
    async with running(tree, policy=policy) as (server, addr), trio.open_nursery() as nursery:
        relay = LossyRelay(addr, imp, seed=windowsize + 10 * gso)
        await nursery.start(relay.run)
        with trio.fail_after(90):
            res = await fetch(relay.address, "400k.bin", blksize=1428,
                              windowsize=windowsize if windowsize > 1 else None,
                              retransmit=0.05, retries=20, dally=0.2)
        nursery.cancel_scope.cancel()
        pump = server.pump
        assert pump is not None
        if gso and windowsize > 1:
            assert pump.gso_sends > 0
        else:
            assert pump.gso_sends == 0
        assert pump.compiled_lane == lane
        lane_sent = pump._lane.datagrams if pump._lane is not None else 0
        if lane and windowsize == 1:
            assert lane_sent > 0  # (and the losses went through the hand-over both ways)
        else:
            assert lane_sent == 0  # windows never enter the lane
    assert res.sha256 == want
    assert relay.dropped > 0 and server.stats.retransmits > 0
    assert server.stats.completed == 1


async def test_a_window_leaves_in_few_system_calls(tree: Path) -> None:
    """windowsize 16 @1428: one sendmsg carries a window (16 x 1432 bytes).

    A window goes out in pieces when its blocks are not read yet (the reads run in worker
    threads, and on a loaded machine they lag), so the bound is an average of at least four
    datagrams per system call, not exactly one call per window; sending each datagram alone
    (with or without UDP_SEGMENT) still fails it."""
    want = file_sha256(tree / CLIENT_A / "1m.bin")
    async with running(tree) as (server, addr):
        res = await fetch(addr, "1m.bin", blksize=1428, windowsize=16, bind=CLIENT_A)
        pump = server.pump
        assert pump is not None
        blocks = (1 << 20) // 1428 + 1
        assert res.sha256 == want
        assert pump.datagrams == blocks
        assert pump.gso_sends <= blocks // 4
        assert pump.gso_sends >= blocks // 16 - 1


async def test_gso_refused_by_the_kernel_falls_back_per_datagram(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel refuses UDP_SEGMENT (a route without checksum offload, a segment
    over the MTU), the transfer goes on with one send() per datagram."""
    refused = 0

    class NoGso(socket.socket):
        def sendmsg(self, buffers, ancdata=(), *args):  # type: ignore[no-untyped-def]
            nonlocal refused
            if any(level == pump_mod.SOL_UDP and kind == pump_mod.UDP_SEGMENT
                   for level, kind, _ in ancdata):
                refused += 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return super().sendmsg(buffers, ancdata, *args)

    monkeypatch.setattr(socket, "socket", NoGso)
    want = file_sha256(tree / CLIENT_A / "1m.bin")
    async with running(tree) as (server, addr):
        res = await fetch(addr, "1m.bin", blksize=1428, windowsize=16, bind=CLIENT_A)
        pump = server.pump
        assert pump is not None and pump.gso_sends == 0
    assert res.sha256 == want
    assert refused == 1  # once per transfer, then it stops asking
    assert server.stats.completed == 1 and server.stats.retransmits == 0


async def test_concurrent_transfers_share_wakeups(tree: Path) -> None:
    """Sixteen lock-step transfers at once: the pump answers many ACKs per wake-up."""
    want = file_sha256(tree / CLIENT_A / "1m.bin")
    results = []
    async with running(tree, max_sessions_per_ip=32) as (server, addr):
        async with trio.open_nursery() as nursery:
            async def one() -> None:
                results.append(await fetch(addr, "1m.bin", blksize=1428, bind=CLIENT_A))
            for _ in range(16):
                nursery.start_soon(one)
        pump = server.pump
        assert pump is not None
        assert [r.sha256 for r in results] == [want] * 16
        assert pump.datagrams >= 16 * ((1 << 20) // 1428 + 1)
        assert pump.wakeups < pump.datagrams / 2, (pump.wakeups, pump.datagrams)


async def test_a_lock_step_storm_through_the_compiled_lane_never_stalls(tree: Path) -> None:
    """Sixteen client processes at once, each ACK answered by the compiled lane, and every
    32 blocks (the smallest read-ahead) the transfer handed back to the pump for its next
    chunk and armed again.  The server's retransmission timer and the clients' are 30 s: an
    ACK the lane read and the pump then lost (it once dropped one poll's events when its
    time slice ended) would hold its transfer until that timer, far past the deadline here."""
    want = file_sha256(tree / LOCAL / "big.bin")
    policy = replace(FAST, retransmit_timeout=30.0, read_ahead=4096)
    results: list[dict[str, object]] = []
    async with running(tree, policy=policy, max_sessions_per_ip=32) as (server, addr):
        async def one() -> None:
            proc = await trio.run_process(
                [sys.executable, "-m", "tftpd.client", f"{addr[0]}:{addr[1]}", "big.bin",
                 "--blksize", "1428", "--retransmit", "30"],
                capture_stdout=True, cwd=Path(__file__).resolve().parents[2])
            results.append(json.loads(proc.stdout))
        with trio.fail_after(25):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(one)
        pump = server.pump
        assert pump is not None and pump._lane is not None
        lane_sent = pump._lane.datagrams
        total = pump.datagrams
    assert [r["sha256"] for r in results] == [want] * 16
    assert server.stats.completed == 16 and server.stats.retransmits == 0
    assert total == 16 * (3_000_000 // 1428 + 1)
    # Every ACK but the ones at a chunk's end (1 in 32) and the first of each transfer.
    assert lane_sent >= total * 0.9, (lane_sent, total)


async def test_watched_sockets_are_read_from_the_pump(
        tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A watched socket's callback runs from the pump's pass; one that raises is logged and
    the pump goes on serving transfers; an unwatched socket is not called back."""
    calls: list[bytes] = []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)

    def on_readable() -> None:
        data = a.recv(64)
        calls.append(data)
        if data == b"raise":
            raise RuntimeError("a bug in a callback")

    with a, b:
        async with running(tree) as (server, addr):
            pump = server.pump
            assert pump is not None
            pump.watch(a.fileno(), on_readable)
            b.send(b"raise")
            b.send(b"one")
            res = await fetch(addr, "whoami", bind=CLIENT_A)
            assert res.size == len(CLIENT_A) + 1
            with trio.fail_after(5):
                while len(calls) < 2:
                    await trio.sleep(0.01)
            pump.unwatch(a.fileno())
            b.send(b"two")
            res = await fetch(addr, "whoami", bind=CLIENT_A)
            assert res.size == len(CLIENT_A) + 1
            await trio.sleep(0.1)
    assert calls == [b"raise", b"one"]
    assert any("watched socket failed" in r.getMessage() for r in caplog.records)


def test_waiting_in_epoll_backs_off_where_it_does_not_pay() -> None:
    """A pass that finds nothing waits in epoll itself (no trio round trip) while transfers
    run.  A wait that finds nothing passes up the next chances, twice as many after each such
    miss in a row; one that finds something (or a due timer) starts over."""
    pump = pump_mod.Pump()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    clock = time.perf_counter
    try:
        pump.watch(a.fileno(), lambda: None)
        far = clock() + 60
        assert pump._wait_direct(far) is None  # no transfer runs: sleep in trio
        pump._by_fd[-1] = None  # type: ignore[assignment]  # stands for a running transfer
        waited = []
        for _ in range(7):
            t0 = clock()
            assert pump._wait_direct(far) is None
            waited.append(clock() - t0 >= pump_mod._DIRECT_WAIT * 0.9)
        # wait, pass up 1, wait, pass up 2, wait, pass up 4 ...
        assert waited == [True, False, True, False, False, True, False], waited
        for _ in range(3):  # the last three chances passed up
            assert pump._wait_direct(far) is None
        b.send(b"ack")
        assert pump._wait_direct(far) == [(a.fileno(), select.EPOLLIN)]
        assert pump._direct_backoff == 1
        a.recv(16)
        t0 = clock()
        assert pump._wait_direct(clock() - 1) is None  # past the yield budget: no wait
        assert clock() - t0 < pump_mod._DIRECT_WAIT / 2
        # A timer due within the wait ends it, and is no miss: the next pass fires it.
        heapq.heappush(pump._timers, (clock() + 0.0002, 0, None))  # type: ignore[arg-type]
        assert pump._wait_direct(far) == []
        assert (pump._direct_skip, pump._direct_backoff) == (0, 1)
        assert pump._wait_direct(far) == []  # already due: no wait
    finally:
        pump.unwatch(a.fileno())
        pump.close()
        a.close()
        b.close()


def test_a_call_posted_by_a_thread_ends_a_wait_in_epoll_and_runs_from_the_pass() -> None:
    """A read-ahead's result comes back through the pump's eventfd (``Pump.post``): a pump
    waiting in epoll itself wakes for it at once instead of after the wait's millisecond,
    and once the pump is closed a thread is told to use trio's queue instead."""
    pump = pump_mod.Pump()
    ran: list[str] = []
    try:
        pump._by_fd[-1] = None  # type: ignore[assignment]  # stands for a running transfer
        far = time.perf_counter() + 60

        def worker() -> None:
            time.sleep(0.05)
            assert pump.post(lambda: ran.append("read done"))

        thread = threading.Thread(target=worker)
        thread.start()
        t0 = time.perf_counter()
        events = None
        while not events and time.perf_counter() - t0 < 2:  # (misses pass up chances)
            events = pump._wait_direct(far)
        thread.join()
        assert events == [(pump._wake_fd, select.EPOLLIN)]
        assert time.perf_counter() - t0 < 1.0
        assert ran == []  # not from the thread: from the pass
        assert pump._pass(time.perf_counter(), events)
        assert ran == ["read done"]
        assert pump.post(lambda: ran.append("pending at close"))
    finally:
        pump.close()
    assert ran == ["read done", "pending at close"]  # close runs what is left
    assert not pump.post(lambda: ran.append("too late"))
    assert ran == ["read done", "pending at close"]


def test_limits_are_shared_across_fork() -> None:
    limits = SessionLimits(3, 2, shared=True)
    assert limits.admit("10.0.0.1") is None
    pid = os.fork()
    if pid == 0:  # a worker: admits two more, one of them refused per IP
        code = 0 if (limits.admit("10.0.0.1"), limits.admit("10.0.0.1")) == (None, PER_IP) \
            else 1
        code |= 0 if limits.admit("10.0.0.2") is None else 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert limits.active == 3
    assert limits.admit("10.0.0.3") == BUSY
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.3") is None
    assert not limits.stopping
    pid = os.fork()
    if pid == 0:
        limits.stop()
        os._exit(0)
    os.waitpid(pid, 0)
    assert limits.stopping
