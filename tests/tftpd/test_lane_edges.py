"""The compiled lane (tftpd/_lane.c) at the edges of its batched sends (io_uring): a process
forked with a lane in it, a socket that is full, an io_uring_enter that fails, a wait that a
signal interrupts.  Each is checked against what the one-send()-per-ACK path does; the common
case is in test_lane.py."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tftpd.frames import Frames
from tftpd.pump import Pump

from .test_lane import BLK, SEG, Wire, ack, wire
from .test_lane import frames_of as frames_from


def data_frame(block: int, data: bytes) -> bytes:
    return struct.pack("!HH", 3, block & 0xFFFF) + data[(block - 1) * BLK:block * BLK]


def arm(w: Wire, upto: int, frames: Frames, count: int, end: int) -> None:
    """Arm ``w`` with blocks 1..``count`` of ``frames``, block ``upto`` in flight."""
    w.lane.arm(w.fd, upto, frames.view, 1, count, end, SEG, True, None, time.perf_counter())


def frames_of(data: bytes) -> tuple[Frames, int, int]:
    """Frames of ``data`` as blocks 1.. (the last one short), their count and end."""
    return frames_from(data, 1)


def in_child(body) -> int:  # type: ignore[no-untyped-def]
    """Run ``body()`` in a forked child; its exit status (0: it returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 1
        except BaseException:  # noqa: BLE001 -- the child must never return into pytest
            code = 2
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def ring_maps() -> set[tuple[int, int]]:
    """The io_uring mappings of this process, as (start, end) addresses."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            if "io_uring" in line:
                lo, hi = line.split()[0].split("-")
                out.add((int(lo, 16), int(hi, 16)))
    return out


# -- fork ----------------------------------------------------------------------------------------


def test_a_lane_carried_into_a_forked_child_answers_with_send() -> None:
    """The ring's memory is MADV_DONTFORK: a child forked with a lane in it has the lane's
    pointers into the ring but not the ring.  Its lane answers with one send() per ACK (as
    where io_uring cannot be set up) instead of writing through those pointers, and the
    parent's ring is unharmed by the child's lane closing."""
    data = bytes(range(6 * BLK))
    frames, n, end = frames_of(data)
    with wire(True) as p:

        def child() -> bool:
            arm(p, 1, frames, n, end)
            p.client.send(ack(1))
            ok = p.lane.poll(1.0) == [] and p.lane.answered == 1
            ok = ok and p.client.recv(4096) == data_frame(2, data)
            ok = ok and not p.lane.batched and p.lane.datagrams == 1
            p.lane.close()
            return ok

        status = in_child(child)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
            f"child: {os.WTERMSIG(status) and signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status) else f"child exit {os.WEXITSTATUS(status)}")
        # The parent's ring still sends (the child closed only its own copy of the fd).
        assert p.lane.batched
        batches = p.lane.batches
        arm(p, 1, frames, n, end)
        p.client.send(ack(1))
        assert p.lane.poll(1.0) == [] and p.lane.answered == 1
        assert p.lane.batches == batches + 1
        assert p.client.recv(4096) == data_frame(2, data)


def test_a_forked_child_closing_its_lane_leaves_its_own_memory_alone() -> None:
    """In a forked child the ring's addresses are free (MADV_DONTFORK) and the child may map
    something else there: closing (or collecting) the lane must not munmap it."""
    before = ring_maps()
    with wire(True) as p:
        mine = sorted(ring_maps() - before)
        assert mine, "the lane's ring mappings are not in /proc/self/maps"

        def child() -> bool:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_long]
            prot, flags = 0x1 | 0x2, 0x02 | 0x20 | 0x100000  # RW; PRIVATE|ANON|FIXED_NOREPLACE
            for lo, hi in mine:
                got = libc.mmap(lo, hi - lo, prot, flags, -1, 0)
                if got != lo:  # the ring's memory came along: MADV_DONTFORK did not apply
                    os._exit(3)
                ctypes.memset(lo, 0x5A, hi - lo)
            p.lane.close()
            return all(ctypes.string_at(lo, 4) == b"\x5a" * 4 for lo, _ in mine)

        status = in_child(child)
        assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3), (
            "the child had the ring's memory: MADV_DONTFORK did not apply")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
            f"child: {os.WTERMSIG(status) and signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status) else f"child exit {os.WEXITSTATUS(status)}")


# -- the kernel refusing ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [True, False], ids=["io_uring", "send"])
def test_a_full_socket_hands_the_ack_back_unanswered(batch: bool) -> None:
    """EAGAIN (the peer's queue is full): nothing counted as sent, the ACK as it came goes
    to the pump, batched or not."""
    data = bytes(range(6 * BLK))
    frames, n, end = frames_of(data)
    with wire(batch, socket.AF_UNIX) as p:
        while True:  # fill the client's queue
            try:
                p.server.send(b"x")
            except BlockingIOError:
                break
        arm(p, 1, frames, n, end)
        p.client.send(ack(1))
        assert p.lane.poll(1.0) == [(p.fd, select.EPOLLIN)]
        assert p.lane.answered == 0 and p.lane.datagrams == 0 and p.lane.pending == 1
        upto, _, srtt, sent, held = p.lane.disarm(p.fd)
        assert (upto, srtt, sent, held) == (1, None, 0, ack(1))


def ring_fds() -> set[int]:
    """The descriptors of this process that are io_urings."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "io_uring" in os.readlink(f"/proc/self/fd/{fd}"):
                out.add(int(fd))
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return out


def test_a_ring_the_kernel_refuses_is_dropped_and_its_queue_never_goes_out() -> None:
    """An io_uring_enter that fails for good (here EBADF: the ring's descriptor closed under
    the lane) sends nothing and hands every ACK to the pump.  The lane drops the ring --
    without closing that number, which may be another file's by then -- and answers with
    send() from then on; the refused frame never goes out with a later one."""
    data = bytes(range(6 * BLK))
    frames, n, end = frames_of(data)
    before = ring_fds()
    with wire(True) as p:
        (fd,) = ring_fds() - before
        saved = os.dup(fd)  # the ring itself stays open: only the lane's number goes away
        try:
            os.close(fd)
            arm(p, 1, frames, n, end)
            p.client.send(ack(1))
            assert p.lane.poll(1.0) == [(p.fd, select.EPOLLIN)]
            assert p.lane.answered == 0 and p.lane.datagrams == 0
            assert p.lane.disarm(p.fd)[::4] == (1, ack(1))
            assert p.nothing_for_client()
            assert not p.lane.batched and p.lane.batch_error == errno.EBADF
            other = os.open("/dev/null", os.O_RDONLY)  # the lowest free number: the old one
            try:
                assert other == fd
                arm(p, 1, frames, n, end)
                p.client.send(ack(1))
                assert p.lane.poll(1.0) == [] and p.lane.answered == 1
                assert p.client.recv(4096) == data_frame(2, data)
                assert p.nothing_for_client()  # the refused batch did not go out with it
                assert p.lane.disarm(p.fd)[::4] == (2, None)
                p.lane.close()
                os.fstat(other)  # still open: the lane did not close it as its ring
            finally:
                os.close(other)
        finally:
            os.close(saved)


def test_a_pump_whose_lane_loses_io_uring_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """The operator learns why CPU per packet rose: one warning when the lane drops its
    ring mid-run, with the kernel's reason, and no more."""
    data = bytes(range(6 * BLK))
    frames, n, end = frames_of(data)
    before = ring_fds()
    pump = Pump()
    w = Wire(False)
    try:
        assert pump.batched_sends
        (fd,) = ring_fds() - before
        saved = os.dup(fd)
        os.close(fd)
        w.ep.unregister(w.fd)
        pump._ep.register(w.fd, select.EPOLLIN)
        lane = pump._lane._lane  # type: ignore[union-attr]
        lane.arm(w.fd, 1, frames.view, 1, n, end, SEG, True, None, time.perf_counter())
        w.client.send(ack(1))
        assert lane.poll(1.0) == [(w.fd, select.EPOLLIN)]
        lane.disarm(w.fd)
        caplog.set_level(logging.WARNING, logger="tftpd.pump")
        pump._note_ring_lost()
        pump._note_ring_lost()
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "Bad file descriptor" in warned[0]
        assert not pump.batched_sends and pump.batch_error == errno.EBADF
        os.close(saved)
    finally:
        pump._ep.unregister(w.fd)
        pump.close()
        w.close()


# -- signals -------------------------------------------------------------------------------------


@contextmanager
def alarm(seconds: float, handler) -> Iterator[None]:  # type: ignore[no-untyped-def]
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("batch", [True, False], ids=["io_uring", "send"])
def test_a_signal_runs_its_handler_and_the_wait_goes_on(batch: bool) -> None:
    """A signal interrupts the wait: its handler runs, and poll() waits out the rest of its
    timeout (PEP 475); a handler that raises ends poll() with its exception, and what the
    lane holds is still reported by the next poll()."""
    frames, n, end = frames_of(bytes(8 * BLK))
    with wire(batch) as p:
        arm(p, 3, frames, n, end)
        p.client.send(ack(2))  # not the newest: held for the pump
        assert p.lane.poll(1.0) == [(p.fd, select.EPOLLIN)]
        hits = []
        with alarm(0.05, lambda *_: hits.append(1)):
            t0 = time.monotonic()
            assert p.lane.poll(0.3) == [(p.fd, select.EPOLLIN)]
            assert time.monotonic() - t0 >= 0.29 and hits == [1]

        class Stop(Exception):
            pass

        def stop(*_: object) -> None:
            raise Stop

        with alarm(0.05, stop), pytest.raises(Stop):
            p.lane.poll(-1)
        assert p.lane.poll(0) == [(p.fd, select.EPOLLIN)]
        assert p.lane.disarm(p.fd)[::4] == (3, ack(2))
