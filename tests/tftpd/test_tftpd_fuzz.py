"""Random datagrams at the listen socket and at a live transfer: the server must keep serving,
never hit an internal error, and the live transfer must survive everything but an ERROR."""

from __future__ import annotations

import random
import socket
from collections import Counter
from pathlib import Path

import trio

from tests.fuzz import KINDS, datagram, junk
from tftpd import packets
from tftpd.client import fetch

from .conftest import CLIENT_A, CLIENT_B
from .helpers import RawClient, file_sha256, running


async def test_random_datagrams_leave_the_server_serving(tree: Path) -> None:
    rng = random.Random(1234)
    want = file_sha256(tree / CLIENT_A / "1m.bin")
    async with running(tree, max_sessions_per_ip=64, error_replies_per_second=1e6) as (
            server, addr):
        # Two sprayers: one fixed port (dedupe/limits paths), one new port per datagram.
        fixed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fixed.bind((CLIENT_B, 0))
        fixed.setblocking(False)
        st = server.stats

        def seen() -> int:
            return st.malformed + st.requests + st.stray_datagrams

        kinds: Counter[str] = Counter()
        with trio.fail_after(60):
            for i in range(1, 3001):
                kind, data = datagram(rng)
                kinds[kind] += 1
                if i % 2:
                    fixed.sendto(data, addr)
                else:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.bind((CLIENT_B, 0))
                        s.sendto(data, addr)
                # Pace by feedback so no datagram is lost in a full socket buffer.
                while seen() < i - 20:
                    await trio.sleep(0.001)
            while seen() < 3000:  # every single datagram was looked at
                await trio.sleep(0.01)
        assert set(kinds) == set(KINDS), kinds  # every shape of the generator was sent
        # A live transfer sprayed from its own client port: ignored unless it is an ERROR.
        with RawClient(addr, CLIENT_A) as c:
            c.rrq("1m.bin", blksize=1024)
            await c.expect(packets.OptionAck)
            c.ack(0)
            first = await c.expect(packets.Data)
            assert first.block == 1
            for _ in range(500):
                c.send_peer(junk(rng, errors=False))
            stray = await c.quiet(0.2)  # (a junk ACK 0 is a duplicate ACK: DATA 1 again)
            assert all(isinstance(p, packets.Data) and p.block == 1 for p in stray), stray
            c.ack(1)
            # The session is still alive and goes on where it was.  A DATA 1 already on its
            # way (the 0.1 s retransmission timer fires during quiet() on a loaded machine)
            # may come first; anything else before DATA 2 fails.
            nxt = await c.expect(packets.Data)
            while nxt.block == 1:
                nxt = await c.expect(packets.Data)
            assert nxt.block == 2
            c.send_peer(packets.encode_error(0, "enough"))
        fixed.close()
        res = await fetch(addr, "1m.bin", blksize=1468, windowsize=8, bind=CLIENT_A)
        assert res.sha256 == want
    assert server.stats.errors == 0  # no internal exception anywhere
    assert server.stats.malformed > 0
    assert server.stats.completed >= 1
