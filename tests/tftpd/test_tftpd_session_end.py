"""How a session ends when nobody waits for it in a task: the time limit, a stop while its
open is out, and a server cancelled while its DATA phase runs in the pump.

Most requests run without a task of their own (tftpd/session.py): the limits a task's cancel
scope used to enforce must hold anyway, and every session must be counted once and leave no
limiter token or socket behind.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio

from tftpd import opener as opener_mod
from tftpd import packets
from tftpd.server import TftpServer

from .conftest import CLIENT_A
from .helpers import FAST, RawClient, make_config
from .test_tftpd_opener import STALLING


@pytest.mark.parametrize("options", [{}, {"blksize": 512}], ids=["no-options", "oack"])
async def test_a_transfer_past_its_time_limit_ends(tree: Path, options: dict[str, int]) -> None:
    """A client that ACKs every block, slowly: no retry budget ever runs out, so only the
    time limit ends it -- with or without the OACK exchange (a task then waits)."""
    policy = replace(FAST, max_transfer_seconds=1.0, retransmit_timeout=0.5, retries=50)
    server = TftpServer(make_config(tree, policy=policy))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.run)
        with RawClient(addrs[0], CLIENT_A) as c:
            started = trio.current_time()
            c.rrq("secret-a", **options)  # 70,000 bytes: 137 blocks, 27 s at this pace
            if options:
                await c.expect(packets.OptionAck)
                c.ack(0)
            with trio.fail_after(10):
                while True:
                    got = await c.recv(timeout=5)
                    assert got is not None
                    packet = got[0]
                    if isinstance(packet, packets.Error):
                        break
                    assert isinstance(packet, packets.Data)
                    await trio.sleep(0.2)
                    c.ack(packet.block)
            elapsed = trio.current_time() - started
        assert "took too long" in packet.message
        assert 0.9 < elapsed < 3.0
        with trio.fail_after(5):
            await server.wait_idle()
        nursery.cancel_scope.cancel()
    assert server.stats.timeouts == 1 and server.stats.active == 0


async def test_stopping_ends_a_session_waiting_for_its_open(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open stuck on its disk when the server stops: the client hears that the server is
    shutting down, the session is counted, and its read-thread token is given back."""
    monkeypatch.setattr(opener_mod, "_BOOT", STALLING)
    (tree / CLIENT_A / "stall").write_bytes(b"x" * 1000)
    # (inline_open=False: on this local tree the file would be opened inline, not stall)
    server = TftpServer(make_config(tree, inline_open=False))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.run)
        with RawClient(addrs[0], CLIENT_A) as c:
            c.rrq("stall")
            await trio.sleep(0.5)
            assert server.stats.active == 1
            server.stop(grace=0.2)
            err = await c.expect(packets.Error, timeout=5)
            assert "shutting down" in err.message
    assert server.stats.shutdown == 1 and server.stats.active == 0
    assert server._limiter.borrowed_tokens == 0


async def test_a_cancelled_server_ends_transfers_in_its_pump(tree: Path) -> None:
    """Cancelled from outside (no grace) while a DATA phase waits for an ACK: the transfer
    ends as a shutdown, counted once, and the client is told."""
    server = TftpServer(make_config(tree, policy=replace(FAST, retransmit_timeout=30)))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.run)
        c = RawClient(addrs[0], CLIENT_A)
        c.rrq("secret-a")
        await c.expect(packets.Data)
        assert server.stats.active == 1
        nursery.cancel_scope.cancel()
    with c:
        err = await c.expect(packets.Error, timeout=5)
        assert "shutting down" in err.message
    assert server.stats.shutdown == 1 and server.stats.active == 0
