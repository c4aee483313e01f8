"""The hand-over between the pump and the compiled lock-step lane (tftpd/_lane.c).

The lane answers one exchange outside the interpreter -- the ACK of the newest block, and the
next full frame of the current read-ahead chunk goes out -- for transfers the pump *arms* in
it, and gives everything else back.  This module decides when a transfer may be armed (the
sender's one-block-in-flight state, the next block in the current chunk) and folds what the
lane did back into the :class:`~tftpd.sender.Sender` when the pump *takes it back*, so the
protocol's rules stay in the sender and the pump's handlers never see a stale one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pump import Transfer

try:
    from ._lane import Lane as _Compiled
except ImportError:  # not built (no compiler at install): the pump answers in Python
    _Compiled = None

#: Whether the C module was built (``pip install`` compiles it where gcc is present).
AVAILABLE = _Compiled is not None


class CompiledLane:
    """The compiled lane on one pump's epoll object.  Used from the pump's thread only."""

    def __init__(self, epfd: int, maxevents: int = 512, *, batch: bool = True) -> None:
        if _Compiled is None:
            raise RuntimeError("tftpd._lane is not built")
        self._lane = _Compiled(epfd, maxevents, batch)
        #: ``poll(timeout)``: ``select.epoll.poll``'s events, less the ACKs answered.
        self.poll = self._lane.poll

    @property
    def answered(self) -> int:
        """ACKs the last :meth:`poll` answered itself."""
        return self._lane.answered

    def close(self) -> None:
        """Release every armed frame buffer and the io_uring (a descriptor) now."""
        self._lane.close()

    @property
    def batched(self) -> bool:
        """Whether the answers of one :meth:`poll` go out in one io_uring_enter."""
        return self._lane.batched

    @property
    def batch_error(self) -> int | None:
        """Why the lane has no io_uring although asked to use one (an errno), or None."""
        return self._lane.batch_error

    @property
    def pending(self) -> int:
        """Transfers holding a datagram (or errno) the lane read and the pump has not taken
        back: each :meth:`poll` reports them again, and the pump must not sleep meanwhile."""
        return self._lane.pending

    @property
    def datagrams(self) -> int:
        """DATA datagrams the lane sent."""
        return self._lane.datagrams

    def arm(self, t: Transfer) -> None:
        """Let the lane answer ``t``'s next ACKs, if its sender is in the one state the lane
        answers (lock-step, one block in flight, nothing due) and the next block is in the
        current read-ahead chunk; otherwise ``t`` stays with the pump."""
        if t.finished or t.want_write or t.laned:
            return
        state = t.sender.lane_state()
        if state is None:
            return
        upto, clean, srtt, last_tx = state
        frames, first, count, end = t.source.current()
        if not first <= upto + 1 < first + count:
            return  # the next block is in a chunk not current yet: BlockSource.poll gets it
        self._lane.arm(t.fd, upto, frames, first, count, end, t.seg, clean, srtt, last_tx)
        t.laned = True

    def take_back(self, t: Transfer) -> bytes | int | None:
        """Take ``t`` out of the lane and fold what it sent into the sender; returns what the
        lane read but did not answer (a datagram, or the errno of a failed ``recv`` or
        ``send``), which the pump must handle now."""
        state = self._lane.disarm(t.fd)  # releases the slot even when it raises
        t.laned = False
        if state is None:
            return None
        upto, last_tx, srtt, sent, held = state
        if sent:
            t.sender.acked_and_sent(upto, last_tx, srtt)
        return held

    def forget(self, fd: int) -> None:
        """Drop whatever the lane has armed on ``fd``: the pump calls it for every descriptor
        entering its epoll set, a new socket that a slot left armed for a closed one (a bug,
        or a failure while taking it back) must never answer for."""
        self._lane.disarm(fd)
