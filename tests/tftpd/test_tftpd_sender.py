"""The sans-IO sender (tftpd/sender.py) without a network: every rule of the DATA phase, and
whole transfers through a simulated network that drops, duplicates, reorders and delays.

The driver in :func:`simulate` is what tftpd/pump.py does with sockets, on a fake clock: send
what ``to_send`` says (the last block is short), feed ACKs and timeouts back.
"""

from __future__ import annotations

import copy
import heapq
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd.sender import DONE, DUPLICATE, IGNORED, PROGRESS, Sender


def send_due(s: Sender, now: float, n_blocks: int) -> list[int]:
    """Send everything due; block ``n_blocks`` is the short, final one."""
    due = s.to_send()
    if due is None:
        return []
    first, last = due
    last = min(last, n_blocks)
    s.sent(first, last, now, final=last == n_blocks)
    return list(range(first, last + 1))


# -- the rules, one by one -----------------------------------------------------------------------

def test_lockstep_transfer_sends_each_block_once() -> None:
    s = Sender(1, rto=1.0, retries=3)
    sent = []
    now = 0.0
    while s.outcome is None:
        sent += send_due(s, now, 5)
        now += 0.001
        s.ack(sent[-1], now)
    assert sent == [1, 2, 3, 4, 5]
    assert s.outcome == "ok"
    assert (s.counters.blocks, s.counters.retransmits) == (5, 0)
    assert s.deadline is None


def test_window_goes_out_whole_and_moves_on_the_last_ack() -> None:
    s = Sender(4, rto=1.0, retries=3)
    assert send_due(s, 0.0, 10) == [1, 2, 3, 4]
    assert s.to_send() is None
    assert s.ack(4, 0.01) == PROGRESS
    assert send_due(s, 0.01, 10) == [5, 6, 7, 8]
    assert s.ack(8, 0.02) == PROGRESS
    assert send_due(s, 0.02, 10) == [9, 10]  # the window stops at the final block
    assert s.ack(10, 0.03) == DONE
    assert s.outcome == "ok" and s.counters.retransmits == 0


def test_duplicate_ack_resends_the_window_once() -> None:
    """U-Boot re-sends its last ACK on its own timeout: one resend per duplicate."""
    s = Sender(1, rto=10.0, retries=3)
    send_due(s, 0.0, 100)
    s.ack(1, 0.001)
    send_due(s, 0.001, 100)  # block 2 out
    assert s.ack(1, 1.0) == DUPLICATE  # long after: a real duplicate
    assert send_due(s, 1.0, 100) == [2]
    assert s.to_send() is None  # exactly one resend
    assert s.ack(1, 2.0) == DUPLICATE
    assert send_due(s, 2.0, 100) == [2]
    assert (s.counters.duplicate_acks, s.counters.retransmits) == (2, 2)


def test_sorcerers_apprentice_echo_is_not_answered() -> None:
    """A duplicated DATA is ACKed twice at once: the second ACK arrives within the hold-off
    of the window it would resend, so nothing goes out twice."""
    s = Sender(1, rto=10.0, retries=3)
    now = 0.0
    send_due(s, now, 50)
    for block in range(1, 49):
        now += 0.001
        assert s.ack(block, now) == PROGRESS
        send_due(s, now, 50)
        assert s.ack(block, now + 0.0001) == IGNORED  # the echo
        assert s.to_send() is None
    assert s.counters.retransmits == 0
    assert s.counters.duplicate_acks == 48


def test_stale_and_future_acks_are_ignored_never_fatal() -> None:
    s = Sender(1, rto=10.0, retries=3)
    for block in (1, 2):
        send_due(s, 0.0, 100)
        s.ack(block, 0.0)
    assert send_due(s, 0.0, 100) == [3]
    for odd in (40000, 9, 0, 65535, 1):
        assert s.ack(odd, 1.0) == IGNORED
    assert s.to_send() is None
    assert s.outcome is None
    # Block 1 is older than base - 1 (== 2): stale like the rest, not a duplicate.
    assert (s.counters.ignored_acks, s.counters.duplicate_acks) == (5, 0)


def test_mid_window_ack_restarts_after_it_with_a_hold_off() -> None:
    """RFC 7440: an ACK inside the window means the block after it was lost."""
    s = Sender(4, rto=10.0, retries=3)
    assert send_due(s, 0.0, 100) == [1, 2, 3, 4]
    assert s.ack(2, 0.05) == PROGRESS
    assert send_due(s, 0.05, 100) == [3, 4, 5, 6]
    assert s.counters.retransmits == 2
    # A client ACKing every block: the next mid-window ACK right after does not resend.
    assert s.ack(3, 0.0501) == PROGRESS
    assert send_due(s, 0.0501, 100) == [7]  # only the new block the window now allows
    assert s.counters.retransmits == 2


def test_timeouts_resend_then_give_up() -> None:
    s = Sender(2, rto=0.5, retries=3)
    send_due(s, 0.0, 100)
    for attempt in range(3):
        assert s.deadline is not None
        assert s.timeout(s.deadline) is True
        assert send_due(s, 0.5 * (attempt + 1), 100) == [1, 2]
    assert s.timeout(2.0) is False
    assert s.outcome == "timeout"
    assert s.counters.retransmits == 6
    assert s.to_send() is None


def test_progress_resets_the_retry_budget() -> None:
    s = Sender(1, rto=0.5, retries=1)
    now = 0.0
    for block in range(1, 20):
        send_due(s, now, 100)
        assert s.timeout(now + 0.5)  # one loss per block is within a budget of 1
        send_due(s, now + 0.5, 100)
        now += 0.6
        s.ack(block, now)
    assert s.outcome is None


def test_nothing_in_flight_means_no_timer() -> None:
    """While the file is not read yet (a slow disk), no retransmission timer runs."""
    s = Sender(1, rto=0.5, retries=1)
    assert s.deadline is None
    send_due(s, 0.0, 100)
    assert s.deadline == 0.5
    s.ack(1, 0.1)
    assert s.deadline is None
    assert s.to_send() == (2, 2)


def test_partial_sends_continue_where_they_stopped() -> None:
    s = Sender(8, rto=1.0, retries=1)
    s.sent(1, 3, 0.0)  # the driver had only three blocks read
    assert s.to_send() == (4, 8)
    s.sent(4, 8, 0.1)
    assert s.to_send() is None
    with pytest.raises(ValueError):
        s.sent(9, 9, 0.2)  # outside the window


@pytest.mark.parametrize("windowsize", [1, 7, 16, 64])
def test_rollover_block_numbers_wrap_inside_windows(windowsize: int) -> None:
    """More than 65535 blocks: wire numbers wrap to 0, also in a window spanning the wrap."""
    n = 65535 + 3 * windowsize + 5
    s = Sender(windowsize, rto=1.0, retries=1)
    now = 0.0
    seen = 0
    while s.outcome is None:
        blocks = send_due(s, now, n)
        assert blocks[0] == seen + 1
        seen = blocks[-1]
        now += 0.001
        s.ack(seen & 0xFFFF, now)
    assert seen == n
    assert s.counters.retransmits == 0


def test_duplicate_ack_across_the_wrap() -> None:
    s = Sender(1, rto=10.0, retries=1)
    now = 0.0
    for block in range(1, 65537):  # block 65536 goes out as wire number 0
        send_due(s, now, 70000)
        now += 0.001
        s.ack(block & 0xFFFF, now)
    send_due(s, now, 70000)  # 65537 = wire 1
    assert s.ack(0, now + 1.0) == DUPLICATE  # the ACK of 65536
    assert send_due(s, now + 1.0, 70000) == [65537]
    assert s.ack(1, now + 1.1) == PROGRESS


# -- the OACK as block 0 ------------------------------------------------------------------------

def test_the_oack_goes_out_alone_and_ack_0_opens_the_window() -> None:
    s = Sender(4, rto=1.0, retries=3, oack=True)
    assert s.to_send() == (0, 0)  # never DATA before the client accepted the options
    s.sent(0, 0, 0.0)
    assert s.to_send() is None
    assert s.ack(1, 0.01) == IGNORED  # nothing of ours: block 1 was never sent
    assert s.ack(0xFFFF, 0.01) == IGNORED  # "the block before the OACK"
    assert s.to_send() is None
    assert s.ack(0, 0.02) == PROGRESS
    assert send_due(s, 0.02, 6) == [1, 2, 3, 4]
    assert s.ack(4, 0.03) == PROGRESS
    assert send_due(s, 0.03, 6) == [5, 6]
    assert s.ack(6, 0.04) == DONE
    assert s.counters.blocks == 6 and s.counters.retransmits == 0
    assert s.counters.ignored_acks == 2 and s.counters.duplicate_acks == 0


def test_an_unanswered_oack_is_resent_then_given_up() -> None:
    s = Sender(1, rto=0.5, retries=2, oack=True)
    s.sent(0, 0, 0.0)
    assert s.counters.blocks == 0
    for k in (1, 2):
        assert s.timeout(0.5 * k)
        assert s.to_send() == (0, 0)
        s.sent(0, 0, 0.5 * k)
    assert not s.timeout(1.5)
    assert s.outcome == "timeout" and s.counters.retransmits == 2


def test_lock_step_ack_0_sends_block_1_on_the_fast_path() -> None:
    s = Sender(1, rto=1.0, retries=3, oack=True)
    assert not s.ack_send(0, 0.0)  # nothing sent yet: not the fast path's case
    s.sent(0, 0, 0.0)
    assert s.ack_send(0, 0.01)
    assert (s.base, s.sent_upto) == (1, 1)


# -- whole transfers through a bad network -------------------------------------------------------

class Receiver:
    """An RFC 7440 receiver (RFC 1350 lock-step when windowsize is 1).

    ACKs the last in-order block once ``windowsize`` blocks arrived in order or the final one
    did; on a gap or a duplicate it ACKs the last in-order block at once; when nothing arrives
    for ``patience`` it re-sends its last ACK (U-Boot does).
    """

    def __init__(self, windowsize: int, n_blocks: int, patience: float) -> None:
        self.windowsize = windowsize
        self.n_blocks = n_blocks
        self.patience = patience
        self.got: list[int] = []
        self.in_window = 0
        self.last_heard = 0.0

    def data(self, seq: int, now: float) -> int | None:
        """A DATA with sequence number ``seq`` arrived: the ACK to send, if any (wire form)."""
        self.last_heard = now
        expected = len(self.got) + 1
        if seq == expected:
            self.got.append(seq)
            self.in_window += 1
            if self.in_window >= self.windowsize or seq == self.n_blocks:
                self.in_window = 0
                return seq & 0xFFFF
            return None
        self.in_window = 0
        return (expected - 1) & 0xFFFF

    @property
    def done(self) -> bool:
        return len(self.got) == self.n_blocks


def simulate(windowsize: int, n_blocks: int, rng: random.Random, *, drop: float,
             duplicate: float, reorder: float, delay: float = 0.001,
             retries: int = 40, oack: bool = False) -> tuple[Sender, Receiver, int]:
    """Run one transfer on a fake clock; returns (sender, receiver, datagrams sent).  With
    ``oack`` the exchange starts with the OACK as block 0, which the receiver answers with
    ACK 0 (as it answers any block it did not expect: with its last in-order block)."""
    s = Sender(windowsize, rto=0.05, retries=retries, holdoff_min=0.002, oack=oack)
    r = Receiver(windowsize, n_blocks, patience=0.2)
    net: list[tuple[float, int, str, int]] = []  # (arrival, tiebreak, kind, number)
    tick = 0
    datagrams = 0

    def transmit(kind: str, number: int, now: float) -> None:
        nonlocal tick
        if rng.random() < drop:
            return
        for _ in range(2 if rng.random() < duplicate else 1):
            at = now + delay + (rng.uniform(0, 4 * delay) if rng.random() < reorder else 0)
            tick += 1
            heapq.heappush(net, (at, tick, kind, number))

    now = 0.0
    for seq in send_due(s, now, n_blocks):
        datagrams += 1
        transmit("data", seq, now)
    last_ack = None
    for _ in range(1_000_000):
        if s.outcome is not None and (r.done or s.outcome != "ok"):
            break
        if datagrams > 30 * n_blocks + 300:
            break  # a traffic storm: the assertions of the caller fail
        candidates = []
        if net:
            candidates.append(net[0][0])
        if s.deadline is not None:
            candidates.append(s.deadline)
        if last_ack is not None and not r.done:
            candidates.append(r.last_heard + r.patience)
        now = max(now, min(candidates))
        if net and net[0][0] <= now:
            _, _, kind, number = heapq.heappop(net)
            if kind == "data":
                ack = r.data(number, now)
                if ack is not None:
                    last_ack = ack
                    transmit("ack", ack, now)
            else:
                s.ack(number, now)
        elif s.deadline is not None and s.deadline <= now:
            s.timeout(now)
        elif last_ack is not None and r.last_heard + r.patience <= now:
            r.last_heard = now
            transmit("ack", last_ack, now)
        # every send carries the block's sequence number; the receiver sees seq, as a real
        # one sees seq & 0xFFFF in order -- rollover is covered by the tests above.
        for seq in send_due(s, now, n_blocks):
            datagrams += 1
            transmit("data", seq, now)
    return s, r, datagrams


@settings(max_examples=150, deadline=None)
@given(windowsize=st.integers(1, 16), n_blocks=st.integers(1, 200), seed=st.integers(0, 2**32),
       drop=st.sampled_from([0.0, 0.05, 0.2]), duplicate=st.sampled_from([0.0, 0.1, 0.3]),
       reorder=st.sampled_from([0.0, 0.1, 0.5]), oack=st.booleans())
def test_lossy_transfers_deliver_every_block_in_order(
        windowsize: int, n_blocks: int, seed: int, drop: float, duplicate: float,
        reorder: float, oack: bool) -> None:
    s, r, _ = simulate(windowsize, n_blocks, random.Random(seed), drop=drop,
                       duplicate=duplicate, reorder=reorder, oack=oack)
    assert s.outcome == "ok"
    assert r.got == list(range(1, n_blocks + 1))
    assert s.counters.blocks == n_blocks


@settings(max_examples=60, deadline=None)
@given(windowsize=st.integers(1, 16), n_blocks=st.integers(1, 300), seed=st.integers(0, 2**32),
       oack=st.booleans())
def test_a_clean_network_gets_every_block_exactly_once(windowsize: int, n_blocks: int,
                                                        seed: int, oack: bool) -> None:
    s, r, datagrams = simulate(windowsize, n_blocks, random.Random(seed), drop=0.0,
                               duplicate=0.0, reorder=0.0, oack=oack)
    assert r.done and s.outcome == "ok"
    assert datagrams == n_blocks + oack
    assert s.counters.retransmits == s.counters.duplicate_acks == 0


@settings(max_examples=60, deadline=None)
@given(n_blocks=st.integers(50, 300), seed=st.integers(0, 2**32))
def test_duplicated_packets_do_not_double_the_traffic(n_blocks: int, seed: int) -> None:
    """The Sorcerer's Apprentice: every duplicated DATA draws a duplicate ACK; answering
    those would send every later block twice.  Lock-step, 30 % duplication, no loss."""
    s, r, datagrams = simulate(1, n_blocks, random.Random(seed), drop=0.0, duplicate=0.3,
                               reorder=0.0)
    assert r.done and s.outcome == "ok"
    assert s.counters.duplicate_acks > 0
    assert datagrams <= n_blocks * 1.05


def test_a_dead_client_times_out_after_the_budget() -> None:
    s, r, datagrams = simulate(4, 100, random.Random(1), drop=1.0, duplicate=0.0, reorder=0.0,
                               retries=5)
    assert s.outcome == "timeout"
    assert datagrams == 4 * 6  # the first window and five retransmissions of it
    assert r.got == []


# -- the lock-step fast path: one call for the common ACK ---------------------------------------

def _state(s: Sender) -> dict[str, object]:
    state = {name: getattr(s, name) for name in Sender.__slots__ if name != "_counters"}
    state["counters"] = vars(s.counters).copy()
    return state


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(-2, 1), st.booleans(), st.booleans(),
                                st.floats(0.0, 0.05)), max_size=80),
       start=st.sampled_from([1, 65530]))
def test_ack_send_is_on_ack_then_sent_of_the_next_block(
        steps: list[tuple[int, bool, bool, float]], start: int) -> None:
    """Whatever the ACK (the newest block's, a duplicate, a stale one, one from the future,
    across the 16-bit wrap), ``ack_send`` either leaves the sender untouched or ends in the
    state ``on_ack`` + ``sent`` of the next block gives; ``unsent`` then makes that block due
    again with nothing in flight, as ``on_ack`` alone left it."""
    s = Sender(1, rto=1.0, retries=3)
    now = 0.0
    for seq in range(1, start + 1):  # get near the wrap quickly when asked
        s.sent(seq, seq, now)
        if seq < start:
            s.on_ack(seq & 0xFFFF, now)
    for delta, final, undo, dt in steps:
        if s.outcome is not None:
            break
        now += dt
        block = (s.sent_upto + delta) & 0xFFFF
        fused = copy.deepcopy(s)
        before = _state(s)
        took = fused.ack_send(block, now)
        due = s.on_ack(block, now)
        if not took:
            assert _state(fused) == before
            if due is not None:  # the general path: whatever is due goes out
                s.sent(due[0], due[0], now, final=final)
            continue
        seq = fused.sent_upto
        assert due == (seq, seq)
        if final and not undo:
            fused.sent_final(seq)
        if undo:
            acked_only = _state(s)
            fused.unsent(seq)
            got = _state(fused)
            for name in ("_window_sent_at", "_last_tx"):  # overwritten by the next send
                del got[name], acked_only[name]
            assert got == acked_only
            assert fused.to_send() == (seq, seq) and fused.deadline is None
        s.sent(seq, seq, now, final=final)
        if not undo:
            assert _state(fused) == _state(s)


def test_ack_send_leaves_windows_to_the_general_path() -> None:
    s = Sender(4, rto=1.0, retries=3)
    s.sent(1, 4, 0.0)
    assert not s.ack_send(4, 0.001)
    assert s.base == 1 and s.sent_upto == 4  # untouched


def test_unsent_refuses_a_block_ack_send_did_not_record() -> None:
    s = Sender(1, rto=1.0, retries=3)
    s.sent(1, 1, 0.0)
    assert s.ack_send(1, 0.001)
    with pytest.raises(ValueError):
        s.unsent(1)
    with pytest.raises(ValueError):
        s.sent_final(1)
    s.sent_final(2)
    with pytest.raises(ValueError):
        s.unsent(2)  # the last block went out: nothing to take back


# -- the compiled lane's hand-over (tftpd/_lane.c answers ACKs outside the Sender) ----------------

@settings(max_examples=200, deadline=None)
@given(oack=st.booleans(), start=st.integers(0, 70000), steps=st.integers(1, 300),
       clean=st.booleans(), gaps=st.lists(st.floats(1e-6, 0.01), min_size=1, max_size=8))
def test_acked_and_sent_is_ack_send_repeated(oack: bool, start: int, steps: int, clean: bool,
                                             gaps: list[float]) -> None:
    """What the lane folds back in one call leaves the sender exactly as ``ack_send`` once
    per answered ACK would (the lane computes the same smoothed RTT; it is handed over)."""
    s = Sender(1, rto=0.5, retries=3, oack=oack)
    now = 0.0
    first = 0 if oack else 1
    s.sent(first, first, now)
    for _ in range(start % 50):  # somewhere into the transfer, through the general path
        now += 0.001
        s.on_ack(s.sent_upto & 0xFFFF, now)
        s.sent(s.sent_upto + 1, s.sent_upto + 1, now)
    if not clean:  # the window in flight was resent: no RTT sample from its ACK
        assert s.timeout(now + 1.0)
        now += 1.0
        s.sent(s.base, s.base, now)
    state = s.lane_state()
    assert state is not None and state[0] == s.sent_upto and state[1] == clean
    stepped = copy.deepcopy(s)
    for i in range(steps):
        now += gaps[i % len(gaps)]
        assert stepped.ack_send(stepped.sent_upto & 0xFFFF, now)
    s.acked_and_sent(stepped.sent_upto, now, stepped.srtt)
    assert {k: getattr(s, k) for k in Sender.__slots__ if k != "_counters"} == \
        {k: getattr(stepped, k) for k in Sender.__slots__ if k != "_counters"}
    assert s.counters == stepped.counters


@pytest.mark.parametrize("state", ["window", "nothing sent", "acked, next not sent", "final",
                                   "resend due", "over"])
def test_the_lane_gets_only_lock_step_with_one_block_in_flight(state: str) -> None:
    s = Sender(4 if state == "window" else 1, rto=1.0, retries=0 if state == "over" else 3)
    if state != "nothing sent":
        s.sent(1, 1, 0.0, final=state == "final")
    if state == "acked, next not sent":
        s.ack(1, 0.01)
    elif state == "resend due":
        assert s.timeout(1.0)
    elif state == "over":
        assert not s.timeout(1.0)
    assert s.lane_state() is None
    with pytest.raises(ValueError):
        s.acked_and_sent(5, 1.0, None)


def test_acked_and_sent_refuses_to_go_backwards() -> None:
    s = Sender(1, rto=1.0, retries=3)
    s.sent(1, 1, 0.0)
    s.ack(1, 0.001)
    s.sent(2, 2, 0.001)
    with pytest.raises(ValueError):
        s.acked_and_sent(2, 0.002, None)
