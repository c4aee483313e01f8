"""Requests passed between worker processes, so a boot storm is spread evenly over them.

With ``--workers`` every process has its own listen socket on the same address
(SO_REUSEPORT), and the kernel picks one by a hash of the client's address and port.  That
keeps a retransmitted RRQ on the worker that has its transfer, but it spreads a storm only as
evenly as coin tosses: 16 clients over two workers split 10/6 or worse almost half the time,
and a worker with more transfers than the other is the one the last clients wait for (one
process runs on one CPU) while the other CPU idles.  So at admission
(:meth:`tftpd.limits.SessionLimits.admit_balanced`) a request goes to the worker with the
fewest transfers, and when that is another one the request is passed to it here, as it
arrived.

Each worker has an inbox: one end of a Unix datagram socket pair made before the fork, read
from the worker's transfer pump; every worker keeps the other ends to send on.  Two messages:

* a request -- the listen socket's index (every worker binds the same list in the same
  order), the client's address, the address the request was sent to (IP_PKTINFO) and the
  datagram itself.  The receiver starts the session as if the request had reached its own
  socket; the admission is already counted for it.
* a session's end, sent back to the worker that passed the request.  Until then that worker
  passes every request from the same client port to the same worker, unadmitted: the kernel
  keeps sending them to the first, and only the worker running the transfer knows whether
  one is its retransmission (dropped) or a new request after its end (served).  So a lost
  word of the end costs a hop, never a refused client.

Sends never block: a full or closed inbox means the request is served where it arrived.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Messages taken from the inbox per pass of the pump (the rest in the next pass).
_MESSAGES_PER_PASS = 32
#: Largest message: a request datagram (at most 65507 bytes) and a short header.
_MAX_MESSAGE = 66000
_REQUEST = b"R"
_ENDED = b"E"


class PassedPorts:
    """The client ports whose request this worker passed to another worker, and to which.

    Until that worker reports the session's end (:meth:`forget`), or the longest transfer
    could have ended (``until``, given with :meth:`add`), every request from such a port is
    passed to the same worker (see the module docstring).  An entry whose end was never
    reported (a lost message, a worker that died) expires, and once ``bound`` entries are
    held the expired ones are swept by :meth:`has_room`; a live one is never dropped (it
    stands for a transfer running elsewhere, counted in the limits), so a full table means
    the next request is served where it arrived.  Pure bookkeeping: the caller gives the
    time (trio's clock in the server).
    """

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._ports: dict[tuple[str, int], tuple[int, float]] = {}

    def __contains__(self, key: object) -> bool:  # the listener's check per request
        return key in self._ports

    def __len__(self) -> int:
        return len(self._ports)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._ports)

    def has_room(self, now: float) -> bool:
        """Whether one more entry may be added, the expired ones swept first once ``bound``
        are held.  When not (ends never reported, e.g. a peer's inbox kept full), the caller
        serves the request where it arrived instead of passing it: the table stays bounded,
        and no live entry is dropped."""
        if len(self._ports) >= self._bound:
            for old in [k for k, (_, end) in self._ports.items() if end <= now]:
                del self._ports[old]
        return len(self._ports) < self._bound

    def add(self, key: tuple[str, int], worker: int, until: float) -> None:
        """The request from client port ``key`` went to ``worker``, whose transfer can run
        until ``until`` at the longest (after :meth:`has_room`)."""
        self._ports[key] = (worker, until)

    def worker_for(self, key: tuple[str, int], now: float) -> int | None:
        """The worker requests from ``key`` go to, or None: not passed, or the entry has
        expired (and is dropped)."""
        entry = self._ports.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._ports[key]
            return None
        return entry[0]

    def forget(self, key: tuple[str, int]) -> None:
        """Its session ended (the worker said so), or that worker cannot take requests."""
        self._ports.pop(key, None)


@dataclass(frozen=True)
class PassedRequest:
    """A request another worker received and passed here."""

    origin: int  # the worker that received it (and is told when its session ends)
    listener: int  # index of the listen socket it arrived on
    addr: tuple  # the client's address, as recvmsg gave it
    dest: tuple[str, int] | None  # (local address, interface index) it was sent to
    data: bytes  # the request datagram
    #: The origin admitted it for this worker (counted in the limits).  False: it came from
    #: a client port whose transfer runs here, and this worker decides what it is.
    admitted: bool = True


class Handoff:
    """One worker's inbox and the other workers' inboxes to send to (``worker`` counts from
    0 here; log lines count from 1)."""

    def __init__(self, worker: int, inboxes: list[socket.socket],
                 outboxes: list[socket.socket]) -> None:
        self.worker = worker
        self.inbox = inboxes[worker]
        self._out = outboxes
        self.workers = len(outboxes)

    @staticmethod
    def pairs(count: int) -> tuple[list[socket.socket], list[socket.socket]]:
        """Inbox and outbox ends for ``count`` workers, made before the fork."""
        inboxes, outboxes = [], []
        for _ in range(count):
            inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            inbox.setblocking(False)
            outbox.setblocking(False)
            # Room for a burst of passed requests (a rack powering on) before sends fail.
            for sock, opt in ((inbox, socket.SO_RCVBUF), (outbox, socket.SO_SNDBUF)):
                sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
            inboxes.append(inbox)
            outboxes.append(outbox)
        return inboxes, outboxes

    @classmethod
    def for_worker(cls, worker: int, inboxes: list[socket.socket],
                   outboxes: list[socket.socket]) -> Handoff:
        """This worker's part (call in the worker, after the fork): the other workers'
        inboxes are closed here, so a worker that dies leaves nobody reading its inbox and a
        send to it fails at once instead of filling a buffer nobody reads."""
        for i, inbox in enumerate(inboxes):
            if i != worker:
                inbox.close()
        return cls(worker, inboxes, outboxes)

    def close(self) -> None:
        self.inbox.close()
        for sock in self._out:
            sock.close()

    def _send(self, worker: int, message: bytes) -> str | None:
        """None when sent; else ``"full"`` (try again later) or ``"gone"`` (nobody reads
        that inbox any more: the worker ended)."""
        try:
            self._out[worker].send(message)
        except BlockingIOError:
            log.debug("cannot pass to worker=%d: its inbox is full", worker + 1)
            return "full"
        except OSError as exc:
            log.debug("cannot pass to worker=%d error=%s", worker + 1, exc)
            return "gone"
        return None

    def pass_request(self, worker: int, listener: int, addr: tuple,
                     dest: tuple[str, int] | None, data: bytes, *,
                     admitted: bool = True) -> str | None:
        """Send a request to ``worker``: None when sent, else why not (``"full"``,
        ``"gone"``; serve it here then, or drop a retransmission)."""
        head = json.dumps([self.worker, listener, list(addr), dest, admitted]).encode()
        return self._send(worker, _REQUEST + head + b"\0" + data)

    def ended(self, origin: int, client: str, port: int) -> None:
        """Tell ``origin`` that the session of the request it passed here is over."""
        if self._send(origin, _ENDED + json.dumps([client, port]).encode()) is not None:
            # The origin then keeps passing that client port's requests here until its
            # entry expires (a hop more for each, nothing worse).
            log.warning("cannot tell worker %d that a passed transfer ended client=%s "
                        "port=%d", origin + 1, client, port)

    def reader(self, on_request: Callable[[PassedRequest], None],
               on_ended: Callable[[str, int], None]) -> Callable[[], None]:
        """What the pump calls when the inbox is readable: take up to a pass's worth of
        messages and hand each on.  A message that cannot be decoded is logged and dropped:
        only our own workers write here."""
        recv = self.inbox.recv

        def on_readable() -> None:
            for _ in range(_MESSAGES_PER_PASS):
                try:
                    message = recv(_MAX_MESSAGE)
                except BlockingIOError:
                    return
                try:
                    kind, rest = message[:1], message[1:]
                    if kind == _REQUEST:
                        head, _, data = rest.partition(b"\0")
                        origin, listener, addr, dest, admitted = json.loads(head)
                        request = PassedRequest(int(origin), int(listener), tuple(addr),
                                                tuple(dest) if dest is not None else None,
                                                data, bool(admitted))
                    elif kind == _ENDED:
                        client, port = json.loads(rest)
                    else:
                        raise ValueError(f"unknown kind {kind!r}")
                except (ValueError, TypeError) as exc:
                    log.error("undecodable message from another worker error=%s", exc)
                    continue
                if kind == _REQUEST:
                    on_request(request)
                else:
                    on_ended(str(client), int(port))

        return on_readable
