"""The DATA phase of a read transfer as a pure state machine (sans-IO).

RFC 1350 lock-step and RFC 7440 windows are one machine: a window of ``windowsize`` blocks
(1 = lock-step).  :class:`Sender` is fed what happened -- an ACK for block ``n``, a
retransmission timeout, the blocks the driver put on the wire -- each with the time, and says
what to send next (:meth:`Sender.to_send`: a range of block sequence numbers) and when the
transfer is over (:attr:`Sender.outcome`).  It opens no socket, reads no file and never looks
at a clock of its own, so every rule below is unit- and property-tested without a network
(tests/tftpd/test_tftpd_sender.py); whatever drives it (tftpd/pump.py) only moves bytes and
time.

With options, the OACK is block 0 (``Sender(..., oack=True)``): it goes out alone, its ACK 0
opens the first window, and it is retransmitted and given up on like any block -- one machine
for the whole exchange after the request.

Block numbers are an unbounded sequence (``seq``, block 1 = first DATA); only the wire form
wraps, ``seq & 0xFFFF``, so 65535 is followed by 0 (docs/clients.md: the rollover every large
kernel or initrd needs), inside a window too.  An ACK is mapped back to the one ``seq`` in
``[base - 1, highest sent]`` with that wire number; anything else is stale or from the future
and ignored, never fatal (some firmware ACKs blocks it never got).

Retransmission rules:

* timeout -> resend the window from the first unacknowledged block, up to ``retries`` times in
  a row without progress, then give up (``outcome == "timeout"``);
* a duplicate ACK of the block before the window (U-Boot re-sends its last ACK when it times
  out) -> resend the window once, unless that window went out less than a hold-off ago: an echo
  that fast is the Sorcerer's Apprentice (RFC 1123 4.2.3.1: a duplicated DATA acknowledged
  twice), and answering it would send every block twice for the rest of the transfer;
* an ACK inside the window (an RFC 7440 receiver lost the block after it) -> restart the window
  after it, with the same hold-off, so a client that ACKs every block cannot make us send each
  block ``windowsize`` times.

The hold-off is ``max(holdoff_min, 2 * smoothed RTT)``; RTT samples are taken only from windows
that were sent once (Karn's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

#: What :meth:`Sender.ack` made of an ACK (for tests and logs; the counters say the same).
IGNORED = "ignored"  # stale, from the future, or a held-off duplicate
DUPLICATE = "duplicate"  # duplicate ACK answered: the window is due again
PROGRESS = "progress"  # new blocks acknowledged
DONE = "done"  # the final block is acknowledged


@dataclass
class SenderCounters:
    """Per-transfer counts; the server adds them to its own once the transfer ends."""

    blocks: int = 0  # distinct blocks sent
    retransmits: int = 0  # blocks sent again
    duplicate_acks: int = 0
    ignored_acks: int = 0


class Sender:
    """One transfer's DATA phase: which blocks are due, and when it ends.

    The driver loop is::

        while sender.outcome is None:
            due = sender.to_send()            # (first, last) or None
            ... send blocks first..k (k <= last; fewer if the file is not read that far yet,
                or the final short block came first) ...
            sender.sent(first, k, now, final=<block k is the last one>)
            ... wait for a datagram or sender.deadline ...
            sender.ack(block, now) / sender.timeout(now)
    """

    __slots__ = (
        "windowsize", "rto", "retries", "holdoff_min", "_counters", "base", "sent_upto",
        "final", "resend_from", "deadline", "outcome", "srtt", "_tries", "_window_sent_at",
        "_last_tx", "_window_clean", "_last_restart",
    )

    def __init__(self, windowsize: int, rto: float, retries: int, *,
                 holdoff_min: float = 0.002, oack: bool = False) -> None:
        if windowsize < 1:
            raise ValueError("windowsize must be at least 1")
        self.windowsize = windowsize
        self.rto = rto
        self.retries = retries
        self.holdoff_min = holdoff_min
        self._counters = SenderCounters()
        first = 0 if oack else 1  # block 0: the OACK, acknowledged by ACK 0
        self.base = first  # first unacknowledged block
        self.sent_upto = first - 1  # highest block sent so far
        self.final: int | None = None  # the last block, once the driver has sent it
        self.resend_from = first  # first block due
        #: When the blocks in flight are due again (None: nothing in flight).
        self.deadline: float | None = None
        #: None while running; "ok" or "timeout" once over.
        self.outcome: str | None = None
        self.srtt: float | None = None
        self._tries = 0  # timeouts in a row without progress
        self._window_sent_at = float("-inf")  # when block ``base`` last went out
        self._last_tx = 0.0  # when the latest burst went out
        self._window_clean = True  # nothing in this window was resent (Karn)
        self._last_restart = float("-inf")

    @property
    def counters(self) -> SenderCounters:
        """The transfer's counts so far.  ``blocks`` (distinct blocks sent) is the highest
        block sent, so it is read from there, not counted per packet."""
        self._counters.blocks = self.sent_upto if self.sent_upto > 0 else 0
        return self._counters

    # -- what to send ----------------------------------------------------------------------

    def window_end(self) -> int:
        if not self.base:
            return 0  # the OACK goes out alone
        end = self.base + self.windowsize - 1
        if self.final is not None and end > self.final:
            end = self.final
        return end

    def to_send(self) -> tuple[int, int] | None:
        """The blocks due now, ``(first, last)`` inclusive, or None."""
        if self.outcome is not None:
            return None
        end = self.window_end()
        if self.resend_from > end:
            return None
        return self.resend_from, end

    @property
    def final_sent(self) -> bool:
        """The last block went out at least once (a client that then vanishes got it all,
        most likely)."""
        return self.final is not None

    def holdoff(self) -> float:
        srtt = self.srtt if self.srtt is not None else 0.0
        return max(self.holdoff_min, 2.0 * srtt)

    def sent(self, first: int, last: int, now: float, *, final: bool = False) -> None:
        """The driver transmitted blocks ``first..last`` (a prefix of :meth:`to_send`);
        ``final``: block ``last`` was shorter than blksize, the end of the file."""
        if (first == self.sent_upto + 1 and first == self.resend_from and not final
                and last - self.base < self.windowsize):
            # The hot path: new blocks, in order, inside the window.
            self.sent_upto = last
            self.resend_from = last + 1
            if first == self.base:
                self._window_sent_at = now
            self._last_tx = now
            self.deadline = now + self.rto
            return
        if last < first:
            return
        if first != self.resend_from or last > self.window_end():
            raise ValueError(f"sent {first}..{last} but {self.to_send()} was due")
        if first <= self.sent_upto:
            self._counters.retransmits += min(last, self.sent_upto) - first + 1
            self._window_clean = False
        if last > self.sent_upto:
            self.sent_upto = last
        if final:
            self.final = last
        if first == self.base:
            self._window_sent_at = now
        self._last_tx = now
        self.resend_from = last + 1
        self.deadline = now + self.rto

    # -- events ----------------------------------------------------------------------------

    def _rtt_sample(self, now: float) -> None:
        """The newest block sent was acknowledged at ``now`` and nothing of its window was
        resent (Karn's rule, checked by the callers): fold the round trip into ``srtt``."""
        sample = now - self._last_tx
        old = self.srtt
        self.srtt = sample if old is None else 0.875 * old + 0.125 * sample

    def on_ack(self, block: int, now: float) -> tuple[int, int] | None:
        """:meth:`ack` then :meth:`to_send`, with the common case inlined: the ACK of the
        newest block sent, which acknowledges the whole window (every lock-step ACK)."""
        upto = self.sent_upto
        if (block == upto & 0xFFFF and upto >= self.base and self.final is None
                and self.outcome is None):
            # ``upto - (base - 1)`` is in 1..windowsize, so this wire number maps to ``upto``.
            if self._window_clean:
                self._rtt_sample(now)
            base = upto + 1
            self.base = self.resend_from = base
            self._tries = 0
            self._window_clean = True
            self.deadline = None
            return base, base + self.windowsize - 1
        self.ack(block, now)
        return self.to_send()

    def ack_send(self, block: int, now: float) -> bool:
        """Lock-step's common case in one call: the ACK of the newest block sent, and the next
        block (``sent_upto + 1`` after the call) goes out now.  Exactly :meth:`on_ack`
        followed by :meth:`sent` of that block; if it turns out to be the short last one the
        driver says so with :meth:`sent_final`.

        Returns False, having changed nothing, when this is not that case (a window, the ACK
        of the final block, a duplicate, a stale ACK ...): the driver then takes the general
        path (:meth:`on_ack`).  Returns True when the block is recorded as sent: the driver
        must send it, or call :meth:`unsent` if it could not (not read yet, socket full).

        Why a call of its own: in a boot storm this runs once per DATA packet of every
        lock-step transfer, and two calls touching the same state were a large share of the
        pump's Python per packet.
        """
        upto = self.sent_upto
        if (block != upto & 0xFFFF or upto < self.base or self.final is not None
                or self.outcome is not None or self.windowsize != 1):
            return False
        if self._window_clean:
            self._rtt_sample(now)
        self._in_flight_alone(upto + 1, now)
        return True

    def _in_flight_alone(self, seq: int, now: float) -> None:
        """Block ``seq`` went out at ``now`` after the ACK of the one before: it is the only
        one in flight (what :meth:`ack_send` and :meth:`acked_and_sent` leave)."""
        self.base = self.sent_upto = seq
        self.resend_from = seq + 1
        self._tries = 0
        self._window_clean = True
        self._window_sent_at = self._last_tx = now
        self.deadline = now + self.rto

    def lane_state(self) -> tuple[int, bool, float | None, float] | None:
        """What a lock-step lane outside this class needs to answer the next ACKs itself
        (tftpd/_lane.c): ``(newest block sent, window clean, srtt, when it went out)``; None
        unless the transfer is lock-step with exactly that block in flight and nothing due
        (the one state in which :meth:`ack_send` answers an ACK)."""
        if (self.windowsize != 1 or self.outcome is not None or self.final is not None
                or self.sent_upto != self.base or self.resend_from != self.base + 1):
            return None
        return self.sent_upto, self._window_clean, self.srtt, self._last_tx

    def acked_and_sent(self, upto: int, last_tx: float, srtt: float | None) -> None:
        """Blocks up to ``upto`` went out, each after the ACK of the one before, the newest
        at ``last_tx``: the state :meth:`ack_send` would have left after each of those ACKs,
        taken in one call from the lane that answered them (``srtt`` is its running
        estimate, folded the same way)."""
        if self.lane_state() is None or upto <= self.sent_upto:
            raise ValueError(f"blocks up to {upto} cannot have been sent from here")
        self._in_flight_alone(upto, last_tx)
        self.srtt = srtt

    def sent_final(self, seq: int) -> None:
        """Block ``seq``, just recorded by :meth:`ack_send`, is the short last one."""
        if seq != self.sent_upto or self.final is not None:
            raise ValueError(f"block {seq} is not the one ack_send recorded")
        self.final = seq

    def unsent(self, seq: int) -> None:
        """Block ``seq``, recorded as sent by :meth:`ack_send`, did not go out: it is due
        again, and nothing is in flight (the state :meth:`on_ack` alone leaves)."""
        if seq != self.sent_upto or seq != self.base or self.final is not None:
            raise ValueError(f"block {seq} is not the one ack_send recorded")
        self.sent_upto = seq - 1
        self.resend_from = seq
        self.deadline = None

    def ack(self, block: int, now: float) -> str:
        """An ACK with wire block number ``block`` arrived at ``now``."""
        if self.outcome is not None:
            return IGNORED
        prev = self.base - 1
        seq = prev + ((block - prev) & 0xFFFF)
        if seq > self.sent_upto:
            self._counters.ignored_acks += 1  # stale (older than base - 1) or never sent
            return IGNORED
        if seq == prev:
            if prev < 0:  # "the block before the OACK": nothing we sent
                self._counters.ignored_acks += 1
                return IGNORED
            self._counters.duplicate_acks += 1
            if now - self._window_sent_at >= self.holdoff():
                self.resend_from = self.base
                return DUPLICATE
            return IGNORED
        # seq >= base: new data acknowledged.
        if self._window_clean and seq == self.sent_upto:
            self._rtt_sample(now)
        if self.final is not None and seq == self.final:
            self.base = seq + 1
            self.outcome = "ok"
            self.deadline = None
            return DONE
        self.base = seq + 1
        self._tries = 0
        self._window_clean = True
        if seq < self.sent_upto:
            # The receiver stopped mid-window (RFC 7440: it lost seq + 1).  Restart after it,
            # unless we just did: a client ACKing every block must not make us resend the
            # window for each of its ACKs.
            if now - self._last_restart >= self.holdoff():
                self._last_restart = now
                self.resend_from = self.base
            else:
                self.resend_from = self.sent_upto + 1
            self.deadline = now + self.rto  # blocks base..sent_upto are still in flight
        else:
            self.resend_from = self.base
            self.deadline = None  # nothing in flight until the driver sends again
        return PROGRESS

    def timeout(self, now: float) -> bool:
        """``deadline`` passed without progress: True if the window is due again, False if the
        retry budget is spent (``outcome`` is then ``"timeout"``)."""
        if self.outcome is not None:
            return False
        self._tries += 1
        if self._tries > self.retries:
            self.outcome = "timeout"
            self.deadline = None
            return False
        self.resend_from = self.base
        self._window_clean = False
        self.deadline = None
        return True
