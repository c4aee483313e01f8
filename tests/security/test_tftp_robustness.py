"""Random datagrams at the listen port and at a live transfer port: the server keeps serving."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import trio

from tests.fuzz import junk
from tests.tftpd.helpers import RawClient, running
from tftpd import packets

from .tftp import A, B, fetch, receive_rest


async def test_random_datagrams_do_not_stop_the_server(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for ip in (A, B):
        (root / ip).mkdir(parents=True)
        (root / ip / "whoami").write_bytes(ip.encode() + b"\n")
    (root / A / "big").write_bytes(bytes(range(256)) * 400)
    rng = random.Random(7)
    async with running(root) as (server, addr):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
                RawClient(addr, bind=A) as victim:
            s.bind((B, 0))
            s.setblocking(False)
            # a transfer in progress whose port receives junk from another address
            victim.rrq("big")
            first = await victim.expect(packets.Data)
            assert first.block == 1 and victim.peer is not None
            with trio.fail_after(8):
                for i in range(3000):
                    to = victim.peer if i % 3 == 0 else addr
                    try:
                        s.sendto(junk(rng), to)
                    except BlockingIOError:
                        await trio.sleep(0.001)
                    if i % 100 == 0:
                        await trio.sleep(0)  # let the server run
                        while True:  # drain the ERROR replies
                            try:
                                s.recv(70000)
                            except BlockingIOError:
                                break
            # the victim's transfer was not steered by B's junk: it completes intact
            assert await receive_rest(victim, first) == bytes(range(256)) * 400
            assert server.stats.malformed > 0
        # and everybody is still served
        assert await fetch(addr, "whoami", bind=A) == A.encode() + b"\n"
        assert await fetch(addr, "whoami", bind=B) == B.encode() + b"\n"
