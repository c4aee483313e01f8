"""A small lock-step TFTP fetcher over tests/tftpd's RawClient, for attack tests.

One receive loop (`_lock_step`) serves every way the tests fetch: a whole raw request
(`fetch_raw`), a fetch that injects a fault part-way (`stepped_fetch`), and the rest of a
transfer whose first block the test took itself (`receive_rest`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from tests.tftpd.helpers import RawClient
from tftpd import packets

#: Clients: two "machines" on loopback, plus one that has no directory at all.
A = "127.0.0.10"
B = "127.0.0.11"
NOBODY = "127.0.0.12"

#: Called with the bytes received so far, after each full block and before its ACK: a test
#: cuts or pauses the transfer here (the server waits for that ACK meanwhile).
OnBytes = Callable[[int], Awaitable[None]]


async def _lock_step(c: RawClient, what: str, timeout: float, *, data: bytes = b"",
                     expected: int = 1, blksize: int = 512, on_bytes: OnBytes | None = None,
                     error_after_data: bool = False) -> bytes | packets.Error:
    """Receive a transfer on `c` (whose request is out) block by block, ACKing each, to the
    short block that ends it; returns the bytes, or the ERROR packet that ended it.

    Fails the test on `timeout` seconds of silence (a refusal must be an ERROR, never a drop),
    on an answer from a stranger, on an OACK once data came, on anything but DATA/OACK/ERROR,
    and on an ERROR after data unless `error_after_data` (a fault test's expected outcome).
    """
    bind = c.sock.getsockname()[0]
    got_bytes = bytearray(data)
    while True:
        got = await c.recv(timeout)
        assert got is not None, \
            f"no answer within {timeout}s to {what}, {len(got_bytes)} bytes in"
        pkt, addr = got
        assert addr[0] in ("127.0.0.1", bind), f"answer from {addr}"
        if isinstance(pkt, packets.Error):
            assert error_after_data or not got_bytes, \
                f"ERROR after {len(got_bytes)} bytes: {pkt}"
            return pkt
        if isinstance(pkt, packets.OptionAck):
            assert not got_bytes, f"OACK after {len(got_bytes)} bytes: {pkt}"
            blksize = int(pkt.options.get("blksize", 512))
            c.ack(0)
            continue
        assert isinstance(pkt, packets.Data), pkt
        if pkt.block != expected & 0xFFFF:
            continue  # a retransmission
        got_bytes += pkt.payload
        expected += 1
        if len(pkt.payload) < blksize:
            c.ack(pkt.block)
            return bytes(got_bytes)
        if on_bytes is not None:
            await on_bytes(len(got_bytes))
        c.ack(pkt.block)


async def fetch_raw(server: tuple[str, int], request: bytes, bind: str = A,
                    timeout: float = 3.0, on_bytes: OnBytes | None = None,
                    error_after_data: bool = False) -> bytes | packets.Error:
    """Send a raw request datagram; return the file's bytes or the ERROR packet.

    Fails the test on silence (a refusal must be an ERROR, never a drop) and on anything odd;
    `on_bytes` and `error_after_data` as in `_lock_step`.
    """
    with RawClient(server, bind=bind) as c:
        c.send_raw(request)
        return await _lock_step(c, repr(request[:80]), timeout, on_bytes=on_bytes,
                                error_after_data=error_after_data)


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
    end or the ERROR packet (an ERROR part-way is what a fault may rightly cause); fails the
    test on `timeout` seconds of silence."""
    cut = False

    async def on_bytes(n: int) -> None:
        nonlocal cut
        if not cut and n >= cut_at:
            cut = True
            at_cut()
            await trio.sleep(pause)

    req = packets.encode_request(packets.OP_RRQ, name, "octet", {"blksize": str(blksize)})
    return await fetch_raw(server, req, bind=bind, timeout=timeout, on_bytes=on_bytes,
                           error_after_data=True)



async def receive_rest(c: RawClient, first: packets.Data, timeout: float = 3.0
                       ) -> bytes | packets.Error:
    """ACK `first` (DATA 1, which the test read itself to meddle before going on) and receive
    the rest of the transfer lock-step (blksize 512); returns all its bytes, or the ERROR."""
    assert first.block == 1, first
    c.ack(1)
    if len(first.payload) < 512:
        return first.payload
    return await _lock_step(c, "the transfer under way", timeout, data=first.payload,
                            expected=2)
