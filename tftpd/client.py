"""An async TFTP read client for tests and benchmarks (blksize, tsize, timeout, windowsize).

Real boot clients are C firmware; this client exists so tests can drive the server through
every option and failure (including RFC 7440 windows and block-number rollover, which none of
the Debian command-line clients do fully) and so the benchmark has a windowsize client.  It is
an RFC 7440 receiver: it ACKs the last block of each window, and on a gap it ACKs the last
in-order block once, so the sender restarts from there.

Run ``python -m tftpd.client HOST[:PORT] FILE`` for a one-off fetch (prints size, sha256, MB/s).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import packets

_ACK = packets.encode_ack


class TftpError(Exception):
    """The server answered with an ERROR packet."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code
        self.message = message


class TransferTimeout(Exception):
    """The server stopped answering."""


@dataclass
class FetchResult:
    size: int
    sha256: str
    seconds: float
    options: dict[str, str] = field(default_factory=dict)
    blocks: int = 0
    acks_resent: int = 0
    duplicates: int = 0
    server_port: int = 0

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds > 0 else 0.0


async def _recv(sock: socket.socket, deadline: float) -> tuple[bytes, tuple] | None:
    while True:
        try:
            return sock.recvfrom(packets.MAX_DATAGRAM)
        except BlockingIOError:
            pass
        if trio.current_time() >= deadline:
            return None
        with trio.move_on_at(deadline):
            await trio.lowlevel.wait_readable(sock)


async def fetch(
    server: tuple[str, int],
    filename: str,
    *,
    blksize: int | None = None,
    windowsize: int | None = None,
    tsize: bool = False,
    timeout_option: int | None = None,
    extra_options: dict[str, str] | None = None,
    mode: str = "octet",
    bind: str | None = None,
    retransmit: float = 1.0,
    retries: int = 5,
    dally: float = 0.0,
    sink: Callable[[bytes], object] | None = None,
) -> FetchResult:
    """Read ``filename`` from ``server``; returns size and sha256 of what arrived.

    ``bind`` chooses the client address (tests use 127.0.0.10, .11, ... as distinct machines).
    ``dally`` keeps the socket open after the final ACK to re-ACK a retransmitted last block.
    """
    host, port = server
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    options: dict[str, str] = {}
    if blksize is not None:
        options["blksize"] = str(blksize)
    if tsize:
        options["tsize"] = "0"
    if timeout_option is not None:
        options["timeout"] = str(timeout_option)
    if windowsize is not None:
        options["windowsize"] = str(windowsize)
    options.update(extra_options or {})
    rrq = packets.encode_request(packets.OP_RRQ, filename, mode, options)
    digest = hashlib.sha256()
    size = 0
    bsize, wsize = packets.BLKSIZE_DEFAULT, 1
    result = FetchResult(size=0, sha256="", seconds=0.0)
    started = time.monotonic()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((bind or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
        sock.sendto(rrq, (host, port))
        peer: tuple | None = None
        last_ack: bytes | None = None  # what to re-send on timeout (None: the RRQ)
        expected = 1  # next block in sequence (unbounded; the wire wraps at 65536)
        in_window = 0
        gap_acked = False
        tries = 0
        # The timer runs from the last *progress*, not the last packet: duplicates arriving
        # faster than our timeout must not keep us from re-sending a lost ACK.
        progress_deadline = trio.current_time() + retransmit
        while True:
            got = await _recv(sock, progress_deadline)
            if got is None:
                tries += 1
                if tries > retries:
                    raise TransferTimeout(f"no answer from {host}:{port} for {filename!r}")
                result.acks_resent += 1
                if peer is None:
                    sock.sendto(rrq, (host, port))
                else:
                    sock.send(last_ack or _ACK(0))
                progress_deadline = trio.current_time() + retransmit
                continue
            data, addr = got
            if peer is None:
                if ipaddress.ip_address(addr[0].split("%")[0]) != ipaddress.ip_address(host):
                    continue
                peer = addr
                result.server_port = addr[1]
                sock.connect(addr)
            elif addr[:2] != peer[:2]:
                continue  # another TID: not our transfer
            if len(data) >= 4 and data[1] == packets.OP_DATA and data[0] == 0:
                block = (data[2] << 8) | data[3]
                if block == expected & 0xFFFF:
                    payload = data[4:]
                    digest.update(payload)
                    if sink is not None:
                        sink(payload)
                    size += len(payload)
                    result.blocks += 1
                    expected += 1
                    in_window += 1
                    tries = 0
                    gap_acked = False
                    progress_deadline = trio.current_time() + retransmit
                    last = len(payload) < bsize
                    if last or in_window >= wsize:
                        last_ack = _ACK(block)
                        sock.send(last_ack)
                        in_window = 0
                    if last:
                        break
                else:
                    result.duplicates += 1
                    if not gap_acked:
                        # RFC 7440: tell the sender where we are, once per gap.
                        last_ack = _ACK(expected - 1)
                        sock.send(last_ack)
                        in_window = 0
                        gap_acked = True
                continue
            packet = packets.parse(data)
            if isinstance(packet, packets.Error):
                raise TftpError(packet.code, packet.message)
            if isinstance(packet, packets.OptionAck) and expected == 1:
                unasked = set(packet.options) - set(options)
                if unasked:
                    sock.send(packets.encode_error(packets.ERR_OPTION_NEGOTIATION,
                                                   f"unrequested options {sorted(unasked)}"))
                    raise TftpError(packets.ERR_OPTION_NEGOTIATION,
                                    f"server sent unrequested options {sorted(unasked)}")
                result.options = dict(packet.options)
                bsize = int(packet.options.get("blksize", packets.BLKSIZE_DEFAULT))
                wsize = int(packet.options.get("windowsize", 1))
                last_ack = _ACK(0)
                sock.send(last_ack)
                progress_deadline = trio.current_time() + retransmit
        result.seconds = time.monotonic() - started
        if dally > 0:
            deadline = trio.current_time() + dally
            while (got := await _recv(sock, deadline)) is not None:
                if got[0][:2] == b"\0\3" and last_ack is not None:
                    sock.send(last_ack)
    result.size = size
    result.sha256 = digest.hexdigest()
    return result


def _parse_server(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 69
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 69


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tftpd.client", description=__doc__)
    parser.add_argument("server", help="HOST[:PORT] or [V6]:PORT")
    parser.add_argument("filename")
    parser.add_argument("--blksize", type=int)
    parser.add_argument("--windowsize", type=int)
    parser.add_argument("--tsize", action="store_true")
    parser.add_argument("--bind", help="local address to send from")
    parser.add_argument("--output", "-o", help="write the file here")
    parser.add_argument("--retransmit", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=1, help="fetch this many times in a row")
    args = parser.parse_args(argv)
    out = open(args.output, "wb") if args.output else None  # noqa: SIM115
    try:
        for _ in range(args.count):
            res = trio.run(lambda: fetch(
                _parse_server(args.server), args.filename, blksize=args.blksize,
                windowsize=args.windowsize, tsize=args.tsize, bind=args.bind,
                retransmit=args.retransmit, sink=out.write if out else None))
            print(json.dumps({"size": res.size, "sha256": res.sha256,
                              "seconds": round(res.seconds, 6), "mbps": round(res.mbps, 3),
                              "options": res.options}))
    except (TftpError, TransferTimeout, OSError) as exc:
        print(f"tftp client: {exc}", file=sys.stderr)
        return 1
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
