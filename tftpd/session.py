"""One read request, from RRQ to its outcome: checks, open, option negotiation.

A session owns one UDP socket, bound to the local address the request arrived on and connected
to the client's (ip, port): the kernel then delivers only the client's packets, and a vanished
client shows up as ``ECONNREFUSED`` instead of a long timeout.

The session does what happens once per transfer: refuse what must be refused (uploads, modes,
paths), have the file opened (tftpd/opener.py; a file that fits in one read-ahead chunk comes
back read whole -- most boot requests are small configs) and negotiate options
(tftpd/options.py).  Everything after that -- the OACK, the DATA blocks, their ACKs,
retransmissions -- is one exchange driven by the process's transfer pump (tftpd/pump.py)
through the sans-IO sender (tftpd/sender.py), for every transfer at once.  The session turns
how it ended into a :class:`SessionResult`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import outcome
import trio

from vfsroot.fileio import read_whole

from . import netascii, offload, packets
from .blocks import BlockSource, FileHandle, chunk_size
from .inline_open import InlineOpener
from .opener import OpenerPool, OpenerUnavailable
from .options import Negotiated, TransferPolicy, negotiate
from .packets import (
    ERR_ACCESS_VIOLATION,
    ERR_FILE_NOT_FOUND,
    ERR_ILLEGAL_OPERATION,
    ERR_NOT_DEFINED,
    Request,
)
from .paths import PathRefused, normalise
from .pump import ClientError, Expired, PeerGone, Pump, PumpStopped, TimedOut, Transfer
from .roots import ClientRoots, OpenedFile, OpenRefused
from .sender import Sender

__all__ = [
    "BlockSource", "FileHandle", "Negotiated", "Session", "SessionContext", "SessionResult",
    "TransferPolicy", "chunk_size", "negotiate",
]

log = logging.getLogger(__name__)

IP_MTU = 14  # linux/in.h; not exported by Python 3.11's socket module
IPV6_MTU = 24  # linux/in6.h


def quoted(text: str, limit: int = 40) -> str:
    """Client-chosen text quoted for an ERROR packet or a log line: escaped by ``repr`` (no
    forged log lines) and cut to ``limit`` characters (a name, a mode or an ERROR message may
    be tens of kilobytes, and an answer must not echo a request's bulk back to a spoofed
    source)."""
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


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
    #: The open was answered on the event loop (tftpd/inline_open.py: the file, or that it is
    #: missing), not by the helper.
    opened_inline: bool = False


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
    #: Opens what needs no waiting on the event loop, before the helper is asked
    #: (tftpd/inline_open.py); None: always the helper.
    inline: InlineOpener | None = None
    #: Whether a refusal made before any file is looked at (an upload, a mode, a path) may
    #: send its ERROR now: the server's ERROR rate limit, shared with its listen sockets.
    #: Such a request costs a spoofer one datagram and ends at once (so no per-client limit
    #: bounds it); "file not found" is not limited (firmware probes many names).
    may_refuse: Callable[[], bool] = lambda: True


class Session:
    """One RRQ from (client, port), served from its own socket until done or abandoned.

    :meth:`start` serves it; ``on_end`` gets the :class:`SessionResult` exactly once, however
    it ends (done, refused, failed, shut down).  The common request runs without a task of its
    own: its file is opened right here where nothing in the open can wait (a cached name on a
    local filesystem, :class:`InlineOpener`), else by the helper process with a callback
    (:meth:`OpenerPool.submit`); the open starts the transfer (OACK and DATA) in the pump
    (:meth:`Pump.start`), whose end is another callback.  For a small config file the two
    task switches a session task made at each of those waits were a large share of the whole
    request.  What has to wait in between -- the netascii size of a large file, an open while
    the helper cannot take it -- continues in a task in the server's session nursery.
    """

    def __init__(
        self,
        ctx: SessionContext,
        request: Request,
        client: str,
        port: int,
        local: str,
        sock: socket.socket,
        on_end: Callable[[SessionResult], object] = lambda _result: None,
    ) -> None:
        self._ctx = ctx
        self._policy = ctx.policy
        self._request = request
        self._sock = sock
        self._local = local
        self._on_end = on_end
        self.result = SessionResult(client=client, port=port, filename=request.filename)
        self._started = time.monotonic()
        #: When the transfer's time limit runs out, in ``time.perf_counter()`` (the pump's
        #: clock; a task converts it to trio's).
        self._expires = time.perf_counter() + self._policy.max_transfer_seconds
        self._handle: FileHandle | None = None
        self._opened: OpenedFile | None = None
        self._whole: bytes | None = None
        self._source: BlockSource | None = None
        self._transfer: Transfer | None = None
        #: The helper's request id while a task-less open is out, and what it asked for.
        self._pending: int | None = None
        self._wanted: tuple[str, int] = ("", 0)
        #: A task serves the rest of the request (it ends the session itself).
        self._in_task = False
        self._ended = False

    @property
    def _final_sent(self) -> bool:
        return self._transfer is not None and self._transfer.sender.final_sent

    def send_error_nowait(self, code: int, message: str) -> None:
        """Best effort ERROR to the client (also used from cancelled/shutdown paths)."""
        with contextlib.suppress(OSError):
            self._sock.send(packets.encode_error(code, message))

    # -- start and end ----------------------------------------------------------------------------

    def start(self) -> None:
        """Serve the request (see the class): refusals, and the open when it needs no
        waiting, right here; else the open's request here and the rest when its reply comes."""
        try:
            relpath = self._check()
            if relpath is None:
                self._end(None)
                return
            small = self._small()
            inline = self._ctx.inline
            try:
                opened = inline.open(self.result.client, relpath, small) if inline else None
            except OpenRefused as exc:  # a name the kernel knows is missing
                self.result.opened_inline = True
                self._refuse_open(exc)
                self._end(None)
                return
            if opened is not None:
                self.result.opened_inline = True
                self._serve(*opened)
                return
            self._wanted = (relpath, small)
            opener = self._ctx.opener
            ident = (opener.submit(self.result.client, relpath, small, self._reply)
                     if opener is not None else None)
        except Exception as exc:
            self._end(exc)
            return
        if ident is None:  # no helper, or no free --read-threads token: wait in a task
            self._spawn(self._open_and_serve, relpath, small)
        else:
            self._pending = ident

    def abort(self) -> None:
        """The server is stopping and its grace is over: end a session that no task serves
        (a task-served one ends when its task is cancelled)."""
        if not self._in_task:
            self._shut_down()

    def _shut_down(self) -> None:
        if self._ended:
            return
        self.result.outcome = "shutdown"
        self.send_error_nowait(ERR_NOT_DEFINED, "server shutting down")
        self._end(None)

    def _end(self, exc: BaseException | None) -> None:
        """The session is over (``exc``: why, if it failed): count, close, report -- once."""
        if self._ended:
            return
        self._ended = True
        res = self.result
        if exc is not None:
            self._record(exc)
        if self._pending is not None and self._ctx.opener is not None:
            self._ctx.opener.forget(self._pending)
            self._pending = None
        t = self._transfer
        if t is not None:
            if not t.finished:
                self._ctx.pump.cancel(t)
            c = t.sender.counters
            res.blocks += c.blocks
            res.retransmits += c.retransmits
            res.duplicate_acks += c.duplicate_acks
            res.ignored_acks += c.ignored_acks + t.ignored
            res.bytes_sent += t.bytes_sent
        res.seconds = time.monotonic() - self._started
        if self._source is not None:
            self._source.close()  # a read still in flight is not needed
        if self._handle is not None:
            self._handle.close()
        self._sock.close()
        self._on_end(res)

    def _record(self, exc: BaseException) -> None:
        """Turn what ended the session into its outcome (and the ERROR the client gets)."""
        res = self.result
        if isinstance(exc, PeerGone):
            res.outcome = "ok-unconfirmed" if self._final_sent else "client-gone"
            res.detail = str(exc)
        elif isinstance(exc, ClientError):
            res.outcome = "aborted-by-client"
            res.detail = f"code={exc.code} message={quoted(exc.message, 200)}"
        elif isinstance(exc, TimedOut):
            res.outcome = "timeout"
            self.send_error_nowait(ERR_NOT_DEFINED, "transfer timed out")
        elif isinstance(exc, Expired):
            res.outcome = "timeout"
            res.detail = f"transfer exceeded {self._policy.max_transfer_seconds:g} s"
            self.send_error_nowait(ERR_NOT_DEFINED, "transfer took too long")
        elif isinstance(exc, PumpStopped):
            res.outcome = "shutdown"
            self.send_error_nowait(ERR_NOT_DEFINED, "server shutting down")
        elif isinstance(exc, OSError):  # the file: EIO from a disk behind the FUSE tree, ...
            res.outcome = "read-error"
            res.detail = f"{exc.strerror or exc}"
            self.send_error_nowait(ERR_NOT_DEFINED, f"cannot read file: {exc.strerror or exc}")
        else:  # a bug must end this transfer only
            res.outcome = "error"
            res.detail = f"{type(exc).__name__}: {exc}"
            log.error("transfer failed client=%s file=%r", res.client, res.filename,
                      exc_info=exc)
            self.send_error_nowait(ERR_NOT_DEFINED, "internal server error")

    # -- the task, where one is needed ----------------------------------------------------------

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        spawn = self._ctx.spawn
        self._in_task = True
        if spawn is None:
            self._end(RuntimeError("no nursery to run the session task in"))
            return
        try:
            spawn(self._task, fn, *args)
        except RuntimeError:  # the session nursery is closed: the server is stopping
            self._shut_down()

    async def _task(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run ``fn(*args)`` under the transfer's time limit; end the session however it ends.
        Never raises except trio.Cancelled."""
        error: BaseException | None = None
        try:
            # trio.fail_after without its generator-based context manager (per request).
            deadline = trio.current_time() + (self._expires - time.perf_counter())
            with trio.CancelScope(deadline=deadline) as scope:
                await fn(*args)
            if scope.cancelled_caught:
                error = Expired()
        except trio.Cancelled:
            self._shut_down()
            raise
        except Exception as exc:
            error = exc
        self._end(error)

    async def _open_and_serve(self, relpath: str, small: int) -> None:
        try:
            opened, whole = await self._open(relpath, small)
        except OpenRefused as exc:
            self._refuse_open(exc)
            return
        self._adopt(opened, whole)
        await self._serve_opened()

    async def _serve_opened(self) -> None:
        """Everything after the open, when the size takes a read (netascii, ``tsize``, a
        file not read whole) or the open itself ran in this task."""
        size = self._size()
        if size is None:
            assert self._handle is not None
            size = await offload.run_sync(
                functools.partial(netascii.encoded_size, self._handle.pread_exact),
                self._ctx.limiter)
        await self._ctx.pump.transfer(self._launch(*self._negotiate(size)))

    # -- the steps ------------------------------------------------------------------------------

    def _refuse(self, code: int, message: str, outcome: str, *, limited: bool = False) -> None:
        """Refuse the request with ERROR ``code``; ``limited``: only if the server's ERROR
        rate allows (else the refusal is logged and counted, without its ERROR)."""
        self.result.outcome = outcome
        self.result.detail = message
        if limited and not self._ctx.may_refuse():
            self.result.detail += " (no ERROR sent: the server's ERROR rate limit)"
            return
        self.send_error_nowait(code, message)

    def _refuse_open(self, exc: OpenRefused) -> None:
        outcome = "not-found" if exc.code == ERR_FILE_NOT_FOUND else "refused-file"
        self._refuse(exc.code, str(exc), outcome)

    def _check(self) -> str | None:
        """The request's path, normalised, or None when the request is refused (the client
        has its ERROR)."""
        req = self._request
        if not req.is_read:
            self._refuse(
                ERR_ACCESS_VIOLATION,
                "uploads are not supported: this TFTP server is read-only",
                "refused-write", limited=True,
            )
            return None
        if req.mode not in ("octet", "netascii"):
            self._refuse(
                ERR_ILLEGAL_OPERATION,
                f"transfer mode {quoted(req.mode)} is not supported (use octet or netascii)",
                "refused-mode", limited=True,
            )
            return None
        try:
            return normalise(req.filename)
        except PathRefused as exc:
            self._refuse(ERR_ACCESS_VIOLATION, str(exc), "refused-path", limited=True)
            return None

    def _small(self) -> int:
        """Files up to this size are read with their open: one read-ahead chunk (blksize
        does not depend on the file, so the read size is known before the open)."""
        req = self._request
        blksize = negotiate(req.options, self._policy, tsize=0,
                            blksize_cap=self._mtu_cap()).blksize if req.options else (
                                packets.BLKSIZE_DEFAULT)
        return chunk_size(self._policy.read_ahead, blksize)

    def _reply(self, result: outcome.Outcome[tuple[OpenedFile, bytes | None]]) -> None:
        """The helper's answer to a task-less open (called on the event loop)."""
        self._pending = None
        if self._ended:  # shut down meanwhile: leak nothing
            if isinstance(result, outcome.Value) and result.value[0].fd >= 0:
                os.close(result.value[0].fd)
            return
        try:
            opened, whole = result.unwrap()
        except OpenerUnavailable:  # helpers stopped running: open in a worker thread
            self._spawn(self._open_and_serve, *self._wanted)
            return
        except OpenRefused as exc:
            self._refuse_open(exc)
            self._end(None)
            return
        except Exception as exc:
            self._end(exc)
            return
        self._serve(opened, whole)

    def _serve(self, opened: OpenedFile, whole: bytes | None) -> None:
        """Serve the opened file: the transfer starts in the pump now, or in a task when its
        size takes reading the file."""
        try:
            self._adopt(opened, whole)
            size = self._size()
            if size is None:  # the size takes a read: a task goes on from here
                self._spawn(self._serve_opened)
                return
            self._ctx.pump.start(self._launch(*self._negotiate(size)), self._transfer_ended)
        except Exception as exc:
            self._end(exc)

    def _transfer_ended(self, t: Transfer) -> None:
        error, t.error = t.error, None  # (see Pump.transfer: no cycle through the traceback)
        self._end(error)

    def _adopt(self, opened: OpenedFile, whole: bytes | None) -> None:
        """Own the opened file from here: :meth:`_end` closes it however the session ends."""
        self._opened, self._whole = opened, whole
        if whole is None:
            self._handle = FileHandle(opened.fd, expect=(opened.size, opened.mtime_ns))

    def _size(self) -> int | None:
        """The transfer size (``tsize``), or None when it takes reading a large file (the
        netascii size of a file not read whole)."""
        assert self._opened is not None
        req = self._request
        if req.mode == "netascii" and "tsize" in req.options:
            if self._handle is None:
                return netascii.encoded_len(self._whole or b"")
            return None
        return self._opened.size

    def _negotiate(self, size: int) -> tuple[Negotiated, float]:
        """The options we accept, and the retransmission interval: the client's ``timeout``
        option is the interval it expects from us."""
        neg = negotiate(self._request.options, self._policy, tsize=size,
                        blksize_cap=self._mtu_cap())
        self.result.options = dict(neg.oack)
        rto = neg.timeout if "timeout" in neg.oack else self._policy.retransmit_timeout
        return neg, rto

    def _launch(self, neg: Negotiated, rto: float) -> Transfer:
        """The transfer's source, sender and pump record (not started yet)."""
        source = BlockSource(
            self._handle, neg.blksize, self._policy.read_ahead, self._ctx.limiter,
            netascii=self._request.mode == "netascii",
            whole_file=self._whole,
            windowsize=neg.windowsize,
        )
        self._source = source
        if self._ctx.spawn is not None:
            source.start_prefetch(self._ctx.spawn)
        # With options, the OACK is the sender's block 0: sent, retransmitted and answered
        # (ACK 0, or the ERROR that ends a tsize probe) by the pump like any block.
        sender = Sender(neg.windowsize, rto, self._policy.retries,
                        holdoff_min=self._policy.resend_holdoff_min, oack=bool(neg.oack))
        t = self._ctx.pump.add(self._sock, sender, source, neg.blksize, gso=self._policy.gso)
        t.expires = self._expires
        if neg.oack:
            t.oack = packets.encode_oack(neg.oack)
        self._transfer = t
        return t

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
