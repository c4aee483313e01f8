"""One read transfer: option negotiation, lock-step or windowed DATA, retransmission, outcome.

A session owns one UDP socket, bound to the local address the request arrived on and connected
to the client's (ip, port): the kernel then delivers only the client's packets, and a vanished
client shows up as ``ECONNREFUSED`` instead of a long timeout.

Block numbers are tracked as an unbounded sequence number (``seq``, block 1 = first DATA) and
only the wire form wraps: ``seq & 0xFFFF``, so 65535 is followed by 0 (FIELD.md: the rollover
every large kernel/initrd needs), inside a window too.  An ACK is mapped back to the one ``seq``
in ``[base - 1, highest sent]`` with that wire number; anything else is stale or from the future
and ignored, never fatal (the Raspberry Pi firmware ACKs blocks it never got).

Retransmission rules (the part every peer in FIELD.md gets wrong somewhere):

* timeout -> resend the window from the first unacknowledged block, up to ``retries`` times;
* a duplicate ACK of the block before the window (U-Boot re-sends its last ACK when it times
  out) -> resend the window once, unless that window went out less than a hold-off ago: an echo
  that fast is the Sorcerer's Apprentice (a duplicated DATA acknowledged twice), and answering it
  would send every block twice for the rest of the transfer;
* an ACK inside the window (RFC 7440 receiver lost a block) -> restart the window after it, with
  the same hold-off so a client that ACKs every block cannot make us send each block W times.

Reads go through a worker thread in chunks (the FUSE tree can block on a disk), the next chunk
read while the current one is sent; a session holds at most ``windowsize * blksize + 2 *
chunk`` bytes of file data (chunk = max(read_ahead, 32 * blksize)).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from vfsroot.fileio import pread_exact

from . import packets
from .packets import (
    BLKSIZE_DEFAULT,
    BLKSIZE_MAX,
    BLKSIZE_MIN,
    ERR_ACCESS_VIOLATION,
    ERR_FILE_NOT_FOUND,
    ERR_ILLEGAL_OPERATION,
    ERR_NOT_DEFINED,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    WINDOWSIZE_MAX,
    WINDOWSIZE_MIN,
    MalformedPacket,
    Request,
)
from .paths import PathRefused, normalise
from .roots import ClientRoots, OpenedFile, OpenRefused

log = logging.getLogger(__name__)

#: The client a log line is about; set in each session task (trio copies the context per task).
current_client: contextvars.ContextVar[str] = contextvars.ContextVar(
    "tftpd_client", default="-"
)

IP_MTU = 14  # linux/in.h; not exported by Python 3.11's socket module
IPV6_MTU = 24  # linux/in6.h

#: A sender only ever receives ACKs (4 bytes) and ERRORs; a small buffer saves allocating
#: 64 KiB per packet.  Anything longer is truncated, which is harmless for both.
_RECV_SIZE = 2048

#: A task that only ever finds data ready would never yield; yield after this many packets.
_CHECKPOINT_EVERY = 32


@dataclass(frozen=True)
class TransferPolicy:
    """Operator limits and timing for every transfer (immutable, shared by all sessions)."""

    #: Largest block size granted; 1468 fills a 1500-byte Ethernet frame over IPv4.
    blksize_max: int = 1468
    #: Largest window granted (RFC 7440 allows 65535; some clients break above 64).
    windowsize_max: int = 64
    #: Clamp blksize to the route MTU of the session socket (IP_MTU) as well.
    mtu_clamp: bool = False
    #: Seconds before a retransmission when the client did not ask for the ``timeout`` option.
    retransmit_timeout: float = 1.0
    #: Retransmissions of the same window before the transfer is given up.
    retries: int = 5
    #: Bytes read from the file per worker-thread call (per session, on top of the window);
    #: at least 32 blocks, so big blocks do not pay a thread hop every few packets.
    read_ahead: int = 256 * 1024
    #: Upper bound on a whole transfer, seconds (a trickling client cannot hold a slot forever).
    max_transfer_seconds: float = 3600.0
    #: Minimum gap before a duplicate or mid-window ACK may trigger a resend, seconds.
    resend_holdoff_min: float = 0.002
    #: Busy-wait this long for an ACK before sleeping in the event loop (0 disables)...
    spin_seconds: float = 0.0
    #: ... but only while at most this many transfers are running.
    spin_max_sessions: int = 1


@dataclass(frozen=True)
class Negotiated:
    """Effective transfer parameters and the OACK to send (empty: no OACK, plain RFC 1350)."""

    blksize: int = BLKSIZE_DEFAULT
    windowsize: int = 1
    timeout: float = 1.0
    oack: dict[str, str] = field(default_factory=dict)


def _int_option(value: str) -> int | None:
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 10:
        return None
    return int(value)


def negotiate(
    options: dict[str, str],
    policy: TransferPolicy,
    *,
    tsize: int,
    blksize_cap: int | None = None,
) -> Negotiated:
    """Decide blksize/windowsize/timeout/tsize from the request (RFC 2347/2348/2349/7440).

    Only options the client asked for appear in the OACK, in the client's order (UEFI rejects an
    OACK with anything it did not ask).  Unknown options and values we cannot parse or that are
    below the RFC minimum are ignored, not answered: the client then gets the RFC 1350 default,
    which every client handles.  Values above the operator cap are lowered, which RFC 2348 and
    7440 allow the server to do.
    """
    blksize, windowsize, timeout = BLKSIZE_DEFAULT, 1, policy.retransmit_timeout
    cap = min(policy.blksize_max, BLKSIZE_MAX)
    if blksize_cap is not None:
        cap = max(BLKSIZE_MIN, min(cap, blksize_cap))
    oack: dict[str, str] = {}
    for name, raw in options.items():
        value = _int_option(raw)
        if name == "blksize":
            if value is None or value < BLKSIZE_MIN:
                continue
            blksize = min(value, cap)
            oack[name] = str(blksize)
        elif name == "windowsize":
            if value is None or value < WINDOWSIZE_MIN:
                continue
            windowsize = min(value, policy.windowsize_max, WINDOWSIZE_MAX)
            oack[name] = str(windowsize)
        elif name == "timeout":
            if value is None or not TIMEOUT_MIN <= value <= TIMEOUT_MAX:
                continue
            timeout = float(value)
            oack[name] = str(value)
        elif name == "tsize":
            # RFC 2349: the client sends 0 in an RRQ; any number is accepted as "tell me".
            if value is None:
                continue
            oack[name] = str(tsize)
    return Negotiated(blksize=blksize, windowsize=windowsize, timeout=timeout, oack=oack)


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


class _PeerGone(Exception):
    """The client's port answered with ICMP unreachable: it closed or aborted."""


class _ClientError(Exception):
    """The client sent an ERROR packet (normal after a tsize probe)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"code={code} message={message!r}")
        self.code = code
        self.message = message


class _TimedOut(Exception):
    pass


class FileHandle:
    """A descriptor that worker threads read while the event loop may want to close it.

    A read on the FUSE tree can hang on a disk; the session then gives up waiting (the thread is
    abandoned on cancellation) and closes the handle.  Closing while a thread is inside
    ``pread`` would let the fd number be reused under it, so the close is deferred to the last
    reader.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False

    def pread_exact(self, size: int, offset: int) -> bytes:
        """Read ``size`` bytes at ``offset`` unless end of file comes first (FUSE and network
        filesystems return short reads mid-file, so one ``pread`` is not enough)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "file handle closed")
            self._busy += 1
        try:
            return pread_exact(self._fd, size, offset)
        finally:
            with self._lock:
                self._busy -= 1
                if self._closed and self._busy == 0:
                    os.close(self._fd)

    @staticmethod
    def read_all(fd: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from offset 0 of a descriptor nobody else uses yet."""
        return pread_exact(fd, limit, 0)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._busy == 0:
                os.close(self._fd)


def _netascii(data: bytes) -> bytes:
    """RFC 764 NVT encoding: CR -> CR NUL first, then LF -> CR LF.  Stateless per byte, so it
    can be applied chunk by chunk."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def chunk_size(read_ahead: int, blksize: int) -> int:
    """Bytes per worker-thread read: the operator's read-ahead, but at least 32 blocks."""
    return max(read_ahead, 32 * blksize)


class BlockSource:
    """The file as a sequence of blocks, read ahead in chunks by worker threads.

    Blocks are requested in increasing order except for retransmissions, which never go below
    ``keep_from`` (the first unacknowledged block): only ``[keep_from, read end)`` is kept.
    """

    def __init__(
        self,
        handle: FileHandle,
        blksize: int,
        read_ahead: int,
        limiter: trio.CapacityLimiter,
        *,
        netascii: bool = False,
        whole_file: bytes | None = None,
    ) -> None:
        self._handle = handle
        self._blksize = blksize
        self._chunk = chunk_size(read_ahead, blksize)
        self._limiter = limiter
        self._netascii = netascii
        self._buf = b""
        self._buf_off = 0  # stream offset of self._buf[0]
        self._raw_off = 0  # next file offset to read
        self._eof = False
        self._keep_off = 0
        self._spawn: Callable[..., object] | None = None
        self._scope: trio.CancelScope | None = None
        self._pending: trio.Event | None = None
        self._next: bytes | None = None
        self._next_error: Exception | None = None
        if whole_file is not None:  # read together with the open (small files)
            self._buf = _netascii(whole_file) if netascii else whole_file
            self._raw_off = len(whole_file)
            self._eof = True

    def release_before(self, seq: int) -> None:
        """Blocks before ``seq`` are acknowledged and will not be asked again."""
        self._keep_off = (seq - 1) * self._blksize

    def peek(self, seq: int) -> bytes | None:
        """Block ``seq`` if it is already read (the hot path: no coroutine), else None."""
        start = (seq - 1) * self._blksize
        i = start - self._buf_off
        if i < 0:
            return None
        end = i + self._blksize
        if end <= len(self._buf) or self._eof:
            return self._buf[i:end]
        return None

    async def block(self, seq: int) -> bytes:
        """Payload of block ``seq`` (1-based); shorter than blksize only for the last block."""
        start = (seq - 1) * self._blksize
        end = start + self._blksize
        while self._buf_off + len(self._buf) < end and not self._eof:
            await self._fill(end)
        i = start - self._buf_off
        if i < 0:
            raise RuntimeError(f"block {seq} was released before it was acknowledged")
        return self._buf[i : i + self._blksize]

    def start_prefetch(self, spawn: Callable[..., object]) -> None:
        """Read the next chunk in the background from now on (double buffering): a thread hop
        costs a millisecond on a busy machine, which is 32 packets of 8 KiB that would otherwise
        wait for it.  Memory: one more chunk per session.

        ``spawn`` starts a task elsewhere (the server's session nursery), so an exception in
        the session never gets wrapped in an exception group by a nursery of its own.
        """
        self._spawn = spawn
        self._prefetch()

    def close(self) -> None:
        """Stop a read-ahead still in flight (the transfer is over)."""
        self._spawn = None
        if self._scope is not None:
            self._scope.cancel()

    def _prefetch(self) -> None:
        if self._spawn is None or self._eof or self._pending is not None:
            return
        done = trio.Event()
        self._pending = done
        self._scope = trio.CancelScope()
        self._spawn(self._read_ahead, self._raw_off, done, self._scope)

    async def _read_ahead(self, offset: int, done: trio.Event, scope: trio.CancelScope) -> None:
        with scope:
            try:
                self._next = await trio.to_thread.run_sync(
                    self._handle.pread_exact, self._chunk, offset,
                    limiter=self._limiter, abandon_on_cancel=True,
                )
            except Exception as exc:  # must not reach the server's nursery
                self._next_error = exc  # raised when the data is needed, by the session
            finally:
                done.set()

    async def _fill(self, end: int) -> None:
        if self._spawn is not None:
            self._prefetch()
            assert self._pending is not None
            await self._pending.wait()
            self._pending = None
            if self._next_error is not None:
                raise self._next_error
            data, want, self._next = self._next or b"", self._chunk, None
        else:
            want = max(self._chunk, end - (self._buf_off + len(self._buf)))
            data = await trio.to_thread.run_sync(
                self._handle.pread_exact, want, self._raw_off,
                limiter=self._limiter, abandon_on_cancel=True,
            )
        self._raw_off += len(data)
        if len(data) < want:
            self._eof = True
        self._prefetch()
        if self._netascii:
            data = _netascii(data)
        drop = max(0, min(self._keep_off, self._buf_off + len(self._buf)) - self._buf_off)
        self._buf = self._buf[drop:] + data if drop or self._buf else data
        self._buf_off += drop


def _netascii_size(handle: FileHandle, chunk: int = 1 << 20) -> int:
    """Size of the file after netascii conversion (the tsize a netascii client must see)."""
    size = offset = 0
    while True:
        data = handle.pread_exact(chunk, offset)
        size += len(data) + data.count(b"\n") + data.count(b"\r")
        offset += len(data)
        if len(data) < chunk:
            return size


@dataclass
class SessionContext:
    """What a session needs from its server; one instance shared by all sessions."""

    roots: ClientRoots
    policy: TransferPolicy
    limiter: trio.CapacityLimiter
    #: Number of transfers running now (for decisions that depend on load).
    active: Callable[[], int] = lambda: 1
    #: Starts a background task (read-ahead) in the server's nursery; None: no read-ahead task.
    spawn: Callable[..., object] | None = None


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
        self._since_checkpoint = 0
        self._srtt: float | None = None
        self._final_sent = False
        self._handle: FileHandle | None = None
        self._source: BlockSource | None = None

    # -- socket helpers (raw non-blocking socket + trio readiness: the hot path) --------------

    def _send_now(self, packet: bytes) -> bool:
        try:
            self._sock.send(packet)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return True  # dropped locally: retransmission recovers, like a lost packet
            raise _PeerGone(os.strerror(exc.errno or 0)) from None
        return True

    async def _send(self, packet: bytes) -> None:
        while not self._send_now(packet):
            await trio.lowlevel.wait_writable(self._sock)

    def _try_recv(self) -> bytes | None:
        """A datagram if one is queued, else None (never waits)."""
        try:
            return self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _PeerGone(os.strerror(exc.errno or 0)) from None

    def _spin_seconds(self) -> float:
        """How long to busy-wait for an ACK before sleeping: only while the machine has a CPU
        to spare for it (fewer transfers than the policy allows), never under load."""
        if self._policy.spin_seconds <= 0 or self._ctx.active() > self._policy.spin_max_sessions:
            return 0.0
        return self._policy.spin_seconds

    async def _recv(self, deadline: float, *, tried: bool = False) -> bytes | None:
        """Next datagram from the client, or None when ``deadline`` passes.  ``tried``: the
        caller has just found the socket empty, so wait before the first ``recv``."""
        sock = self._sock
        while True:
            if not tried:
                try:
                    data = sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _PeerGone(os.strerror(exc.errno or 0)) from None
                else:
                    self._since_checkpoint += 1
                    if self._since_checkpoint >= _CHECKPOINT_EVERY:
                        self._since_checkpoint = 0
                        await trio.lowlevel.checkpoint()
                    return data
                if trio.current_time() >= deadline:
                    return None
            tried = False
            self._since_checkpoint = 0
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
            with trio.fail_after(self._policy.max_transfer_seconds):
                await self._prepare_and_send()
        except _PeerGone as exc:
            res.outcome = "ok-unconfirmed" if self._final_sent else "client-gone"
            res.detail = str(exc)
        except _ClientError as exc:
            res.outcome = "aborted-by-client"
            res.detail = f"code={exc.code} message={exc.message!r}"
        except _TimedOut:
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
        """Open in a worker thread without leaking the fd if we stop waiting for it.

        A file of at most ``small`` bytes (configs, pxelinux.cfg/*: most requests) is read in
        the same thread call, saving the second thread hop that dominates small requests.
        """
        lock = threading.Lock()
        state: dict[str, object] = {"abandoned": False}

        def opener() -> tuple[OpenedFile, bytes | None]:
            opened = self._ctx.roots.open(self.result.client, relpath)
            data = None
            try:
                if opened.size <= small:
                    data = FileHandle.read_all(opened.fd, small + 1)
                    if len(data) > small:  # grew since fstat: read it the normal way
                        data = None
            except BaseException:
                os.close(opened.fd)
                raise
            with lock:
                if state["abandoned"]:
                    os.close(opened.fd)
                    raise OpenRefused(ERR_NOT_DEFINED, "abandoned")
            return opened, data

        try:
            return await trio.to_thread.run_sync(
                opener, limiter=self._ctx.limiter, abandon_on_cancel=True
            )
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
                            blksize_cap=self._mtu_cap()).blksize
        try:
            opened, whole = await self._open(
                relpath, chunk_size(self._policy.read_ahead, blksize))
        except OpenRefused as exc:
            outcome = "not-found" if exc.code == ERR_FILE_NOT_FOUND else "refused-file"
            await self._refuse(exc.code, str(exc), outcome)
            return
        # Owned by the session from here: run() closes it however the transfer ends.
        self._handle = handle = FileHandle(opened.fd)
        netascii = req.mode == "netascii"
        size = opened.size
        if netascii and "tsize" in req.options:
            size = await trio.to_thread.run_sync(
                _netascii_size, handle, limiter=self._ctx.limiter, abandon_on_cancel=True
            )
        neg = negotiate(req.options, self._policy, tsize=size, blksize_cap=self._mtu_cap())
        self.result.options = dict(neg.oack)
        source = BlockSource(
            handle, neg.blksize, self._policy.read_ahead, self._ctx.limiter, netascii=netascii,
            whole_file=whole,
        )
        # The client's ``timeout`` option is the retransmission interval it expects from us.
        rto = neg.timeout if "timeout" in neg.oack else self._policy.retransmit_timeout
        if neg.oack:
            await self._send_oack(neg.oack, rto)
        self._source = source
        if self._ctx.spawn is not None:
            source.start_prefetch(self._ctx.spawn)
        await self._send_blocks(source, neg.blksize, neg.windowsize, rto)

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
            raise _ClientError(packet.code, packet.message)
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
        raise _TimedOut

    def _holdoff(self) -> float:
        srtt = self._srtt if self._srtt is not None else 0.0
        return max(self._policy.resend_holdoff_min, 2.0 * srtt)

    async def _send_blocks(
        self, source: BlockSource, blksize: int, windowsize: int, rto: float
    ) -> None:
        """The DATA phase: windows of ``windowsize`` blocks (1 = RFC 1350 lock-step).

        This loop runs once per block at up to ~100k blocks/s, so it avoids what costs in
        Python: one clock read per burst (``perf_counter``, trio's clock only for deadlines),
        no coroutine for blocks already read, a non-blocking ``recv`` before any wait (on
        loopback and LANs the ACK is often there already), a trio checkpoint only every
        ``_CHECKPOINT_EVERY`` packets that needed no wait.
        """
        res = self.result
        header = packets.data_header
        send_now = self._send_now
        try_recv = self._try_recv
        peek = source.peek
        clock = time.perf_counter
        spin = self._spin_seconds()
        base = 1  # first unacknowledged block
        sent_upto = 0  # highest block sent so far
        final: int | None = None  # last block (shorter than blksize), once read
        resend_from = 1
        retries = 0
        window_sent_at = 0.0  # when block ``base`` last went out (perf_counter)
        last_tx = 0.0  # when the latest transmission burst ended
        window_clean = True  # no retransmission in this window (Karn: RTT sample valid)
        last_restart = -1.0
        unyielded = 0
        while True:
            end = base + windowsize - 1
            if final is not None and end > final:
                end = final
            if resend_from <= end:
                for seq in range(resend_from, end + 1):
                    data = peek(seq)
                    if data is None:
                        data = await source.block(seq)
                    if len(data) < blksize:
                        final = seq
                        end = seq
                    packet = header(seq) + data
                    if not send_now(packet):
                        await self._send(packet)
                    if seq <= sent_upto:
                        res.retransmits += 1
                        window_clean = False
                    else:
                        sent_upto = seq
                        res.blocks += 1
                        res.bytes_sent += len(data)
                    if seq == final:
                        self._final_sent = True
                        break
                last_tx = clock()
                if resend_from == base:
                    window_sent_at = last_tx
                resend_from = end + 1
            deadline: float | None = None
            # Wait for an ACK that changes something.
            while True:
                data = try_recv()
                if data is None and spin:
                    # Few transfers running: a short busy-wait catches an ACK that is
                    # microseconds away and skips the scheduler round trip.
                    spin_until = clock() + spin
                    while data is None and clock() < spin_until:
                        data = try_recv()
                if data is not None:
                    unyielded += 1
                    if unyielded >= _CHECKPOINT_EVERY:
                        unyielded = 0
                        await trio.lowlevel.checkpoint()
                else:
                    unyielded = 0
                    if deadline is None:
                        deadline = trio.current_time() + rto
                        data = await self._recv(deadline, tried=True)
                    else:
                        data = await self._recv(deadline)
                if data is None:
                    retries += 1
                    if retries > self._policy.retries:
                        raise _TimedOut
                    resend_from = base
                    window_clean = False
                    break
                block = packets.ack_block(data)
                if block is None:
                    self._check_packet(data)
                    continue
                seq = base - 1 + ((block - (base - 1)) & 0xFFFF)
                if seq > sent_upto:
                    res.ignored_acks += 1  # stale (older than base - 1) or never sent
                    continue
                if seq == base - 1:
                    # Duplicate ACK of the block before the window.
                    res.duplicate_acks += 1
                    if clock() - window_sent_at >= self._holdoff():
                        resend_from = base
                        break
                    continue
                # seq >= base: new data acknowledged.
                if window_clean and seq == sent_upto:
                    sample = clock() - last_tx
                    old = self._srtt
                    self._srtt = sample if old is None else 0.875 * old + 0.125 * sample
                if final is not None and seq == final:
                    return
                base = seq + 1
                source.release_before(base)
                retries = 0
                window_clean = True
                if seq < sent_upto:
                    # The receiver stopped mid-window (RFC 7440: it lost seq + 1).  Restart
                    # after it, unless we just did: a client ACKing every block must not
                    # make us resend the window for each of its ACKs.
                    now = clock()
                    if now - last_restart >= self._holdoff():
                        last_restart = now
                        resend_from = base
                    else:
                        resend_from = sent_upto + 1
                else:
                    resend_from = base
                break
