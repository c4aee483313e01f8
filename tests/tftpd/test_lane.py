"""The compiled lock-step lane (tftpd/_lane.c) on real UDP sockets and a real epoll object.

The lane answers exactly one exchange -- the ACK of the newest block, and the next full frame
goes out -- and must hand everything else to the pump byte for byte: a datagram it took off a
socket and did not answer exists nowhere else.  These tests drive it the way the pump does
(``arm``, ``poll``, ``disarm``) with a client socket standing for the TFTP client.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tftpd import _lane as lane_mod  # built at install: a missing build fails here, loudly
from tftpd.frames import Frames
from tftpd.pump import Pump

from .helpers import io_uring_refused

BLK = 8
SEG = BLK + 4
#: Whether the lanes of a test send through io_uring (the default) or one send() per ACK:
#: every test runs both ways (``batch`` below).
BATCH = True


@pytest.fixture(autouse=True, params=[True, False], ids=["io_uring", "send"])
def batch(request: pytest.FixtureRequest) -> Iterator[bool]:
    global BATCH
    BATCH = request.param
    yield BATCH
    BATCH = True


def batched_lane(epfd: int, batch: bool) -> lane_mod.Lane:
    """A lane on ``epfd``, batching its sends if ``batch``.  Where the machine refuses io_uring
    (``io_uring_refused``) the batched tests are skipped with the reason; anywhere else a
    lane that does not batch fails them."""
    lane = lane_mod.Lane(epfd, 512, batch)
    if batch and not lane.batched:
        reason = io_uring_refused()
        if reason is not None:
            lane.close()
            pytest.skip(f"no io_uring: {reason}")
        raise AssertionError(f"the lane has no io_uring "
                             f"({errno.errorcode.get(lane.batch_error or 0)}) on a machine "
                             "that allows it")
    assert lane.batched == batch
    return lane


def ack(block: int) -> bytes:
    return struct.pack("!HH", 4, block & 0xFFFF)


class Wire:
    """A connected pair of datagram sockets, the server's end in an epoll object with a lane
    on it (batched: ``batch``, else as the ``batch`` fixture says).  ``family``: AF_INET (UDP
    on 127.0.0.1) or AF_UNIX (whose send to a full peer fails with EAGAIN, which UDP on
    loopback never does)."""

    def __init__(self, batch: bool | None = None, family: int = socket.AF_INET) -> None:
        batch = BATCH if batch is None else batch
        if family == socket.AF_UNIX:
            self.server, self.client = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        else:
            self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.client.bind(("127.0.0.1", 0))
            self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.server.bind(("127.0.0.1", 0))
            self.server.connect(self.client.getsockname())
            self.client.connect(self.server.getsockname())
        self.server.setblocking(False)
        self.client.settimeout(2.0)
        self.fd = self.server.fileno()
        self.ep = select.epoll()
        self.ep.register(self.fd, select.EPOLLIN)
        try:
            self.lane = batched_lane(self.ep.fileno(), batch)
        except BaseException:  # a skip included: nothing left open behind it
            self.ep.close()
            self.server.close()
            self.client.close()
            raise

    def close(self) -> None:
        self.lane.disarm(self.fd)
        self.lane.close()
        self.ep.close()
        self.server.close()
        self.client.close()

    def nothing_for_client(self) -> bool:
        self.client.settimeout(0.05)
        try:
            self.client.recv(4096)
        except (TimeoutError, BlockingIOError):
            return True
        finally:
            self.client.settimeout(2.0)
        return False


@contextmanager
def wire(batch: bool | None = None, family: int = socket.AF_INET) -> Iterator[Wire]:
    w = Wire(batch, family)
    try:
        yield w
    finally:
        w.close()


def frames_of(data: bytes, first: int) -> tuple[Frames, int, int]:
    """Frames of ``data`` as the file's blocks from ``first`` (the last one short), with
    their count and end."""
    frames = Frames(BLK, len(data) // BLK + 1)
    n = frames.fill(data, first, final=True)
    end = (n - 1) * SEG + 4 + len(data) - (n - 1) * BLK
    return frames, n, end


def arm(w: Wire, upto: int, frames: Frames, first: int, count: int, end: int, *,
        clean: bool = True, srtt: float | None = None, last_tx: float | None = None) -> None:
    w.lane.arm(w.fd, upto, frames.view, first, count, end, SEG, clean, srtt,
               time.perf_counter() if last_tx is None else last_tx)


def test_the_ack_of_the_newest_block_is_answered_with_the_next_frame() -> None:
    data = bytes(range(5 * BLK + 3))  # blocks 1-5 full, block 6 short
    frames, n, end = frames_of(data, 1)
    with wire() as w:
        t0 = time.perf_counter()
        arm(w, 1, frames, 1, n, end)
        for block in range(1, 5):
            w.client.send(ack(block))
            assert w.lane.poll(1.0) == []
            assert w.lane.answered == 1
            got = w.client.recv(4096)
            assert got == struct.pack("!HH", 3, block + 1) + data[block * BLK:(block + 1) * BLK]
        # The ACK of block 5: block 6 is the short last one, which the pump sends itself.
        w.client.send(ack(5))
        assert w.lane.poll(1.0) == [(w.fd, select.EPOLLIN)]
        assert w.nothing_for_client()
        upto, last_tx, srtt, sent, held = w.lane.disarm(w.fd)
        assert (upto, sent, held) == (5, 4, ack(5))
        assert t0 <= last_tx <= time.perf_counter()
        assert srtt is not None and 0 < srtt < 1.0
        assert w.lane.datagrams == 4
        assert w.lane.disarm(w.fd) is None  # taken back once


def test_the_next_block_outside_the_frames_is_left_to_the_pump() -> None:
    frames, n, end = frames_of(bytes(4 * BLK), 10)  # blocks 10-13 full, 14 empty
    with wire() as w:
        arm(w, 13, frames, 10, 4, 4 * SEG)  # only 10-13 given: 14 is not in them
        w.client.send(ack(13))
        assert w.lane.poll(1.0) == [(w.fd, select.EPOLLIN)]
        upto, _, _, sent, held = w.lane.disarm(w.fd)
        assert (upto, sent, held) == (13, 0, ack(13))
        assert w.nothing_for_client()


@pytest.mark.parametrize("datagram", [
    ack(2),  # duplicate: the block before the one in flight
    ack(4),  # from the future
    struct.pack("!HH", 5, 0) + b"client aborted\x00",  # ERROR
    b"\x00",  # too short to be anything
    b"\x00\x01file\x00octet\x00",  # an RRQ on the transfer's port
    b"\x01\x04\x00\x03",  # ACK 3 with a bad opcode byte
])
def test_anything_else_is_held_byte_for_byte(datagram: bytes) -> None:
    frames, n, end = frames_of(bytes(8 * BLK), 1)
    with wire() as w:
        arm(w, 3, frames, 1, n, end)
        w.client.send(datagram)
        assert w.lane.poll(1.0) == [(w.fd, select.EPOLLIN)]
        assert w.lane.answered == 0
        assert w.nothing_for_client()
        upto, _, _, sent, held = w.lane.disarm(w.fd)
        assert (upto, sent, held) == (3, 0, datagram)


def test_a_held_datagram_is_reported_until_taken_back() -> None:
    """The socket is empty once the lane read the datagram, so epoll will not report it
    again: a caller that dropped one poll's events (the pump once did, at the end of its time
    slice) must still see it, or the transfer waits for its retransmission timer."""
    frames, n, end = frames_of(bytes(8 * BLK), 1)
    with wire() as w:
        arm(w, 3, frames, 1, n, end)
        w.client.send(ack(2))
        assert w.lane.poll(1.0) == [(w.fd, select.EPOLLIN)]
        assert w.lane.pending == 1
        assert w.lane.poll(0) == [(w.fd, select.EPOLLIN)]  # again, from the lane alone
        assert w.lane.poll(0.2) == [(w.fd, select.EPOLLIN)]
        assert w.lane.disarm(w.fd)[4] == ack(2)
        assert w.lane.pending == 0
        assert w.lane.poll(0) == []


def test_block_numbers_wrap_from_65535_to_0() -> None:
    data = bytes(range(256)) * 4  # 128 blocks of 8 bytes
    frames, n, end = frames_of(data[:4 * BLK], 65534)
    with wire() as w:
        arm(w, 65535, frames, 65534, 4, 4 * SEG)
        w.client.send(ack(65535))
        assert w.lane.poll(1.0) == []
        assert w.client.recv(4096)[:4] == struct.pack("!HH", 3, 0)  # block 65536
        w.client.send(ack(0))
        assert w.lane.poll(1.0) == []
        assert w.client.recv(4096)[:4] == struct.pack("!HH", 3, 1)  # block 65537
        assert w.lane.disarm(w.fd)[:1] == (65537,)


def test_an_error_on_the_socket_is_left_to_the_pump() -> None:
    """A client that vanished: the ICMP error makes epoll report more than EPOLLIN, and the
    pump (which turns it into the transfer's end) gets the event untouched."""
    frames, n, end = frames_of(bytes(8 * BLK), 1)
    with wire() as w:
        arm(w, 1, frames, 1, n, end)
        w.client.close()
        w.server.send(b"\x00\x03\x00\x01")  # the port is closed now: ICMP unreachable
        time.sleep(0.05)
        events = w.lane.poll(1.0)
        assert len(events) == 1 and events[0][0] == w.fd
        assert events[0][1] & select.EPOLLERR
        assert w.lane.disarm(w.fd)[3:] == (0, None)


def test_rtt_is_folded_like_the_sender_and_only_from_clean_windows() -> None:
    frames, n, end = frames_of(bytes(8 * BLK), 1)
    with wire() as w:
        sent_at = time.perf_counter()
        arm(w, 1, frames, 1, n, end, clean=False, srtt=0.5, last_tx=sent_at)
        w.client.send(ack(1))
        w.lane.poll(1.0)
        w.client.recv(4096)
        assert w.lane.disarm(w.fd)[2] == 0.5  # a resent window gives no sample (Karn)
        sent_at = time.perf_counter()
        arm(w, 2, frames, 1, n, end, clean=True, srtt=0.5, last_tx=sent_at)
        w.client.send(ack(2))
        w.lane.poll(1.0)
        srtt = w.lane.disarm(w.fd)[2]
        assert 0.875 * 0.5 <= srtt <= 0.875 * 0.5 + 0.125 * (time.perf_counter() - sent_at)


@pytest.mark.parametrize(("first", "count", "end", "seg"), [
    (1, 4, 4 * SEG + 1, SEG),  # more bytes than frames
    (1, 4, 3 * SEG, SEG),  # the last frame missing
    (1, 100, 100 * SEG, SEG),  # past the buffer
    (1, 4, 4 * SEG, 4),  # a frame without payload room
    (-1, 4, 4 * SEG, SEG),
])
def test_arm_refuses_frames_that_do_not_add_up(first: int, count: int, end: int,
                                               seg: int) -> None:
    frames, _, _ = frames_of(bytes(8 * BLK), 1)
    with wire() as w:
        with pytest.raises(ValueError):
            w.lane.arm(w.fd, 1, frames.view, first, count, end, seg, True, None, 0.0)
        assert not w.lane.armed(w.fd)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upto=st.integers(0, 70000), count=st.integers(1, 12),
       datagrams=st.lists(st.one_of(st.just(b"next"), st.just(b"dup"),
                                    st.binary(min_size=0, max_size=8)), max_size=12))
def test_every_datagram_is_answered_exactly_or_handed_back(
        upto: int, count: int, datagrams: list[bytes]) -> None:
    """Against a model of the one rule: the ACK of the newest block is answered with the next
    frame when that frame is given and full; every other datagram comes back unchanged, and
    the pump (here: the test) arms the lane again at the same state."""
    first = max(upto - count // 2, 0)
    data = bytes((first + i) % 251 for i in range(count * BLK))
    frames = Frames(BLK, count)
    frames.fill(data, first, final=False)
    with wire() as w:
        seq = upto
        arm(w, seq, frames, first, count, count * SEG)
        for d in datagrams:
            if d == b"next":
                d = ack(seq)
            elif d == b"dup":
                d = ack(seq - 1)
            w.client.send(d)
            events = w.lane.poll(1.0)
            i = seq + 1 - first
            answerable = (len(d) >= 4 and d[:2] == b"\x00\x04"
                          and int.from_bytes(d[2:4], "big") == seq & 0xFFFF
                          and 0 <= i < count)
            if answerable:
                assert events == []
                got = w.client.recv(4096)
                assert got == struct.pack("!HH", 3, (seq + 1) & 0xFFFF) + \
                    data[i * BLK:(i + 1) * BLK]
                seq += 1
            else:
                assert events == [(w.fd, select.EPOLLIN)]
                state = w.lane.disarm(w.fd)
                assert state[0] == seq and state[4] == d
                arm(w, seq, frames, first, count, count * SEG)
        assert w.lane.disarm(w.fd)[0] == seq
        assert w.nothing_for_client()


def test_a_descriptor_entering_the_pump_is_never_answered_from_a_stale_slot() -> None:
    """The lane knows sockets by number only.  A slot left armed for a closed socket (a bug,
    or a failure while taking the transfer back) would answer a new socket given the same
    number -- another client's request answered with the old file's bytes -- so the pump
    disarms every descriptor it registers."""
    pump = Pump(batch_sends=BATCH)
    assert pump.compiled_lane
    lane = pump._lane._lane
    old = Wire()
    fd = old.fd
    frames = Frames(BLK, 4)
    frames.fill(b"SECRET!!" * 4, 1, final=False)
    lane.arm(fd, 1, frames.view, 1, 4, 4 * SEG, SEG, True, None, time.perf_counter())
    old.ep.close()
    old.server.close()  # closed while armed
    old.client.close()
    new = Wire()
    seen: list[bytes] = []
    try:
        assert new.fd == fd
        new.ep.unregister(fd)
        pump.watch(fd, lambda: seen.append(new.server.recv(100)))
        assert not lane.armed(fd)
        new.client.send(ack(1))  # "ACK 1" of the old transfer, as far as the slot knew
        deadline = time.monotonic() + 2.0
        while not seen and time.monotonic() < deadline:
            pump._pass(time.perf_counter())
        assert seen == [ack(1)]  # the datagram went to its own socket's owner
        assert new.nothing_for_client()
    finally:
        pump.unwatch(fd)
        pump.close()
        new.close()


def test_a_call_while_another_thread_polls_is_refused() -> None:
    """poll() uses the slots without the GIL: a poll(), arm() or disarm() from another thread
    meanwhile would change them under it (a freed buffer sent to a client), so it raises."""
    frames, n, end = frames_of(bytes(8 * BLK), 1)
    with wire() as w:
        arm(w, 1, frames, 1, n, end)
        poller = threading.Thread(target=w.lane.poll, args=(1.0,))
        poller.start()
        refused = False
        while poller.is_alive() and not refused:
            try:
                w.lane.armed(w.fd)  # harmless: only reads, with the GIL
                w.lane.poll(0.0)
            except RuntimeError:
                refused = True
            time.sleep(0.01)
        poller.join()
        assert refused
        assert w.lane.armed(w.fd)  # nothing was changed by the refused call


def test_a_nan_timeout_is_refused() -> None:
    with wire() as w, pytest.raises(ValueError):
        w.lane.poll(float("nan"))


def test_a_send_the_kernel_refuses_hands_the_ack_and_errno_to_the_pump() -> None:
    """A frame too big for a datagram (EMSGSIZE) stands for any send that fails: nothing is
    counted as sent, and the pump gets the errno, batched or not."""
    seg = 70_000
    frames = bytearray(2 * seg)
    with wire() as w:
        w.lane.arm(w.fd, 1, frames, 1, 2, 2 * seg, seg, True, None, time.perf_counter())
        w.client.send(ack(1))
        assert w.lane.poll(1.0) == [(w.fd, select.EPOLLIN)]
        assert w.lane.answered == 0 and w.lane.datagrams == 0
        assert w.lane.disarm(w.fd)[::4] == (1, errno.EMSGSIZE)  # (upto, held)
        assert w.nothing_for_client()


def test_the_answers_to_one_wait_go_out_in_one_batch(batch: bool) -> None:
    """Six transfers on one epoll object ACK at once: one poll() answers every one of them
    (one io_uring_enter for all six where batched); one whose send fails is handed back
    without holding up the others."""
    data = bytes(range(4 * BLK))
    frames, n, end = frames_of(data, 1)
    seg = 70_000
    wires: list[Wire] = []
    ep = select.epoll()
    lane = None
    try:
        wires += [Wire() for _ in range(6)]
        lane = batched_lane(ep.fileno(), batch)
        for w in wires:
            ep.register(w.fd, select.EPOLLIN)
        *good, bad = wires
        for w in good:
            lane.arm(w.fd, 1, frames.view, 1, n, end, SEG, True, None, time.perf_counter())
        lane.arm(bad.fd, 1, bytearray(2 * seg), 1, 2, 2 * seg, seg, True, None,
                 time.perf_counter())
        for w in wires:
            w.client.send(ack(1))
        time.sleep(0.05)  # all six queued before the one wait
        assert lane.poll(1.0) == [(bad.fd, select.EPOLLIN)]
        assert lane.answered == 5 and lane.datagrams == 5
        assert lane.batches == (1 if batch else 0)
        for w in good:
            assert w.client.recv(4096) == struct.pack("!HH", 3, 2) + data[BLK:2 * BLK]
            assert lane.disarm(w.fd)[::4] == (2, None)
        assert lane.disarm(bad.fd)[::4] == (1, errno.EMSGSIZE)
    finally:
        if lane is not None:
            lane.close()  # now: a ring collected later would interrupt later tests' waits
        ep.close()
        for w in wires:
            w.close()


def test_a_wait_interrupted_by_io_uring_waits_out_its_timeout() -> None:
    """Tearing a ring down interrupts the waits of the process's threads (EINTR) although no
    signal came: poll() waits out the rest of its timeout, as select.epoll.poll does, and
    still reports what it holds for the pump."""
    if (reason := io_uring_refused()) is not None:
        pytest.skip(f"no io_uring: {reason}")
    frames, n, end = frames_of(bytes(8 * BLK), 1)
    with wire() as w:
        arm(w, 3, frames, 1, n, end)
        w.client.send(ack(2))  # not the newest: held for the pump
        assert w.lane.poll(1.0) == [(w.fd, select.EPOLLIN)]
        doomed = [lane_mod.Lane(w.ep.fileno(), 512, True) for _ in range(3)]
        assert all(d.batched for d in doomed)  # rings to tear down, whatever ``w`` has
        t0 = time.monotonic()
        del doomed  # three rings torn down just before the wait
        assert w.lane.poll(0.2) == [(w.fd, select.EPOLLIN)]
        assert time.monotonic() - t0 >= 0.19
