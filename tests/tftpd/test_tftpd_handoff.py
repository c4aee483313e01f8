"""Requests placed on the worker with the fewest transfers (tftpd/handoff.py).

The kernel's SO_REUSEPORT hash spreads clients over the workers like coin tosses; the request
is passed to the least busy worker instead, and that must keep what the hash gave for free:
a retransmitted RRQ (which still reaches the first worker) starts no second transfer, the
limits count every transfer once, and a worker that cannot take a request leaves it served
where it arrived.

Two servers in one process stand for two workers: they share the limits and the inboxes as
forked workers do.  The second one listens on a port of its own, so every request reaches the
first and which of them serves it is the placement's choice alone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tftpd import packets
from tftpd.client import fetch
from tftpd.handoff import Handoff, PassedPorts, PassedRequest
from tftpd.limits import BUSY, SessionLimits
from tftpd.server import TftpServer

from .conftest import CLIENT_A, CLIENT_B
from .helpers import FAST, RawClient, file_sha256, make_config


def test_passed_ports_name_the_worker_until_the_end_or_expiry() -> None:
    ports = PassedPorts(bound=8)
    a, b = ("10.0.0.5", 4000), ("10.0.0.6", 4000)
    ports.add(a, 1, until=10.0)
    ports.add(b, 2, until=5.0)
    assert a in ports and len(ports) == 2
    assert ports.worker_for(a, now=4.0) == 1 and ports.worker_for(b, now=4.0) == 2
    assert ports.worker_for(("10.0.0.5", 4001), now=4.0) is None  # another port: not passed
    assert ports.worker_for(b, now=5.0) is None  # its transfer could not run longer
    assert b not in ports  # and the expired entry is gone
    ports.forget(a)  # the worker said the session ended
    assert ports.worker_for(a, now=4.0) is None and len(ports) == 0
    ports.forget(a)  # a second word of the same end is harmless


def test_passed_ports_drop_expired_entries_when_full_and_keep_live_ones() -> None:
    ports = PassedPorts(bound=4)
    for i in range(4):  # ends never reported: two expire at 5, two run until 50
        assert ports.has_room(0.0)
        ports.add(("10.0.0.5", 4000 + i), 1, until=5.0 if i < 2 else 50.0)
    assert ports.has_room(10.0)  # full: the two expired ones are swept
    ports.add(("10.0.0.9", 4000), 1, until=60.0)
    assert sorted(p for _, p in ports) == [4000, 4002, 4003]
    ports.add(("10.0.0.9", 4001), 1, until=60.0)
    # Nothing expired now: no room, and no live entry is dropped for one (the request is
    # then served where it arrived, so a peer whose ends never come cannot grow the table).
    assert not ports.has_room(10.0)
    assert len(ports) == 4


@given(st.lists(st.tuples(st.sampled_from(["add", "forget", "ask"]), st.integers(0, 5),
                          st.integers(0, 3), st.floats(0, 20)), max_size=60))
def test_passed_ports_answer_like_a_plain_map_with_deadlines(ops) -> None:
    """Against a model: an entry answers with its worker until its deadline, after a
    forget never, and entries are dropped only once expired."""
    ports = PassedPorts(bound=3)
    model: dict[tuple[str, int], tuple[int, float]] = {}
    now = 0.0
    for op, port, worker, step in ops:
        key = ("10.0.0.5", port)
        if op == "add":
            if ports.has_room(now) or key in ports:
                ports.add(key, worker, now + step)
                model[key] = (worker, now + step)
            assert len(ports) <= 3
        elif op == "forget":
            ports.forget(key)
            model.pop(key, None)
        else:
            now += step / 4
            want = model.get(key)
            expected = want[0] if want is not None and want[1] > now else None
            assert ports.worker_for(key, now) == expected
            if expected is None:
                model.pop(key, None)
        assert set(ports) <= set(model)  # never an entry the model does not have
        assert all(model[k][1] <= now for k in set(model) - set(ports))  # only expired drop


def test_placement_picks_the_worker_with_the_fewest_transfers() -> None:
    limits = SessionLimits(10, 10)
    assert limits.admit_balanced("10.0.0.1", 0, 3) == (None, 0)  # a tie stays where it is
    assert limits.admit_balanced("10.0.0.2", 0, 3) == (None, 1)
    assert limits.admit_balanced("10.0.0.3", 1, 3) == (None, 2)
    assert limits.admit_balanced("10.0.0.4", 2, 3) == (None, 2)  # all at one: stay
    assert [limits.load(k) for k in range(3)] == [1, 1, 2]
    limits.release("10.0.0.4", 2)
    limits.moved(2, 0)
    assert [limits.load(k) for k in range(3)] == [2, 1, 0]
    assert limits.active == 3
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        limits.release(ip, 0)
    assert limits.active == 0 and limits.load(0) == 0


def test_placement_refuses_like_admit_and_counts_nothing() -> None:
    limits = SessionLimits(1, 5)
    assert limits.admit_balanced("10.0.0.1", 1, 2) == (None, 1)
    assert limits.admit_balanced("10.0.0.2", 0, 2) == (BUSY, 0)
    assert [limits.load(0), limits.load(1), limits.active] == [0, 1, 1]


def _handoffs(count: int) -> list[Handoff]:
    inboxes, outboxes = Handoff.pairs(count)
    return [Handoff(k, inboxes, outboxes) for k in range(count)]


def test_messages_arrive_whole_and_garbage_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _handoffs(2)
    data = packets.encode_request(packets.OP_RRQ, "pxelinux.0", "octet", {"tsize": "0"})
    assert a.pass_request(1, 0, ("127.0.0.10", 4321), ("127.0.0.1", 1), data) is None
    assert a.pass_request(1, 0, ("127.0.0.10", 4321), None, data, admitted=False) is None
    a._out[1].send(b"R{not json")
    b.ended(0, "127.0.0.10", 4321)
    got: list[object] = []
    b.reader(got.append, lambda c, p: got.append(("ended?", c, p)))()
    a.reader(lambda r: got.append(r), lambda c, p: got.append(("ended", c, p)))()
    assert got == [PassedRequest(0, 0, ("127.0.0.10", 4321), ("127.0.0.1", 1), data),
                   PassedRequest(0, 0, ("127.0.0.10", 4321), None, data, admitted=False),
                   ("ended", "127.0.0.10", 4321)]
    assert any("undecodable message" in r.getMessage() for r in caplog.records)


def test_a_full_or_closed_inbox_refuses_at_once() -> None:
    a, b = _handoffs(2)
    big = b"x" * 60000
    sent = 0
    while a.pass_request(1, 0, ("127.0.0.10", 1), None, big) is None:
        sent += 1
        assert sent < 1000, "a send to a full inbox must fail, not block"
    assert sent > 0
    assert a.pass_request(1, 0, ("127.0.0.10", 1), None, big) == "full"
    b.inbox.close()  # worker 1 is gone: nobody reads its inbox any more
    assert a.pass_request(1, 0, ("127.0.0.10", 1), None, b"x") == "gone"
    c, d = _handoffs(2)
    d.inbox.close()
    assert c.pass_request(1, 0, ("127.0.0.10", 1), None, b"x") == "gone"  # an empty one, too


@asynccontextmanager
async def two_workers(tree: Path, **kw: object) -> AsyncIterator[
        tuple[TftpServer, TftpServer, tuple[str, int], SessionLimits]]:
    """Worker 0 (whose address is yielded) and worker 1, sharing limits and inboxes."""
    limits = SessionLimits(64, 16)
    handoffs = _handoffs(2)
    servers = [TftpServer(make_config(tree, **kw)) for _ in range(2)]
    for server, handoff in zip(servers, handoffs, strict=True):
        server.share_limits(limits)
        server.share_handoff(handoff)
    async with trio.open_nursery() as nursery:
        addrs = [await nursery.start(s.run) for s in servers]
        try:
            yield servers[0], servers[1], addrs[0][0], limits
        finally:
            nursery.cancel_scope.cancel()
    for handoff in handoffs:
        handoff.close()


async def wait_idle(*servers: TftpServer) -> None:
    with trio.fail_after(5):
        for server in servers:
            await server.wait_idle()


async def wait_forgotten(server: TftpServer) -> None:
    """Until ``server`` heard that every request it passed has ended (through its inbox)."""
    with trio.fail_after(2):
        while server._passed:
            await trio.sleep(0.01)


async def test_a_busier_worker_passes_requests_to_the_other(tree: Path) -> None:
    async with two_workers(tree) as (first, second, addr, limits):
        for ip in ("198.51.100.1", "198.51.100.2"):  # two transfers already run on worker 0
            assert limits.admit(ip, 0) is None
        want = file_sha256(tree / CLIENT_A / "secret-a")
        for _ in range(4):
            res = await fetch(addr, "secret-a", blksize=1024, bind=CLIENT_A)
            assert res.sha256 == want  # the client's own tree, served by the other worker
        await wait_idle(first, second)
        assert (first.stats.requests, first.stats.handed_off) == (4, 4)
        assert (first.stats.completed, second.stats.completed) == (0, 4)
        assert second.stats.requests == 0  # counted once, where it arrived
        # Every transfer counted once and released by the worker that ran it.
        assert [limits.load(0), limits.load(1), limits.active] == [2, 0, 2]
        await wait_forgotten(first)  # worker 1 says when each has ended


async def test_even_load_stays_where_it_arrived(tree: Path) -> None:
    async with two_workers(tree) as (first, second, addr, limits):
        for _ in range(3):  # one at a time: 0 vs 0 each time
            res = await fetch(addr, "whoami", bind=CLIENT_B)
            assert res.size == len(CLIENT_B) + 1
        await wait_idle(first, second)
        assert first.stats.handed_off == 0 and first.stats.completed == 3


async def test_a_retransmitted_request_of_a_passed_transfer_is_a_duplicate(
        tree: Path) -> None:
    slow = replace(FAST, retransmit_timeout=5.0)  # no OACK resent while we listen
    async with two_workers(tree, policy=slow) as (first, second, addr, limits):
        assert limits.admit("198.51.100.1", 0) is None
        with RawClient(addr, CLIENT_A) as c:
            for _ in range(3):
                c.rrq("secret-a", blksize=1024)
            await c.expect(packets.OptionAck)
            assert await c.quiet(0.3) == []  # one transfer, not three
            c.send_peer(packets.encode_error(0, "enough"))
            await wait_idle(second)
            # Passed on too: the worker running the transfer knows they are its own.
            assert second.stats.duplicate_requests == 2
            assert second.stats.aborted_by_client == 1
            await wait_forgotten(first)
            # Over: the same client port may ask again, and gets a new transfer.
            c.peer = None
            c.rrq("secret-a", blksize=1024)
            await c.expect(packets.OptionAck)
            c.send_peer(packets.encode_error(0, "enough"))
        await wait_idle(first, second)
        assert second.stats.aborted_by_client == 2 and first.stats.handed_off == 2


async def test_a_worker_that_cannot_take_it_leaves_it_served_here(
        tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with two_workers(tree) as (first, second, addr, limits):
        assert limits.admit("198.51.100.1", 0) is None
        assert first._handoff is not None
        first._handoff._out[1].close()  # as if worker 1 had died
        res = await fetch(addr, "whoami", bind=CLIENT_A)
        assert res.size == len(CLIENT_A) + 1
        await wait_idle(first, second)
        assert (first.stats.handed_off, first.stats.completed) == (0, 1)
        assert [limits.load(0), limits.load(1), limits.active] == [1, 0, 1]


@pytest.mark.parametrize("why", ["stopping", "listener"])
async def test_a_passed_request_the_worker_cannot_start_is_released(
        tree: Path, caplog: pytest.LogCaptureFixture, why: str) -> None:
    """Stopping (the stop reached worker 1 first), or a listen socket index it does not have:
    the transfer counted for it is released and worker 0 is told, so it forgets the port."""
    caplog.set_level(logging.DEBUG, logger="tftpd.server")
    async with two_workers(tree) as (first, second, _addr, limits):
        if why == "stopping":
            second._stopping = True
        assert limits.admit("127.0.0.10", 1) is None  # what worker 0 counted before passing
        first._passed.add(("127.0.0.10", 4000), 1, trio.current_time() + 60)
        data = packets.encode_request(packets.OP_RRQ, "whoami", "octet", {})
        assert first._handoff is not None
        assert first._handoff.pass_request(1, 0 if why == "stopping" else 7,
                                           ("127.0.0.10", 4000), None, data) is None
        await wait_forgotten(first)
        assert [limits.load(1), limits.active] == [0, 0]
        assert second.stats.active == 0
        expected = "stopping" if why == "stopping" else "listen socket 7 unknown"
        assert any("passed request not started" in r.getMessage()
                   and expected in r.getMessage() for r in caplog.records)


async def test_a_lost_word_of_the_end_costs_a_hop_not_the_client(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1 cannot tell worker 0 that the passed transfer ended (its inbox full, say):
    the same client port asking again still gets a transfer -- worker 0 passes the request
    to worker 1, which knows it is new -- and a retransmission of that one is still one."""
    slow = replace(FAST, retransmit_timeout=5.0)
    async with two_workers(tree, policy=slow) as (first, second, addr, limits):
        assert limits.admit("198.51.100.1", 0) is None
        assert second._handoff is not None
        monkeypatch.setattr(second._handoff, "ended", lambda *_: None)
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("secret-a", blksize=1024)
            await c.expect(packets.OptionAck)
            c.send_peer(packets.encode_error(0, "enough"))
            await wait_idle(second)
            assert list(first._passed) == [(CLIENT_A, c.sock.getsockname()[1])]
            c.peer = None
            for _ in range(2):  # a new request from the same port, and its retransmission
                c.rrq("secret-a", blksize=1024)
            await c.expect(packets.OptionAck)
            assert await c.quiet(0.3) == []
            c.send_peer(packets.encode_error(0, "enough"))
        await wait_idle(first, second)
        assert (first.stats.handed_off, first.stats.completed) == (1, 0)
        assert second.stats.aborted_by_client == 2
        assert second.stats.duplicate_requests == 1
        assert [limits.load(0), limits.load(1), limits.active] == [1, 0, 1]


async def test_a_port_passed_to_a_worker_that_died_is_served_here(tree: Path) -> None:
    async with two_workers(tree) as (first, second, addr, limits):
        assert first._handoff is not None
        with RawClient(addr, CLIENT_A) as c:
            key = (CLIENT_A, c.sock.getsockname()[1])
            first._passed.add(key, 1, trio.current_time() + 60)
            first._handoff._out[1].close()  # worker 1 is gone
            c.rrq("whoami")
            data = await c.expect(packets.Data)
            assert isinstance(data, packets.Data)
            assert data.payload == (CLIENT_A + "\n").encode()
            c.ack(1)
        await wait_idle(first, second)
        assert first.stats.completed == 1 and key not in first._passed

