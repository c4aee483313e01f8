"""One read request, from RRQ to its outcome: checks, open, option negotiation, OACK.

A session owns one UDP socket, bound to the local address the request arrived on and connected
to the client's (ip, port): the kernel then delivers only the client's packets, and a vanished
client shows up as ``ECONNREFUSED`` instead of a long timeout.

The session does what happens once per transfer, in its own trio task: refuse what must be
refused (uploads, modes, paths), open the file in a worker thread (a file that fits in one
read-ahead chunk is read in the same thread call -- most boot requests are small configs),
negotiate options (tftpd/options.py) and exchange OACK / ACK 0.  The DATA phase, where the
packets are, is handed to the process's transfer pump (tftpd/pump.py) which drives the sans-IO
sender (tftpd/sender.py) for every transfer at once; the session task just waits for the
outcome and turns it into a :class:`SessionResult`.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from vfsroot.fileio import read_whole

from . import netascii, offload, packets
from .blocks import BlockSource, FileHandle, chunk_size
from .opener import OpenerPool, OpenerUnavailable
from .options import Negotiated, TransferPolicy, negotiate
from .packets import (
    ERR_ACCESS_VIOLATION,
    ERR_FILE_NOT_FOUND,
    ERR_ILLEGAL_OPERATION,
    ERR_NOT_DEFINED,
    MalformedPacket,
    Request,
)
from .paths import PathRefused, normalise
from .pump import ClientError, PeerGone, Pump, TimedOut
from .roots import ClientRoots, OpenedFile, OpenRefused
from .sender import Sender

__all__ = [
    "BlockSource", "FileHandle", "Negotiated", "Session", "SessionContext", "SessionResult",
    "TransferPolicy", "chunk_size", "negotiate",
]

log = logging.getLogger(__name__)

#: The client a log line is about; set in each session task (trio copies the context per task).
current_client: contextvars.ContextVar[str] = contextvars.ContextVar(
    "tftpd_client", default="-"
)

IP_MTU = 14  # linux/in.h; not exported by Python 3.11's socket module
IPV6_MTU = 24  # linux/in6.h

#: The OACK phase receives ACK 0 or an ERROR; anything longer is truncated, harmlessly.
_RECV_SIZE = 2048


@dataclass
class SessionResult:
    """What one transfer did; feeds the per-transfer log line and the server counters."""

    client: str
    port: int
    filename: str
    outcome: str = "ok"
    detail: str = ""
    bytes_sent: int = 0
    blocks: int = 0
    retransmits: int = 0
    duplicate_acks: int = 0
    ignored_acks: int = 0
    seconds: float = 0.0
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class SessionContext:
    """What a session needs from its server; one instance shared by all sessions."""

    roots: ClientRoots
    policy: TransferPolicy
    limiter: trio.CapacityLimiter
    #: The process's DATA-phase pump (its ``run`` task lives in the server's nursery).
    pump: Pump
    #: Number of transfers running now (for decisions that depend on load).
    active: Callable[[], int] = lambda: 1
    #: Starts a background task (read-ahead) in the server's nursery; None: no read-ahead task.
    spawn: Callable[..., object] | None = None
    #: Opens request files in a helper process; None: in worker threads.
    opener: OpenerPool | None = None


class Session:
    """One RRQ from (client, port), served from its own socket until done or abandoned."""

    def __init__(
        self,
        ctx: SessionContext,
        request: Request,
        client: str,
        port: int,
        local: str,
        sock: socket.socket,
    ) -> None:
        self._ctx = ctx
        self._policy = ctx.policy
        self._request = request
        self._sock = sock
        self._local = local
        self.result = SessionResult(client=client, port=port, filename=request.filename)
        self._handle: FileHandle | None = None
        self._source: BlockSource | None = None
        self._sender: Sender | None = None

    @property
    def _final_sent(self) -> bool:
        return self._sender is not None and self._sender.final_sent

    def _collect(self, sender: Sender) -> None:
        c = sender.counters
        res = self.result
        res.blocks += c.blocks
        res.retransmits += c.retransmits
        res.duplicate_acks += c.duplicate_acks
        res.ignored_acks += c.ignored_acks

    # -- socket helpers for the OACK phase (one round trip: trio per packet is fine) ----------

    def _send_now(self, packet: bytes) -> bool:
        try:
            self._sock.send(packet)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return True  # dropped locally: retransmission recovers, like a lost packet
            raise PeerGone(os.strerror(exc.errno or 0)) from None
        return True

    async def _send(self, packet: bytes) -> None:
        while not self._send_now(packet):
            await trio.lowlevel.wait_writable(self._sock)

    async def _recv(self, deadline: float) -> bytes | None:
        """Next datagram from the client, or None when ``deadline`` passes."""
        sock = self._sock
        while True:
            try:
                return sock.recv(_RECV_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise PeerGone(os.strerror(exc.errno or 0)) from None
            if trio.current_time() >= deadline:
                return None
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(sock)

    def send_error_nowait(self, code: int, message: str) -> None:
        """Best effort ERROR to the client (also used from cancelled/shutdown paths)."""
        with contextlib.suppress(OSError):
            self._sock.send(packets.encode_error(code, message))

    # -- the transfer ---------------------------------------------------------------------------

    async def run(self) -> SessionResult:
        """Serve the request; never raises except trio.Cancelled (the result says what happened)."""
        res = self.result
        current_client.set(res.client)
        started = time.monotonic()
        try:
            # trio.fail_after without its generator-based context manager (per request).
            with trio.CancelScope(
                    deadline=trio.current_time() + self._policy.max_transfer_seconds) as scope:
                await self._prepare_and_send()
            if scope.cancelled_caught:
                raise trio.TooSlowError
        except PeerGone as exc:
            res.outcome = "ok-unconfirmed" if self._final_sent else "client-gone"
            res.detail = str(exc)
        except ClientError as exc:
            res.outcome = "aborted-by-client"
            res.detail = f"code={exc.code} message={exc.message!r}"
        except TimedOut:
            res.outcome = "timeout"
            self.send_error_nowait(ERR_NOT_DEFINED, "transfer timed out")
        except trio.TooSlowError:
            res.outcome = "timeout"
            res.detail = f"transfer exceeded {self._policy.max_transfer_seconds:g} s"
            self.send_error_nowait(ERR_NOT_DEFINED, "transfer took too long")
        except trio.Cancelled:
            res.outcome = "shutdown"
            self.send_error_nowait(ERR_NOT_DEFINED, "server shutting down")
            raise
        except OSError as exc:  # the file: EIO from a disk behind the FUSE tree, ...
            res.outcome = "read-error"
            res.detail = f"{exc.strerror or exc}"
            self.send_error_nowait(ERR_NOT_DEFINED, f"cannot read file: {exc.strerror or exc}")
        except Exception as exc:  # a bug must end this transfer only
            res.outcome = "error"
            res.detail = f"{type(exc).__name__}: {exc}"
            log.exception("transfer failed client=%s file=%r", res.client, res.filename)
            self.send_error_nowait(ERR_NOT_DEFINED, "internal server error")
        finally:
            res.seconds = time.monotonic() - started
            if self._source is not None:
                self._source.close()  # a read still in flight is not needed
            if self._handle is not None:
                self._handle.close()
            self._sock.close()
        return res

    async def _refuse(self, code: int, message: str, outcome: str) -> None:
        self.result.outcome = outcome
        self.result.detail = message
        self.send_error_nowait(code, message)

    async def _open(self, relpath: str, small: int) -> tuple[OpenedFile, bytes | None]:
        """Open in the helper process (tftpd/opener.py), or where it cannot run in a worker
        thread without leaking the fd if we stop waiting for it.

        A file of at most ``small`` bytes (configs, pxelinux.cfg/*: most requests) is read in
        the same call, saving the second hop that would dominate small requests.
        """
        opener = self._ctx.opener
        if opener is not None and opener.available:
            with contextlib.suppress(OpenerUnavailable):
                return await opener.open(self.result.client, relpath, small)
        lock = threading.Lock()
        state: dict[str, object] = {"abandoned": False}

        def in_thread() -> tuple[OpenedFile, bytes | None]:
            opened = self._ctx.roots.open(self.result.client, relpath)
            data = None
            try:
                if opened.size <= small:
                    data = read_whole(opened.fd, opened.size)
            except BaseException:
                os.close(opened.fd)
                raise
            if data is not None:
                # Read whole: the descriptor has done its job; closed here, in the thread,
                # not on the event loop (and a caller that gave up has nothing to leak).
                os.close(opened.fd)
                return opened, data
            with lock:
                if state["abandoned"]:
                    os.close(opened.fd)
                    raise OpenRefused(ERR_NOT_DEFINED, "abandoned")
            return opened, data

        try:
            return await offload.run_sync(in_thread, self._ctx.limiter)
        except trio.Cancelled:
            with lock:
                state["abandoned"] = True
            raise

    async def _prepare_and_send(self) -> None:
        req = self._request
        if not req.is_read:
            await self._refuse(
                ERR_ACCESS_VIOLATION,
                "uploads are not supported: this TFTP server is read-only",
                "refused-write",
            )
            return
        if req.mode not in ("octet", "netascii"):
            await self._refuse(
                ERR_ILLEGAL_OPERATION,
                f"transfer mode {req.mode!r} is not supported (use octet or netascii)",
                "refused-mode",
            )
            return
        try:
            relpath = normalise(req.filename)
        except PathRefused as exc:
            await self._refuse(ERR_ACCESS_VIOLATION, str(exc), "refused-path")
            return
        # blksize does not depend on the file: the read size is known before the open.
        blksize = negotiate(req.options, self._policy, tsize=0,
                            blksize_cap=self._mtu_cap()).blksize if req.options else (
                                packets.BLKSIZE_DEFAULT)
        try:
            opened, whole = await self._open(
                relpath, chunk_size(self._policy.read_ahead, blksize))
        except OpenRefused as exc:
            outcome = "not-found" if exc.code == ERR_FILE_NOT_FOUND else "refused-file"
            await self._refuse(exc.code, str(exc), outcome)
            return
        handle = None
        if whole is None:
            # Owned by the session from here: run() closes it however the transfer ends.
            self._handle = handle = FileHandle(opened.fd, expect=(opened.size, opened.mtime_ns))
        is_netascii = req.mode == "netascii"
        size = opened.size
        if is_netascii and "tsize" in req.options:
            if handle is None:
                size = netascii.encoded_len(whole or b"")
            else:
                size = await offload.run_sync(
                    functools.partial(netascii.encoded_size, handle.pread_exact),
                    self._ctx.limiter)
        neg = negotiate(req.options, self._policy, tsize=size, blksize_cap=self._mtu_cap())
        self.result.options = dict(neg.oack)
        source = BlockSource(
            handle, neg.blksize, self._policy.read_ahead, self._ctx.limiter,
            netascii=is_netascii,
            whole_file=whole,
            windowsize=neg.windowsize,
        )
        # The client's ``timeout`` option is the retransmission interval it expects from us.
        rto = neg.timeout if "timeout" in neg.oack else self._policy.retransmit_timeout
        if neg.oack:
            await self._send_oack(neg.oack, rto)
        self._source = source
        if self._ctx.spawn is not None:
            source.start_prefetch(self._ctx.spawn)
        sender = Sender(neg.windowsize, rto, self._policy.retries,
                        holdoff_min=self._policy.resend_holdoff_min)
        self._sender = sender
        pump = self._ctx.pump
        transfer = pump.add(self._sock, sender, source, neg.blksize, gso=self._policy.gso)
        try:
            await pump.transfer(transfer)
        finally:
            self._collect(sender)
            self.result.bytes_sent += transfer.bytes_sent
            self.result.ignored_acks += transfer.ignored

    def _mtu_cap(self) -> int | None:
        if not self._policy.mtu_clamp:
            return None
        try:
            if self._sock.family == socket.AF_INET6:
                mtu = self._sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
                return mtu - 40 - 8 - 4
            mtu = self._sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
            return mtu - 20 - 8 - 4
        except OSError:
            return None

    def _check_packet(self, data: bytes) -> None:
        """A non-ACK packet from the client: ERROR ends the session, anything else is ignored."""
        try:
            packet = packets.parse(data)
        except MalformedPacket:
            self.result.ignored_acks += 1
            return
        if isinstance(packet, packets.Error):
            raise ClientError(packet.code, packet.message)
        self.result.ignored_acks += 1

    async def _send_oack(self, oack: dict[str, str], rto: float) -> None:
        """Send the OACK until ACK 0 arrives; an ERROR here is the tsize probe ending."""
        packet = packets.encode_oack(oack)
        for attempt in range(self._policy.retries + 1):
            if attempt:
                self.result.retransmits += 1
            await self._send(packet)
            deadline = trio.current_time() + rto
            while True:
                data = await self._recv(deadline)
                if data is None:
                    break
                block = packets.ack_block(data)
                if block is None:
                    self._check_packet(data)
                elif block == 0:
                    return
                else:
                    self.result.ignored_acks += 1
        raise TimedOut
