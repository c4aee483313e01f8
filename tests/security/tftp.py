"""A small lock-step TFTP fetcher over tests/tftpd's RawClient, for attack tests."""

from __future__ import annotations

from collections.abc import Callable

import trio

from tests.tftpd.helpers import RawClient
from tftpd import packets

#: Clients: two "machines" on loopback, plus one that has no directory at all.
A = "127.0.0.10"
B = "127.0.0.11"
NOBODY = "127.0.0.12"


async def fetch_raw(server: tuple[str, int], request: bytes, bind: str = A,
                    timeout: float = 3.0) -> bytes | packets.Error:
    """Send a raw request datagram; return the file's bytes or the ERROR packet.

    Fails the test on silence (a refusal must be an ERROR, never a drop) and on anything odd.
    """
    with RawClient(server, bind=bind) as c:
        c.send_raw(request)
        data = b""
        expected = 1
        blksize = 512
        while True:
            got = await c.recv(timeout)
            assert got is not None, f"no answer within {timeout}s to {request[:80]!r}"
            pkt, addr = got
            assert addr[0] in ("127.0.0.1", bind), f"answer from {addr}"
            if isinstance(pkt, packets.Error):
                assert not data, f"ERROR after {len(data)} bytes: {pkt}"
                return pkt
            if isinstance(pkt, packets.OptionAck):
                blksize = int(pkt.options.get("blksize", 512))
                c.ack(0)
                continue
            assert isinstance(pkt, packets.Data), pkt
            if pkt.block != expected & 0xFFFF:
                continue  # a retransmission
            data += pkt.payload
            c.ack(pkt.block)
            expected += 1
            if len(pkt.payload) < blksize:
                return data


async def fetch(server: tuple[str, int], name: str, bind: str = A, mode: str = "octet",
                **options: object) -> bytes | packets.Error:
    req = packets.encode_request(packets.OP_RRQ, name, mode,
                                 {k: str(v) for k, v in options.items()})
    return await fetch_raw(server, req, bind=bind)


def request_bytes(name: bytes, mode: bytes = b"octet") -> bytes:
    return b"\0\x01" + name + b"\0" + mode + b"\0"


async def stepped_fetch(server: tuple[str, int], name: str, bind: str, blksize: int,
                        cut_at: int, at_cut: Callable[[], None], pause: float = 0.0,
                        timeout: float = 10.0) -> bytes | packets.Error:
    """Fetch `name` block by block (lock-step); once `cut_at` bytes are in, call `at_cut()`
    (the fault) and stay quiet for `pause` seconds, then go on.  Returns the bytes of a normal
    end or the ERROR packet; fails the test on `timeout` seconds of silence."""
    with RawClient(server, bind=bind) as c:
        c.rrq(name, blksize=blksize)
        data = bytearray()
        expected = 1
        size = 512
        cut = False
        while True:
            got = await c.recv(timeout)
            assert got is not None, f"no answer to {name} within {timeout} s, {len(data)} in"
            pkt, _ = got
            if isinstance(pkt, packets.Error):
                return pkt
            if isinstance(pkt, packets.OptionAck):
                size = int(pkt.options.get("blksize", 512))
                c.ack(0)
                continue
            assert isinstance(pkt, packets.Data), pkt
            if pkt.block != expected & 0xFFFF:
                continue  # a retransmission
            data += pkt.payload
            expected += 1
            if len(pkt.payload) < size:
                c.ack(pkt.block)
                return bytes(data)
            if not cut and len(data) >= cut_at:
                cut = True
                at_cut()
                await trio.sleep(pause)
            c.ack(pkt.block)
