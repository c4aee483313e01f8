"""One pump per process drives every transfer, from its OACK to its last ACK.

A boot storm is hundreds of transfers each moving a packet every few microseconds.  Giving
each its own trio task costs one scheduler round trip per packet; here every live transfer
socket is registered in one ``epoll`` object whose descriptor trio waits on, so one wake-up
collects every socket that has ACKs queued, each is drained and answered in the same pass, and
retransmission deadlines live in one timer heap.  The protocol decisions are all in
:class:`tftpd.sender.Sender`; this module only moves bytes and time.  The server's listen
sockets and the file opener's socket are in the same set (:meth:`Pump.watch`): new requests
and the replies to their opens share the wake-up too.

File data comes from :class:`tftpd.blocks.BlockSource` (worker threads, read ahead): when a
block is not read yet, only that transfer waits -- the source calls back when its read is
done, and the pump picks the transfer up again.

With ``windowsize`` > 1 a window leaves in one ``sendmsg`` with ``UDP_SEGMENT`` (generic
segmentation offload, Linux >= 4.18): the kernel cuts the buffer into equal datagrams of
``blksize + 4`` bytes (the last may be shorter).  A socket where the kernel refuses it (no
checksum offload on the route, a segment larger than the MTU) falls back to one ``send`` per
datagram for the rest of its transfer.

Lock-step's common exchange -- the ACK of the newest block, and the next block goes out -- is
answered by a compiled lane (tftpd/_lane.c, handed over by tftpd/lane.py) where it is built:
the pump arms a transfer in it whenever it can, and takes it back before it handles the
transfer in any other way.  Without the module, or with ``compiled_lane=False``,
:meth:`Pump._event` answers the same exchange in Python.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import heapq
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

import trio

from . import lane, packets
from .blocks import BlockSource
from .packets import MalformedPacket
from .sender import Sender

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h
#: Datagrams per GSO send: the kernel's UDP_MAX_SEGMENTS is 64 on older kernels.
GSO_MAX_SEGMENTS = 64
#: Largest UDP payload over IPv4 (65535 - 20 - 8): one GSO buffer may not exceed it.
GSO_MAX_BYTES = 65507

#: A sender only receives ACKs (4 bytes) and ERRORs; anything longer is truncated, harmlessly.
_RECV_SIZE = 2048
#: Longest stretch the pump polls without letting other trio tasks run, seconds.
_YIELD_EVERY = 0.002
#: A sleep's deadline (the next retransmission) is re-registered with trio only when it
#: moves by more than this, seconds: a retransmission fires at most this much late or early.
_DEADLINE_SLACK = 0.0005
_EPOLLIN = select.EPOLLIN
_OP_ACK = packets.OP_ACK
_EPOLLOUT = select.EPOLLOUT
_ERRORS = select.EPOLLERR | select.EPOLLHUP
_READABLE = _EPOLLIN | _ERRORS
#: Longest the pump waits in epoll itself, the thread blocked, before it sleeps in trio
#: (:meth:`Pump._wait_direct`): epoll's resolution, a millisecond.  In a 16-client storm 98 %
#: of such waits ended within it, most within 20 microseconds.
_DIRECT_WAIT = 0.001
#: Most chances to wait in epoll passed up after misses in a row (one wasted wait per 1024
#: sleeps where it never pays).
_DIRECT_BACKOFF_MAX = 1024
#: A time that never comes: no time limit, no deadline.
_NEVER = float("inf")


def _groups(runs: list[memoryview], seg: int,
            per: int) -> list[tuple[list[memoryview], int]]:
    """``runs`` cut into groups of at most ``per`` datagrams, each with its datagram count:
    the views for one GSO ``sendmsg`` each (cuts fall between frames)."""
    groups: list[tuple[list[memoryview], int]] = []
    group: list[memoryview] = []
    k = 0
    for run in runs:
        o, size = 0, len(run)
        while o < size:
            take = min((per - k) * seg, size - o)
            group.append(run[o:o + take] if take < size else run)
            k += -(-take // seg)
            o += take
            if k == per:
                groups.append((group, k))
                group, k = [], 0
    if group:
        groups.append((group, k))
    return groups


@functools.lru_cache(maxsize=64)
def _gso_option(seg: int) -> tuple[tuple[int, int, bytes], ...]:
    """The ``UDP_SEGMENT`` control message for datagrams of ``seg`` bytes (one per blksize)."""
    return ((SOL_UDP, UDP_SEGMENT, struct.pack("H", seg)),)


class PeerGone(Exception):
    """The client's port answered with ICMP unreachable: it closed or aborted."""


class ClientError(Exception):
    """The client sent an ERROR packet (normal after a tsize probe)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"code={code} message={message!r}")
        self.code = code
        self.message = message


class TimedOut(Exception):
    """The retry budget is spent without an ACK."""


class Expired(Exception):
    """The transfer ran past its time limit (``Transfer.expires``)."""


class PumpStopped(Exception):
    """The pump ended (the server is stopping) while the transfer was still running."""


class Transfer:
    """The pump's record of one transfer in its DATA phase."""

    @property
    def bytes_sent(self) -> int:
        """Distinct payload bytes sent: every block but the last is full (counted from the
        sender's state, not per packet)."""
        sender = self.sender
        if sender.final is not None:
            return (sender.final - 1) * self.blksize + self.final_len
        return max(sender.sent_upto, 0) * self.blksize

    __slots__ = ("sock", "fd", "sender", "source", "blksize", "seg", "gso", "final_len",
                 "on_end", "error", "finished", "timer_at", "want_write", "ignored", "lockstep",
                 "expires", "oack", "laned")

    def __init__(self, sock: socket.socket, sender: Sender, source: BlockSource, blksize: int,
                 gso: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.sender = sender
        self.source = source
        self.blksize = blksize
        self.seg = blksize + 4  # bytes of a full DATA datagram
        self.gso = gso
        self.final_len = 0  # payload bytes of the last block, once it went out
        #: Called once when the transfer ends (``error`` None: every block acknowledged).
        self.on_end: Callable[[Transfer], None] | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.timer_at: float | None = None
        self.want_write = False
        self.ignored = 0  # datagrams that were neither ACK nor ERROR
        #: RFC 1350 lock-step (windowsize 1): every ACK takes the pump's fast lane.
        self.lockstep = sender.windowsize == 1
        #: ``time.perf_counter()`` past which the transfer ends with :class:`Expired`; a
        #: timer is kept armed for it, so a client that trickles ACKs or a read that never
        #: returns cannot hold the transfer longer.
        self.expires = _NEVER
        #: The OACK datagram, when the sender starts with it (block 0).
        self.oack: bytes | None = None
        #: Armed in the compiled lane: its ACKs are answered there until taken back.
        self.laned = False


class Pump:
    """The DATA phase of every transfer of this process, in one task (:meth:`run`)."""

    def __init__(self, *, spin_seconds: float = 0.0, spin_max_sessions: int = 1,
                 active: Callable[[], int] = lambda: 1, compiled_lane: bool = True,
                 batch_sends: bool = True) -> None:
        self._ep = select.epoll()
        #: The compiled lock-step lane on this epoll object, if built and wanted; every
        #: wait of the pump then goes through it (:meth:`_poll`).  ``batch_sends``: it sends
        #: the answers of one wait in one io_uring_enter where it can.
        self._lane = (lane.CompiledLane(self._ep.fileno(), 512, batch=batch_sends)
                      if compiled_lane and lane.AVAILABLE else None)
        #: Whether the lane batched its sends when last looked at (:meth:`_note_ring_lost`).
        self._batched = self._lane is not None and self._lane.batched
        self._poll: Callable[[float], list[tuple[int, int]]] = (
            self._lane.poll if self._lane is not None
            else functools.partial(self._ep.poll, maxevents=512))
        self._by_fd: dict[int, Transfer] = {}
        self._timers: list[tuple[float, int, Transfer]] = []
        self._tick = itertools.count()
        self._runnable: list[Transfer] = []
        self._wait_scope: trio.CancelScope | None = None
        # A read-ahead that completes while the pump sleeps wakes it through this eventfd in
        # its epoll set: the sleep then ends like any other readiness, where cancelling the
        # sleep's scope raised an exception through trio and began a new scope.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_sent = False
        self._ep.register(self._wake_fd, _EPOLLIN)
        #: Calls handed over by worker threads (:meth:`post`), run from the pump's pass.
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._post_lock = threading.Lock()
        self._closed = False
        self._recv_buf = bytearray(_RECV_SIZE)
        #: :meth:`_wait_direct`'s chances to pass up, and how many the next miss adds.
        self._direct_skip = 0
        self._direct_backoff = 1
        #: Other sockets whose readiness shares the pump's wake-up (:meth:`watch`).
        self._watched: dict[int, Callable[[], object]] = {}
        self._spin = spin_seconds
        self._spin_max = spin_max_sessions
        self._active = active
        #: Passes that found ready sockets (or ACKs the compiled lane answered), DATA
        #: datagrams sent, ``sendmsg`` calls that carried several of them (UDP GSO): for
        #: tests and the curious.
        self.wakeups = 0
        self._datagrams = 0
        self.gso_sends = 0

    @property
    def compiled_lane(self) -> bool:
        """Whether lock-step ACKs are answered by the compiled lane (tftpd/_lane.c)."""
        return self._lane is not None

    @property
    def batched_sends(self) -> bool:
        """Whether the compiled lane sends its answers to a wait in one io_uring_enter."""
        return self._lane is not None and self._lane.batched

    @property
    def batch_error(self) -> int | None:
        """The errno that left the compiled lane without io_uring (None: it has it, or it
        was not asked to use it)."""
        return self._lane.batch_error if self._lane is not None else None

    @property
    def datagrams(self) -> int:
        """DATA datagrams sent, by the pump and its compiled lane."""
        return self._datagrams + (self._lane.datagrams if self._lane is not None else 0)

    def close(self) -> None:
        with self._post_lock:  # no thread writes to the eventfd once it is closed
            self._closed = True
        self._run_posted()  # their limiter tokens go back
        self._watched.clear()
        if self._lane is not None:
            self._lane.close()
        self._ep.close()
        os.close(self._wake_fd)

    def post(self, call: Callable[[], None]) -> bool:
        """Run ``call()`` from the pump's next pass (thread-safe: for worker threads).
        Returns False, and does nothing, once the pump is closed.

        Why not trio's ``run_sync_soon``: a call queued there runs at trio's next turn, and
        the pump may be waiting in ``epoll`` itself (:meth:`_wait_direct`) with a transfer
        that needs exactly this read; the pump's eventfd ends that wait at once."""
        with self._post_lock:
            if self._closed:
                return False
            self._posted.append(call)
            os.eventfd_write(self._wake_fd, 1)
        return True

    def _run_posted(self) -> None:
        posted = self._posted
        while posted:
            call = posted.popleft()
            try:
                call()
            except Exception:  # a bug in one must not end the pump
                log.exception("pump: a posted call failed")

    # -- other sockets ---------------------------------------------------------------------------

    def watch(self, fd: int, on_readable: Callable[[], object]) -> None:
        """Call ``on_readable()`` from the pump's pass whenever ``fd`` is readable, until
        :meth:`unwatch`.  The listen sockets and the file opener's socket are served this way:
        a request, its open's reply and the ACKs of every transfer then share one wake-up of
        the pump instead of a trio task switch each.  ``on_readable`` must not block; it
        runs after the pass has handled its transfers' events, so the sockets it may open
        or close never alias a descriptor of that pass.  What it raises is logged."""
        if self._lane is not None:
            self._lane.forget(fd)
        self._ep.register(fd, _EPOLLIN)
        self._watched[fd] = on_readable

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed); watching it no longer is harmless."""
        if self._watched.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    async def serve_readable(self, fd: int, on_readable: Callable[[], object]) -> None:
        """:meth:`watch` ``fd`` until cancelled (a task's whole job)."""
        self.watch(fd, on_readable)
        try:
            await trio.sleep_forever()
        finally:
            self.unwatch(fd)

    # -- transfers (called from sessions) ----------------------------------------------------

    def add(self, sock: socket.socket, sender: Sender, source: BlockSource, blksize: int, *,
            gso: bool = True) -> Transfer:
        """The record of a transfer about to enter its DATA phase (run it with
        :meth:`transfer`); the caller reads its byte count however the transfer ends."""
        return Transfer(sock, sender, source, blksize, gso)

    def start(self, t: Transfer, on_end: Callable[[Transfer], None]) -> None:
        """Begin ``t``: its OACK or first window goes out now, from the caller, and
        ``on_end(t)`` is called once when it ends -- ``t.error`` is None when the last block
        was acknowledged, else :class:`PeerGone`, :class:`ClientError`, :class:`TimedOut`,
        :class:`Expired`, :class:`PumpStopped` or the file's ``OSError``.  ``on_end`` may run
        before this returns (the first send found the client gone).

        No task waits for the transfer: a small request costs no scheduler round trip of its
        own once its file is open (tftpd/session.py).  :meth:`cancel` takes ``t`` out
        without calling ``on_end``.
        """
        sender, source = t.sender, t.source
        t.on_end = on_end
        source.acked = lambda: sender.base - 1  # what read-ahead may drop from its buffer
        source.on_ready = lambda: self._make_runnable(t)
        source.post = self.post
        self._by_fd[t.fd] = t
        if self._lane is not None:
            self._lane.forget(t.fd)
        try:
            self._ep.register(t.fd, _EPOLLIN)
        except BaseException:
            self._detach(t)
            raise
        self._step(t, time.perf_counter(), self._advance)

    def cancel(self, t: Transfer) -> None:
        """Take ``t`` out of the pump now, without calling its ``on_end`` (its owner ends it:
        shutdown, a cancelled task)."""
        self._detach(t)

    async def transfer(self, t: Transfer) -> None:
        """Run ``t`` to its end, waiting in the caller's task.

        Returns when the last block is acknowledged; raises what :meth:`start` would hand to
        ``on_end``.  Cancelling the caller takes the socket out of the pump (the caller
        closes it afterwards).
        """
        done = trio.Event()
        try:
            self.start(t, lambda _t: done.set())
            await done.wait()
        finally:
            self._detach(t)
        if t.error is not None:
            # Take the error out of the record before raising it: its traceback holds the
            # pump frames that failed (``_event``, ``_step``: ``t`` is a local there), so a
            # record that kept it would be a reference cycle -- Transfer -> error ->
            # traceback -> frame -> Transfer -- that only the cyclic GC frees, and it runs
            # rarely in a server allocating few containers.  Until then the cycle kept the
            # session, its socket object and the BlockSource with its read-ahead chunks
            # (up to two 256 KiB buffers) alive after the transfer ended: a storm of clients
            # vanishing mid-transfer (ICMP unreachable, PeerGone) grew the RSS by megabytes.
            error, t.error = t.error, None
            raise error

    def _make_runnable(self, t: Transfer) -> None:
        if t.finished:
            return
        self._runnable.append(t)
        if self._wait_scope is not None and not self._wake_sent:
            self._wake_sent = True
            os.eventfd_write(self._wake_fd, 1)

    def _detach(self, t: Transfer) -> None:
        if t.laned:  # the sender's counts must be whole for the owner's on_end
            assert self._lane is not None
            self._lane.take_back(t)
        t.source.on_ready = None
        if self._by_fd.get(t.fd) is t:
            del self._by_fd[t.fd]
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(t.fd)
        t.finished = True
        t.timer_at = None

    def _finish(self, t: Transfer, error: BaseException | None = None) -> None:
        if t.finished:
            return
        t.error = error
        self._detach(t)
        on_end, t.on_end = t.on_end, None
        if on_end is not None:
            try:
                on_end(t)
            except Exception:  # a bug in the owner's callback must not end the pump
                log.exception("transfer end callback failed fd=%d", t.fd)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every registered transfer until cancelled.

        While there is work the pump keeps polling its epoll object without a trio round
        trip, yielding to trio at least every ``_YIELD_EVERY`` seconds (new requests, reads
        finishing).  When a pass finds nothing while transfers run, it first waits in the
        kernel for up to a millisecond (:meth:`_wait_direct`); only when that wait, too, finds
        nothing does it sleep in trio until a socket is readable, the next retransmission is
        due or a read-ahead completes.
        """
        task_status.started()
        clock = time.perf_counter
        now_trio = trio.current_time
        wait_readable = trio.lowlevel.wait_readable
        epfd = self._ep.fileno()
        inf = _NEVER
        try:
            while True:
                # One cancel scope for as many sleeps as end in readiness (every ACK batch):
                # a new scope per sleep cost more than the pass it woke for.  Its deadline is
                # the next retransmission; when that fires the scope ends and the next one
                # begins.  A read-ahead completing wakes the sleep through ``_wake_fd``.
                with trio.CancelScope() as scope:
                    while True:
                        yield_at = clock() + _YIELD_EVERY
                        busy = False
                        events = None
                        while True:
                            # Events a wait found are always handled by the next pass: with
                            # the compiled lane they may stand for datagrams it already read.
                            worked = self._pass(clock(), events)
                            events = None
                            if clock() >= yield_at:
                                busy = True
                                break
                            if not worked:  # nothing ready: wait for it here, or in trio
                                events = self._wait_direct(yield_at)
                                if events is None:
                                    break
                        if self._batched:
                            self._note_ring_lost()
                        if busy:  # still work to do: let the other tasks in, then go on
                            await trio.lowlevel.checkpoint()
                            continue
                        if self._runnable or (self._lane is not None and self._lane.pending):
                            continue
                        timers = self._timers
                        deadline = (timers[0][0] - clock() + now_trio()) if timers else inf
                        # Setting a deadline re-registers the scope in trio (a generator
                        # context manager); between two timer changes (one per RTO in
                        # lock-step) the new one only differs by clock jitter: keep the old
                        # one unless it moves by more than the jitter we accept.
                        if abs(deadline - scope.deadline) > _DEADLINE_SLACK or (
                                deadline == inf) != (scope.deadline == inf):
                            scope.deadline = deadline
                        self._wait_scope = scope  # only while asleep: see _schedule
                        try:
                            await wait_readable(epfd)
                        finally:
                            self._wait_scope = None
        finally:
            # Sessions are cancelled before the pump; anything left must not wait forever.
            for t in list(self._by_fd.values()):
                self._finish(t, PumpStopped("transfer pump stopped"))

    def _wait_direct(self, yield_at: float) -> list[tuple[int, int]] | None:
        """Wait in ``epoll`` itself, the thread blocked, until a socket is ready, the next
        timer is due, ``_DIRECT_WAIT`` has passed or ``yield_at`` (the end of the pump's
        time between trio checkpoints); the events found, or None to sleep in trio instead.

        Why: in a boot storm a pass often finds nothing for a moment -- every client of this
        worker is still busy with its last DATA, and its next ACK comes within microseconds
        -- and a sleep in trio then cost a scheduler round trip (trio's own epoll, the task
        switch, the cancel scope) per batch of ACKs; waiting here costs one ``epoll_wait``.
        A read-ahead finishing ends the wait (:meth:`post`); trio's other work (a signal, a
        session's task) waits no longer than ``_DIRECT_WAIT``.  A wait that finds nothing
        (an idle client, a slow network, or a client that needs this very thread to run: one
        in the same process) makes the pump pass up its next chances to wait here, twice as
        many after each such miss in a row, up to ``_DIRECT_BACKOFF_MAX``: where waiting here
        does not pay, it costs one ``_DIRECT_WAIT`` in that many sleeps.
        """
        if not self._by_fd:
            return None
        if self._direct_skip:
            self._direct_skip -= 1
            return None
        now = time.perf_counter()
        until = min(yield_at, now + _DIRECT_WAIT)
        timers = self._timers
        if timers and timers[0][0] < until:
            until = timers[0][0]
        if until <= now:  # the time between checkpoints is up, or a timer is due
            return [] if timers and timers[0][0] <= now else None
        events = self._poll(until - now)
        if events or self._answered():
            self._direct_backoff = 1
            return events
        if timers and timers[0][0] <= time.perf_counter():
            return events  # a timer is due: the next pass fires it
        self._direct_skip = self._direct_backoff
        self._direct_backoff = min(2 * self._direct_backoff, _DIRECT_BACKOFF_MAX)
        return None

    def _pass(self, now: float, events: list[tuple[int, int]] | None = None) -> bool:
        """One pass over what is ready: woken transfers, readable sockets (``events``, when a
        wait already has them), due timers.  Returns whether there was anything."""
        worked = False
        if self._runnable:
            runnable, self._runnable = self._runnable, []
            for t in runnable:
                if not t.finished:
                    self._step(t, now, self._advance)
            worked = True
        if events is None:
            events = self._poll(0)
        if (not events and not self._answered() and self._spin and self._by_fd
                and self._spin_pays()):
            # Few transfers, a CPU to spare and ACKs that come back within microseconds: one
            # is cheaper to catch by polling than through a sleep and a scheduler round trip.
            clock = time.perf_counter
            spin_until = clock() + self._spin
            while not events and clock() < spin_until:
                events = self._poll(0)
                if self._answered():
                    break
            now = clock()
        # What the poll behind ``events`` found (this pass's, or the wait's that gave them):
        # events for the pump, or ACKs the compiled lane answered itself.
        if events or self._answered():
            self.wakeups += 1
            worked = True
        if events:
            by_fd = self._by_fd
            event = self._event if self._lane is None else self._lane_event
            ready: list[Callable[[], object]] = []
            for fd, ev in events:
                t = by_fd.get(fd)
                if t is not None:
                    event(t, now, ev)
                elif fd == self._wake_fd:
                    self._drain_wake()
                else:
                    cb = self._watched.get(fd)
                    if cb is not None:
                        ready.append(cb)
            for cb in ready:  # after the batch: see watch()
                try:
                    cb()
                except Exception:
                    log.exception("pump: callback for a watched socket failed")
        timers = self._timers
        if timers and timers[0][0] <= now:
            while timers and timers[0][0] <= now:
                at, _, t = heapq.heappop(timers)
                if t.timer_at == at and not t.finished:
                    t.timer_at = None
                    self._step(t, now, self._expired)
            worked = True
        return worked

    def _note_ring_lost(self) -> None:
        """Say once that the compiled lane gave up its io_uring mid-run (the kernel refused a
        submit for good): it sends one send() per ACK from then on, at more CPU per packet
        -- an operator must not have to guess why.  What it had queued went back to the
        pump; a send the ring took and never completed ended its transfer."""
        if self._batched and self._lane is not None and not self._lane.batched:
            self._batched = False
            err = self._lane.batch_error
            log.warning("io_uring failed (%s): the lock-step lane sends one send() per ACK "
                        "from now on", os.strerror(err) if err else "unknown error")

    def _drain_wake(self) -> None:
        """Reset the wake-up eventfd and run the calls worker threads posted (their work,
        ``_runnable``, is taken at the next pass)."""
        self._wake_sent = False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        self._run_posted()

    def _spin_pays(self) -> bool:
        """Busy-poll only while at most ``spin_max_sessions`` transfers run and each one's
        smoothed RTT is shorter than the spin: then an ACK is likely to arrive within it.
        A storm (many transfers) or a client across a real network (RTT of a millisecond)
        never makes the pump spin."""
        if len(self._by_fd) > self._spin_max or self._active() > self._spin_max:
            return False
        for t in self._by_fd.values():
            srtt = t.sender.srtt
            if srtt is None or srtt > self._spin:
                return False
        return True

    def _step(self, t: Transfer, now: float, action: Callable[[Transfer, float], None]) -> None:
        """Run one handler for ``t``; whatever it raises ends that transfer only."""
        try:
            if t.laned and self._take_back(t, now) and t.finished:
                return
            action(t, now)
        except Exception as exc:
            self._fail(t, exc)
            return
        if t.sender.outcome == "ok":
            self._finish(t)
        elif not t.finished:
            self._schedule(t)
            if self._lane is not None and t.lockstep:
                self._lane.arm(t)

    # -- the compiled lane -------------------------------------------------------------------

    def _answered(self) -> bool:
        """The last :meth:`_poll` answered ACKs in the compiled lane (work done, no events)."""
        return self._lane is not None and self._lane.answered > 0

    def _take_back(self, t: Transfer, now: float) -> bool:
        """Take ``t`` out of the compiled lane and handle what the lane read of it but left
        (before anything else happens to ``t``); True if there was such a datagram.  It goes
        the general way (:meth:`_datagram`); an errno means the client's port is gone, as a
        failed ``recv`` or ``send`` here."""
        assert self._lane is not None
        held = self._lane.take_back(t)
        if held is None:
            return False
        if isinstance(held, int):
            raise PeerGone(os.strerror(held))
        self._datagram(t, now, _EPOLLIN, held)
        return True

    def _lane_event(self, t: Transfer, now: float, ev: int) -> None:
        """:meth:`_event` for a pump with a compiled lane: the transfer is taken back first
        (with what the lane read of this event), handled, and armed again if it can be."""
        assert self._lane is not None
        if t.laned:
            try:
                if self._take_back(t, now):
                    ev = 0  # the event is spent: the lane had read its datagram
            except Exception as exc:
                self._fail(t, exc)
                return
        if ev:
            self._event(t, now, ev)
        if t.lockstep and not t.finished:
            self._lane.arm(t)

    def _fail(self, t: Transfer, exc: Exception) -> None:
        """End ``t`` with ``exc``, raised by one of its handlers: the one place that decides
        what a handler's exception means.  The transfer's own ends (client gone or aborting,
        retries spent, the file's read error) go to its session as they are; anything else is
        a bug, logged with its traceback -- it ends this transfer, never the pump."""
        if not isinstance(exc, (PeerGone, ClientError, TimedOut, Expired, OSError)):
            log.error("transfer pump failed fd=%d", t.fd, exc_info=exc)
        self._finish(t, exc)

    def _schedule(self, t: Transfer) -> None:
        """Make sure a timer fires no later than the sender's deadline.  Deadlines mostly move
        later (every ACK pushes them out), so an entry already in the heap is kept and
        re-armed when it fires early: about one heap push per RTO, not one per packet."""
        at = t.sender.deadline
        if at is None or at > t.expires:
            at = t.expires
            if at == _NEVER:
                return
        if t.finished:
            return
        if t.timer_at is None or at < t.timer_at:
            t.timer_at = at
            heapq.heappush(self._timers, (at, next(self._tick), t))
            scope = self._wait_scope
            if scope is not None:
                # The pump sleeps: wake it in time (a session's first send).
                trio_at = at - time.perf_counter() + trio.current_time()
                if trio_at < scope.deadline:
                    scope.deadline = trio_at

    # -- handlers --------------------------------------------------------------------------------

    def _event(self, t: Transfer, now: float, ev: int) -> None:
        """A socket is ready: take one datagram, feed it to the sender, send what is due.

        The hot path of every transfer (one call per ACK), so lock-step's common case -- the
        ACK of the newest block, and the next block goes out -- is handled here with one
        Sender call (``ack_send``); anything else goes to
        :meth:`_datagram`.  epoll is level-triggered, so a socket with more datagrams queued
        is simply reported again in the next pass (fair to the others, and no ``recv`` that
        fails with EAGAIN, an exception per packet, in lock-step where one ACK is all there
        is).
        """
        if ev != _EPOLLIN or not t.lockstep or t.want_write:
            self._datagram(t, now, ev, None)
            return
        buf = self._recv_buf  # no bytes object allocated (and resized) per ACK
        try:
            size = t.sock.recv_into(buf)
        except OSError:
            self._datagram(t, now, ev, None)  # the general path raises it again
            return
        sender = t.sender
        if not (size >= 4 and buf[1] == _OP_ACK and buf[0] == 0
                and sender.ack_send((buf[2] << 8) | buf[3], now)):
            self._datagram(t, now, ev, bytes(buf[:size]))
            return
        # The ACK of the newest block: the next one is recorded as sent and goes out now.
        # (The ACK is taken first: a chunk made current by ``poll`` then lets its buffer go.)
        seq = sender.sent_upto
        try:
            frame = t.source.poll(seq)
            if frame is None:  # not read yet: on_ready brings us back
                sender.unsent(seq)
                return
            if not self._send_datagram(t, frame):  # the socket is full: sent when writable
                sender.unsent(seq)
                return
            self._datagrams += 1
            if len(frame) < t.seg:
                t.final_len = len(frame) - 4
                sender.sent_final(seq)
        except Exception as exc:
            self._fail(t, exc)
            return
        if t.timer_at is None:
            self._schedule(t)

    def _datagram(self, t: Transfer, now: float, ev: int, data: bytes | None) -> None:
        """Everything :meth:`_event` does not do inline: a window's ACK, a duplicate or stale
        one, an ERROR, a socket that became writable or failed.  ``data``: the datagram
        already taken from the socket, if any."""
        sender = t.sender
        try:
            if ev != _EPOLLIN and ev & _EPOLLOUT and t.want_write:
                t.want_write = False
                self._ep.modify(t.fd, _EPOLLIN)
            due = None
            if data is not None or ev & _READABLE:
                if data is None:
                    try:
                        data = t.sock.recv(_RECV_SIZE)
                    except BlockingIOError:
                        data = b""
                    except OSError as exc:
                        raise PeerGone(os.strerror(exc.errno or 0)) from None
                if len(data) >= 4 and data[1] == _OP_ACK and data[0] == 0:
                    due = sender.on_ack((data[2] << 8) | data[3], now)
                    if due is None and sender.outcome is not None:
                        self._finish(t)
                        return
                else:
                    if data:
                        self._not_ack(t, data)
                    due = sender.to_send()
            else:
                due = sender.to_send()
            if due is not None and not t.want_write:
                self._transmit(t, due, now)
        except Exception as exc:
            self._fail(t, exc)
            return
        at = sender.deadline
        if at is not None and (t.timer_at is None or at < t.timer_at):
            self._schedule(t)

    @staticmethod
    def _not_ack(t: Transfer, data: bytes) -> None:
        """Anything but an ACK from the client: ERROR ends the transfer, the rest is noise."""
        try:
            packet = packets.parse(data)
        except MalformedPacket:
            t.ignored += 1
            return
        if isinstance(packet, packets.Error):
            raise ClientError(packet.code, packet.message)
        t.ignored += 1

    def _expired(self, t: Transfer, now: float) -> None:
        if now >= t.expires:
            raise Expired
        if t.sender.deadline is None or t.sender.deadline > now:
            self._schedule(t)
            return
        if not t.sender.timeout(now):
            raise TimedOut
        self._advance(t, now)

    def _advance(self, t: Transfer, now: float) -> None:
        """Send what the sender says is due (after a timeout, or once a read is done)."""
        due = t.sender.to_send()
        if due is not None and not t.want_write:
            self._transmit(t, due, now)

    def _transmit(self, t: Transfer, due: tuple[int, int], now: float) -> None:
        """Send blocks ``due`` as far as the file is read (the rest once ``on_ready`` fires)."""
        sender = t.sender
        first, last = due
        source = t.source
        if first == last:  # lock-step, or one block due
            if first:
                frame = source.poll(first)
                if frame is None:
                    return
            else:  # block 0: the OACK (tftpd/sender.py)
                frame = t.oack
                assert frame is not None, "block 0 is due but there is no OACK"
            if not self._send_datagram(t, frame):
                return
            if first:
                self._datagrams += 1
            final = len(frame) < t.seg and first != 0
            if final:
                t.final_len = len(frame) - 4
            sender.sent(first, first, now, final=final)
            return
        # Runs of whole frames, views of the read-ahead buffers: one per buffer the window
        # lies in.  Blocks not read yet are left out: on_ready brings us back for them.
        runs: list[memoryview] = []
        n, final = source.gather(first, last, runs)
        if not n:
            return
        seg = t.seg
        sent = self._send(t, runs, seg, n)
        self._datagrams += sent
        if sent:
            if final and sent == n:
                t.final_len = (len(runs[-1]) - 4) % seg
            sender.sent(first, first + sent - 1, now, final=final and sent == n)

    def _send(self, t: Transfer, runs: list[memoryview], seg: int, n: int) -> int:
        """Put the ``n`` datagrams of ``runs`` (whole frames of ``seg`` bytes, but the last)
        on the wire; returns how many went (the rest when writable)."""
        i = 0
        if t.gso and n > 1:
            per = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // seg)
            if per > 1:
                opt = _gso_option(seg)
                for group, k in _groups(runs, seg, per):
                    if k == 1:
                        break  # a lone datagram: a plain send below
                    try:
                        # Gathered by the kernel from the views of the read-ahead buffer
                        # and cut into datagrams of ``seg`` bytes: one system call.
                        t.sock.sendmsg(group, opt)
                    except BlockingIOError:
                        self._want_write(t)
                        return i
                    except OSError as exc:
                        if exc.errno == errno.ENOBUFS:
                            i += k  # dropped locally: the retransmission timer recovers it
                            continue
                        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                         errno.ENETUNREACH, errno.EHOSTDOWN):
                            raise PeerGone(os.strerror(exc.errno)) from None
                        # The kernel will not segment for this route: one send() each.
                        log.debug("UDP GSO refused fd=%d error=%s: sending per datagram",
                                  t.fd, exc.strerror)
                        t.gso = False
                        break
                    self.gso_sends += 1
                    i += k
        if i < n:
            skip = i * seg
            for run in runs:
                if skip >= len(run):
                    skip -= len(run)
                    continue
                for o in range(skip, len(run), seg):
                    if not self._send_datagram(t, run[o:o + seg]):
                        return i
                    i += 1
                skip = 0
        return n

    def _send_datagram(self, t: Transfer, packet: bytes) -> bool:
        """One datagram on ``t``'s socket; False when its buffer is full (``t`` then waits to
        be writable).  ENOBUFS counts as sent: dropped locally, like a packet lost on the
        way, and the retransmission timer recovers it.  Any other error: the client is gone."""
        try:
            t.sock.send(packet)
        except BlockingIOError:
            self._want_write(t)
            return False
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise PeerGone(os.strerror(exc.errno or 0)) from None
        return True

    def _want_write(self, t: Transfer) -> None:
        t.want_write = True
        self._ep.modify(t.fd, _EPOLLIN | _EPOLLOUT)
