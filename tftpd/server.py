"""The server: receive requests, enforce limits, start a session per transfer, count them.

Every listen socket asks the kernel for the request's destination address (IP_PKTINFO /
IPV6_RECVPKTINFO), so each session socket is bound to the address the client talked to: on a
multi-homed boot server, replies must come from the address the firmware sent to or it drops
them.  IPv4 clients of a dual-stack ``[::]`` socket arrive as ``::ffff:a.b.c.d``; they are
normalised to dotted quads and served from an AF_INET session socket.

A client that re-sends its RRQ (its timer fired before our OACK/DATA arrived) must not get a
second transfer: requests are keyed by (client ip, client port) while their session lives.

Use :func:`serve` (or :class:`TftpServer` for stats and graceful stop) with ``nursery.start``:
it reports the bound addresses once the sockets are listening.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

from vfsroot.defaults import DEFAULT_MOUNT

from . import packets
from .handoff import Handoff, PassedPorts, PassedRequest
from .inline_open import InlineOpener
from .limits import BUSY, PER_IP, SessionLimits
from .logthrottle import LogThrottle
from .opener import OpenerPool
from .packets import ERR_ILLEGAL_OPERATION, ERR_NOT_DEFINED, MAX_DATAGRAM, MalformedPacket
from .pump import Pump
from .roots import ClientRoots, normalise_ip
from .session import Session, SessionContext, SessionResult, TransferPolicy, quoted

log = logging.getLogger(__name__)

#: Characters of a client-chosen file name in a log line (names can be 64 KiB).
_NAME_CHARS = 160

IP_PKTINFO = 8  # linux/in.h; Python 3.11's socket module does not export it
SYSTEMD_FIRST_FD = 3

#: Requests taken from one listen socket per pass of the pump (the rest in the next pass).
_REQUESTS_PER_PASS = 16

#: Outcomes logged below INFO: none. Outcomes that hint at an attack or a broken setup: WARNING.
_WARN_OUTCOMES = frozenset({"refused-path", "refused-file", "timeout", "refused-mode",
                            "read-error"})


class ConfigError(Exception):
    """An operator mistake (bad address, port in use): one clear line, exit code 1."""


@dataclass(frozen=True)
class ListenSpec:
    """One address to listen on; ``host`` ``""`` with ``family`` picks a wildcard."""

    host: str
    port: int
    family: int  # socket.AF_INET or socket.AF_INET6
    v6only: bool = False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else (
            f"{self.host}:{self.port}"
        )


def parse_listen(text: str, default_port: int = 69) -> ListenSpec:
    """Parse ``ADDR:PORT``, ``[V6ADDR]:PORT``, ``ADDR`` or ``:PORT`` (IPv4 wildcard)."""
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"bad listen address {text!r}: missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad listen address {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        host = text  # bare IPv6 address without port
    host = host or "0.0.0.0"
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"bad port in listen address {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in listen address {text!r}")
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ConfigError(f"listen address must be a numeric IP address, not {host!r}") from None
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return ListenSpec(host=host, port=port, family=family)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs; the CLI builds one, tests and the demo build their own."""

    root: Path = DEFAULT_MOUNT
    flat: bool = False
    #: Explicit addresses; empty means the default ``[::]:69`` dual-stack (IPv4 fallback).
    listen: tuple[ListenSpec, ...] = ()
    #: "any" (dual-stack default), "4" or "6": which default listener to open.
    family: str = "any"
    default_port: int = 69
    #: Already-bound sockets (systemd socket activation); used instead of ``listen``.
    inherited_fds: tuple[int, ...] = ()
    port_range: tuple[int, int] | None = None
    max_sessions: int = 512
    max_sessions_per_ip: int = 16
    read_threads: int = 16
    grace: float = 10.0
    follow_outside_symlinks: bool = False
    #: Open a file on the event loop where nothing in the open can wait (tftpd/inline_open.py);
    #: off: every open goes to the helper process.
    inline_open: bool = True
    policy: TransferPolicy = field(default_factory=TransferPolicy)
    #: ERROR replies sent from a listen socket per second (malformed/busy), burst twice that.
    error_replies_per_second: float = 50.0
    #: SO_REUSEPORT on listen sockets, so several worker processes can share one address.
    #: The kernel hashes (client ip, client port) to one socket: a retransmitted RRQ reaches
    #: the same worker, which keeps the dedupe exact.
    reuse_port: bool = False
    #: Shown in log lines when several workers run ("1/2"); empty for a single process.
    worker: str = ""


@dataclass
class ServerStats:
    """Counters for a metrics endpoint; monotonically increasing except ``active``."""

    requests: int = 0
    active: int = 0
    completed: int = 0
    not_found: int = 0
    refused: int = 0
    aborted_by_client: int = 0
    client_gone: int = 0
    timeouts: int = 0
    errors: int = 0
    shutdown: int = 0
    busy_rejections: int = 0
    duplicate_requests: int = 0
    #: Requests admitted here and passed to a worker with fewer transfers (--workers).
    handed_off: int = 0
    #: Opens answered on the event loop (tftpd/inline_open.py: the file, or that it is
    #: missing) rather than by the helper.
    opened_inline: int = 0
    malformed: int = 0
    stray_datagrams: int = 0
    bytes_sent: int = 0
    blocks_sent: int = 0
    retransmits: int = 0
    duplicate_acks: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _outcome_counter(outcome: str) -> str:
    if outcome in ("ok", "ok-unconfirmed"):
        return "completed"
    if outcome == "not-found":
        return "not_found"
    if outcome.startswith("refused"):
        return "refused"
    return {
        "aborted-by-client": "aborted_by_client",
        "client-gone": "client_gone",
        "timeout": "timeouts",
        "shutdown": "shutdown",
    }.get(outcome, "errors")


class _TokenBucket:
    """Bounds ERROR replies to requests refused before any file is looked at (from listen
    sockets, and a session's refusal of an upload, a mode or a path), so spoofed garbage
    cannot turn us into a reflector."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate * 2)
        self._tokens = self._capacity
        self._stamp = trio.current_time()

    def take(self) -> bool:
        now = trio.current_time()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def _enable_pktinfo(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        # IPv4 packets on a dual-stack socket then also report IP_PKTINFO.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def _destination(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """(local address the datagram was sent to, interface index) from the ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            ifindex = struct.unpack_from("=i", data, 0)[0]
            # ipi_spec_dst: the local address to answer from (== destination for unicast,
            # a local address for broadcast requests, which cannot be bound to).
            return socket.inet_ntop(socket.AF_INET, data[4:8]), ifindex
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            addr = ipaddress.IPv6Address(data[:16])
            ifindex = struct.unpack_from("=i", data, 16)[0]
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped), ifindex
            if addr.is_multicast:
                return None
            return str(addr), ifindex
    return None


def _pktinfo_cmsg(family: int, local: str, ifindex: int) -> tuple[int, int, bytes] | None:
    """Ancillary data that sets the source address of one datagram."""
    addr = ipaddress.ip_address(local)
    if family == socket.AF_INET and addr.version == 4:
        return (socket.IPPROTO_IP, IP_PKTINFO,
                struct.pack("=i4s4s", 0, addr.packed, b"\0\0\0\0"))
    if family == socket.AF_INET6 and addr.version == 6:
        return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                struct.pack("=16si", addr.packed, ifindex))
    if family == socket.AF_INET6 and addr.version == 4:
        # An IPv4 client of a dual-stack listener: Linux takes the v4-mapped address.
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
        return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                struct.pack("=16si", mapped.packed, ifindex))
    return None


class TftpServer:
    """A running TFTP server: listeners, sessions, limits, counters."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        #: Lines about refused and ignored datagrams, bounded per kind (a flood is free).
        self._noise = LogThrottle(log)
        self.addresses: list[tuple[str, int]] = []
        self._roots = ClientRoots(
            Path(config.root), flat=config.flat,
            follow_outside_symlinks=config.follow_outside_symlinks,
        )
        self._limiter = trio.CapacityLimiter(config.read_threads)
        self._active: dict[tuple[str, int], Session] = {}
        #: Admission (limits, stop flag); :meth:`share_limits` replaces it with one shared by
        #: every worker process.
        self.limits = SessionLimits(config.max_sessions, config.max_sessions_per_ip)
        self._listen_scope: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()
        self._grace = config.grace
        self._stopping = False
        self._stop_requested = False
        self._bound: list[socket.socket] | None = None
        #: Called once per finished transfer (the metrics histogram); None costs nothing.
        self.on_transfer: Callable[[SessionResult], None] | None = None
        #: The DATA-phase pump while :meth:`run` runs (its counters: batches, GSO sends).
        self.pump: Pump | None = None
        #: The helper process that opens request files while :meth:`run` runs.
        self.opener: OpenerPool | None = None
        #: With several workers: the inboxes requests are passed through (tftpd/handoff.py).
        self._handoff: Handoff | None = None
        #: Client ports whose request went to another worker: until it says their session
        #: ended (or the longest transfer could have), every request from such a port goes
        #: to that worker, which knows whether it is a retransmission of its transfer (the
        #: kernel keeps sending them here).
        self._passed = PassedPorts(bound=4 * config.max_sessions)
        #: Sessions running here for a request another worker passed: key -> that worker.
        self._origin: dict[tuple[str, int], int] = {}
        #: Listen sockets (and their bound hosts) by index, for requests passed here.
        self._listening: list[tuple[socket.socket, str]] = []

    @property
    def _worker(self) -> int:
        """This worker's index (0-based) in the shared limits."""
        return self._handoff.worker if self._handoff is not None else 0

    def share_handoff(self, handoff: Handoff) -> None:
        """Place each request on the worker with the fewest transfers (``handoff`` made before
        the workers were forked, with :meth:`share_limits`' limits)."""
        self._handoff = handoff

    def share_limits(self, limits: SessionLimits) -> None:
        """Use ``limits`` (created before the workers were forked) instead of our own, so the
        limits and the stop hold for the whole server, not per worker."""
        self.limits = limits

    def bound_specs(self) -> tuple[ListenSpec, ...]:
        """The listen sockets as specs with real ports (for more workers on the same ports)."""
        assert self._bound is not None, "bind() first"
        specs = []
        for sock in self._bound:
            host, port = sock.getsockname()[:2]
            v6only = bool(sock.family == socket.AF_INET6 and sock.getsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            specs.append(ListenSpec(host, port, sock.family, v6only=v6only))
        return tuple(specs)

    def close(self) -> None:
        """Close listen sockets opened by :meth:`bind` without running (another worker's)."""
        for sock in self._bound or ():
            sock.close()
        self._bound = []

    def bind(self) -> list[tuple[str, int]]:
        """Open the listen sockets now (synchronously), so a bad address or a busy port is a
        plain ConfigError for the caller instead of an error inside a nursery.  Optional:
        :meth:`run` binds by itself when this was not called."""
        if self._bound is None:
            self._bound = self._open_listeners()
            self.addresses = [tuple(s.getsockname()[:2]) for s in self._bound]  # type: ignore[misc]
        return list(self.addresses)

    # -- sockets ---------------------------------------------------------------------------

    def _open_listeners(self) -> list[socket.socket]:
        cfg = self.config
        if cfg.inherited_fds:
            socks = []
            for fd in cfg.inherited_fds:
                sock = socket.socket(fileno=fd)
                if sock.type != socket.SOCK_DGRAM:
                    raise ConfigError(f"inherited fd {fd} is not a UDP socket")
                sock.setblocking(False)
                _enable_pktinfo(sock)
                socks.append(sock)
            return socks
        specs = list(cfg.listen)
        if not specs:
            if cfg.family == "4":
                specs = [ListenSpec("0.0.0.0", cfg.default_port, socket.AF_INET)]
            else:
                specs = [ListenSpec("::", cfg.default_port, socket.AF_INET6,
                                    v6only=cfg.family == "6")]
        socks = []
        try:
            for spec in specs:
                socks.append(self._bind_listener(spec, fallback=not cfg.listen
                                                 and cfg.family == "any"))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _bind_listener(self, spec: ListenSpec, *, fallback: bool) -> socket.socket:
        try:
            sock = socket.socket(spec.family, socket.SOCK_DGRAM)
        except OSError as exc:
            if fallback and spec.family == socket.AF_INET6:
                log.warning("IPv6 is not available (%s): listening on IPv4 only "
                            "address=0.0.0.0:%d", exc.strerror, spec.port)
                return self._bind_listener(
                    ListenSpec("0.0.0.0", spec.port, socket.AF_INET), fallback=False)
            raise ConfigError(f"cannot create a socket for {spec}: {exc.strerror}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.config.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if spec.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.v6only))
            _enable_pktinfo(sock)
            sock.setblocking(False)
            sock.bind((spec.host, spec.port))
        except OSError as exc:
            sock.close()
            if fallback and spec.family == socket.AF_INET6 and exc.errno in (
                errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT,
            ):
                log.warning("IPv6 is disabled (%s): listening on IPv4 only address=0.0.0.0:%d",
                            exc.strerror, spec.port)
                return self._bind_listener(
                    ListenSpec("0.0.0.0", spec.port, socket.AF_INET), fallback=False)
            raise ConfigError(f"cannot listen on {spec}: {exc.strerror}") from None
        return sock

    def _session_socket(self, local: str | None, ifindex: int, client: str,
                        port: int) -> socket.socket:
        """A non-blocking socket bound to ``local`` (port from the range) and connected to the
        client."""
        v4 = ":" not in client  # normalised: dotted quad or IPv6 text
        family = socket.AF_INET if v4 else socket.AF_INET6
        # Non-blocking from its creation: no separate ioctl per request.
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            host = local if local is not None else ("0.0.0.0" if v4 else "::")
            scope = ifindex if (not v4 and ipaddress.ip_address(host).is_link_local) else 0
            peer_scope = ifindex if (not v4 and ipaddress.ip_address(client).is_link_local) else 0
            self._bind_session(sock, host, scope, v4)
            sock.connect((client, port) if v4 else (client, port, 0, peer_scope))
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind_session(self, sock: socket.socket, host: str, scope: int, v4: bool) -> None:
        def addr(p: int) -> tuple:
            return (host, p) if v4 else (host, p, 0, scope)

        if self.config.port_range is None:
            sock.bind(addr(0))
            return
        lo, hi = self.config.port_range
        span = hi - lo + 1
        start = random.randrange(span)
        for i in range(span):
            try:
                sock.bind(addr(lo + (start + i) % span))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, f"no free port in range {lo}:{hi}")

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = (
        trio.TASK_STATUS_IGNORED)) -> None:
        """Listen until stopped or cancelled; ``task_status.started`` gets the bound addresses."""
        self.bind()
        assert self._bound is not None
        raw, self._bound = self._bound, []
        listeners = [trio.socket.from_stdlib_socket(s) for s in raw]
        policy = self.config.policy
        self.pump = pump = Pump(spin_seconds=policy.spin_seconds,
                                spin_max_sessions=policy.spin_max_sessions,
                                active=lambda: self.stats.active,
                                compiled_lane=policy.compiled_lane,
                                batch_sends=policy.batch_sends)
        if policy.compiled_lane and not pump.compiled_lane:
            log.warning("the compiled lock-step lane (tftpd/_lane.c) is not built: lock-step "
                        "ACKs are answered in Python, which costs more CPU in a boot storm; "
                        "reinstall with gcc and python3-dev present")
        elif pump.batch_error is not None:
            log.warning("io_uring unavailable (%s): the lock-step lane sends one send() per ACK, "
                        "which costs more CPU in a boot storm", os.strerror(pump.batch_error))
        self.opener = opener = OpenerPool(self._roots, self._limiter, watcher=pump)
        inline = self._inline_opener()
        buckets = _TokenBucket(self.config.error_replies_per_second)
        ctx = SessionContext(
            roots=self._roots, policy=policy, limiter=self._limiter, pump=pump,
            active=lambda: self.stats.active, opener=opener, inline=inline,
            may_refuse=buckets.take,
        )
        self._listening = [(s, s.getsockname()[0]) for s in raw]
        handoff = self._handoff
        try:
            if handoff is not None:
                pump.watch(handoff.inbox.fileno(), handoff.reader(
                    functools.partial(self._on_passed, ctx, buckets), self._on_passed_ended))
            opener.start()  # inside the try: the finally below ends it however we stop
            async with trio.open_nursery() as engine:
                await engine.start(pump.run)
                await engine.start(opener.run)
                async with trio.open_nursery() as sessions:
                    ctx.spawn = sessions.start_soon
                    with trio.CancelScope() as self._listen_scope:
                        if self._stop_requested:
                            self._listen_scope.cancel()
                        async with trio.open_nursery() as listen:
                            for i, (tsock, rsock) in enumerate(zip(listeners, raw, strict=True)):
                                listen.start_soon(pump.serve_readable, rsock.fileno(),
                                                  self._listener(tsock, rsock, ctx, buckets, i))
                            log.info("listening addresses=%s root=%s mode=%s lane=%s%s",
                                     ",".join(f"{h}:{p}" for h, p in self.addresses),
                                     self.config.root,
                                     "flat" if self.config.flat else "per-client",
                                     ("compiled+io_uring" if pump.batched_sends else
                                      "compiled" if pump.compiled_lane else "python"),
                                     f" worker={self.config.worker}" if self.config.worker
                                     else "")
                            task_status.started(list(self.addresses))
                    # Stopped: no new requests; let running transfers finish within the grace.
                    self._stopping = True
                    for sock in listeners:
                        sock.close()
                    if self.stats.active:
                        log.info("stopping: waiting for transfers active=%d grace=%.1fs",
                                 self.stats.active, self._grace)
                        with trio.move_on_after(self._grace):
                            await self._idle.wait()
                        if self.stats.active:
                            log.warning("grace period over: ending transfers active=%d",
                                        self.stats.active)
                    self._abort_sessions()
                    sessions.cancel_scope.cancel()
                engine.cancel_scope.cancel()  # every session has ended: the pump is idle
        finally:
            for sock in listeners:
                sock.close()
            self._abort_sessions()  # cancelled from outside: nobody may be left waiting
            if handoff is not None:
                pump.unwatch(handoff.inbox.fileno())
            pump.close()
            opener.close()
            if inline is not None:
                inline.close()
        counters = " ".join(f"{k}={v}" for k, v in self.stats.as_dict().items())
        log.info("stopped%s stats=%s",
                 f" worker={self.config.worker}" if self.config.worker else "", counters)

    async def wait_idle(self) -> None:
        """Return once no transfer is running (at once if none is)."""
        while self.stats.active:
            await self._idle.wait()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting requests; running transfers get ``grace`` seconds to finish.  With
        shared limits, every worker stops accepting at once."""
        if grace is not None:
            self._grace = grace
        self.limits.stop()
        self._stop_requested = True
        if self._listen_scope is not None:
            self._listen_scope.cancel()

    def _listener(self, sock: trio.socket.SocketType, raw: socket.socket, ctx: SessionContext,
                  bucket: _TokenBucket, index: int) -> Callable[[], None]:
        """What the pump calls when ``raw`` is readable (tftpd/pump.py ``watch``): take up to
        ``_REQUESTS_PER_PASS`` requests and handle each.

        A burst of requests (a rack powering on) costs one wake-up, shared with the ACKs of
        every running transfer; a longer burst is handled over several passes of the pump,
        which lets other tasks in between.
        """
        anc_size = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(12)
        bound_host = sock.getsockname()[0]
        recvmsg = raw.recvmsg
        handle = self._handle_datagram

        def on_readable() -> None:
            for _ in range(_REQUESTS_PER_PASS):
                try:
                    data, ancdata, _flags, addr = recvmsg(MAX_DATAGRAM, anc_size)
                except BlockingIOError:
                    return
                except OSError as exc:
                    # ICMP errors queued on the socket and the like: reported once, then the
                    # socket reads on.
                    log.debug("listen recv error=%s", exc)
                    return
                try:
                    handle(raw, data, ancdata, addr, bound_host, ctx, bucket, index)
                except Exception:
                    log.exception("cannot handle request peer=%s", addr)

        return on_readable

    def _reply_error(self, sock: socket.socket, addr: tuple, code: int, message: str,
                     bucket: _TokenBucket, local: tuple[str, int] | None = None) -> None:
        """ERROR from the listen socket (non-blocking: dropped if the buffer is full).

        From a wildcard listener the kernel would pick the source address by route; ``local``
        (from IP_PKTINFO) makes it the address the client sent to, which is the only one a
        multi-homed client's firmware accepts an answer from.
        """
        if not bucket.take():
            return
        packet = packets.encode_error(code, message)
        try:
            if local is not None and sock.getsockname()[0] in ("0.0.0.0", "::"):
                cmsg = _pktinfo_cmsg(sock.family, local[0], local[1])
                if cmsg is not None:
                    try:
                        sock.sendmsg([packet], [cmsg], 0, addr)
                        return
                    except OSError:
                        pass  # e.g. a v4-mapped peer on a v6 socket: let the kernel choose
            sock.sendto(packet, addr)
        except OSError as exc:
            log.debug("cannot send error peer=%s error=%s", addr, exc)

    def _handle_datagram(self, sock: socket.socket, data: bytes,
                         ancdata: list[tuple[int, int, bytes]], addr: tuple, bound_host: str,
                         ctx: SessionContext, bucket: _TokenBucket, listener: int = 0) -> None:
        client = normalise_ip(addr[0])
        port = addr[1]
        if port == 0:
            self.stats.stray_datagrams += 1
            self._noise.log("port0", time.monotonic(), logging.INFO,
                            "datagram from port 0 ignored client=%s", client)
            return
        dest = _destination(ancdata)
        try:
            packet = packets.parse(data)
        except MalformedPacket as exc:
            self.stats.malformed += 1
            self._noise.log("malformed", time.monotonic(), logging.INFO,
                            "malformed request client=%s port=%d error=%s", client, port, exc)
            self._reply_error(sock, addr, ERR_ILLEGAL_OPERATION, str(exc), bucket, dest)
            return
        if not isinstance(packet, packets.Request):
            # DATA/ACK/OACK/ERROR belong to a session port; answering them here could start a
            # ping-pong with another server.  Stay silent to the client.
            self.stats.stray_datagrams += 1
            self._noise.log("stray", time.monotonic(), logging.INFO,
                            "%s at the listen port ignored client=%s port=%d",
                            type(packet).__name__, client, port)
            return
        self.stats.requests += 1
        key = (client, port)
        if key in self._passed and self._pass_again(key, listener, addr, dest, data):
            return
        if key in self._active:
            self.stats.duplicate_requests += 1
            log.debug("retransmitted request ignored client=%s port=%d file=%s", client, port,
                      quoted(packet.filename, _NAME_CHARS))
            return
        if self._stopping or self.limits.stopping:
            # Not answered: an ERROR makes firmware give up the boot, while its retry in a
            # few seconds reaches the restarted server (or another one).
            self._noise.log("stopping", time.monotonic(), logging.INFO,
                            "request not answered: the server is stopping client=%s file=%s",
                            client, quoted(packet.filename, _NAME_CHARS))
            return
        handoff = self._handoff
        if handoff is None:
            refused, chosen = self.limits.admit(client), 0
        else:
            refused, chosen = self.limits.admit_balanced(client, handoff.worker,
                                                         handoff.workers)
        if refused is not None:
            self._refuse(sock, addr, client, packet, refused, bucket, dest)
            return
        if handoff is not None and chosen != handoff.worker:
            now = trio.current_time()
            if (self._passed.has_room(now)
                    and handoff.pass_request(chosen, listener, addr, dest, data) is None):
                self.stats.handed_off += 1
                self._passed.add(key, chosen, now + self._passed_lifetime())
                return
            self.limits.moved(chosen, handoff.worker)  # served here after all
        self._start_session(sock, packet, addr, dest, bound_host, ctx, bucket)

    def _refuse(self, sock: socket.socket, addr: tuple, client: str, packet: packets.Request,
                refused: str, bucket: _TokenBucket, dest: tuple[str, int] | None) -> None:
        """Answer a request the limits refused (``refused``: BUSY or PER_IP)."""
        cfg = self.config
        self.stats.busy_rejections += 1
        now = time.monotonic()
        if refused == BUSY:
            self._noise.log("busy", now, logging.WARNING,
                            "busy: session limit reached client=%s file=%s limit=%d", client,
                            quoted(packet.filename, _NAME_CHARS), cfg.max_sessions)
            message = f"server busy: {cfg.max_sessions} transfers running, retry later"
        else:
            assert refused == PER_IP, refused
            self._noise.log("per-ip", now, logging.WARNING,
                            "busy: per-client limit reached client=%s file=%s limit=%d", client,
                            quoted(packet.filename, _NAME_CHARS), cfg.max_sessions_per_ip)
            message = (f"too many transfers for {client}: limit {cfg.max_sessions_per_ip}, "
                       "retry later")
        self._reply_error(sock, addr, ERR_NOT_DEFINED, message, bucket, dest)

    def _passed_lifetime(self) -> float:
        """Longest a passed request's session can run: its entry in ``_passed`` is dropped
        after that even if the other worker's word of its end was lost."""
        policy = self.config.policy
        return (policy.max_transfer_seconds + self._grace
                + policy.retransmit_timeout * (policy.retries + 1))

    def _pass_again(self, key: tuple[str, int], listener: int, addr: tuple,
                    dest: tuple[str, int] | None, data: bytes) -> bool:
        """A request from a client port whose transfer was passed to another worker: pass
        it there too, unadmitted, and that worker tells a retransmission from a new request.
        False when it is this worker's to handle: the entry expired, or that worker is
        gone."""
        assert self._handoff is not None
        worker = self._passed.worker_for(key, trio.current_time())
        if worker is None:
            return False
        why = self._handoff.pass_request(worker, listener, addr, dest, data, admitted=False)
        if why is None:
            return True
        if why == "full":  # most likely a retransmission: the client will send it again
            self.stats.duplicate_requests += 1
            return True
        self._passed.forget(key)  # that worker is gone
        return False

    def _on_passed_ended(self, client: str, port: int) -> None:
        """The worker this one passed a request to says its session is over."""
        self._passed.forget((client, port))

    def _on_passed(self, ctx: SessionContext, bucket: _TokenBucket,
                   request: PassedRequest) -> None:
        """A request another worker passed here: start its session as if it had arrived on
        our own listen socket.  An admitted one is already counted for us; an unadmitted
        one (from the port of a transfer passed here before) is a retransmission if that
        transfer still runs, else a new request that goes through admission here."""
        assert self._handoff is not None
        client, port = normalise_ip(request.addr[0]), request.addr[1]
        key = (client, port)
        if key in self._active:
            if request.admitted:  # (its origin passes such ports unadmitted: not expected)
                self.limits.release(client, self._handoff.worker)
                log.debug("passed request not started client=%s port=%d from worker=%d: a "
                          "transfer for this client port is already running here", client,
                          port, request.origin + 1)
            else:  # a retransmission of the transfer running here
                self.stats.duplicate_requests += 1
            return
        packet, problem = self._passed_packet(request)
        if packet is None:
            log.debug("passed request not started client=%s port=%d from worker=%d: %s",
                      client, port, request.origin + 1, problem)
            if request.admitted:
                self.limits.release(client, self._handoff.worker)
                if not self.limits.stopping:
                    self._handoff.ended(request.origin, client, port)
            return
        sock, bound_host = self._listening[request.listener]
        if not request.admitted:
            refused = self.limits.admit(client, self._handoff.worker)
            if refused is not None:
                self._refuse(sock, request.addr, client, packet, refused, bucket, request.dest)
                return
        self._start_session(sock, packet, request.addr, request.dest, bound_host, ctx, bucket,
                            origin=request.origin)

    def _passed_packet(self, request: PassedRequest) -> tuple[packets.Request | None, str]:
        """The request a passed message carries, or None and why it cannot start here."""
        if not 0 <= request.listener < len(self._listening):
            return None, f"listen socket {request.listener} unknown"
        if self._stopping or self.limits.stopping:
            return None, "stopping"
        try:
            packet = packets.parse(request.data)
        except MalformedPacket as exc:
            return None, f"malformed: {exc}"
        if not isinstance(packet, packets.Request):
            return None, "not a request"
        return packet, ""

    def _start_session(self, sock: socket.socket, packet: packets.Request, addr: tuple,
                       dest: tuple[str, int] | None, bound_host: str, ctx: SessionContext,
                       bucket: _TokenBucket, *, origin: int | None = None) -> None:
        """Open the session socket and start the transfer of an admitted request (``origin``:
        the worker that passed it here, told when it ends)."""
        client, port = normalise_ip(addr[0]), addr[1]
        key = (client, port)
        local, ifindex = dest if dest is not None else (None, 0)
        if local is None and bound_host not in ("0.0.0.0", "::"):
            local = normalise_ip(bound_host)
        if local is not None and (":" in local) != (":" in client):
            local = None
        try:
            ssock = self._session_socket(local, ifindex, client, port)
        except OSError as exc:
            self.limits.release(client, self._worker)
            log.error("cannot open a session socket client=%s local=%s error=%s", client,
                      local, exc.strerror or exc)
            self._reply_error(sock, addr, ERR_NOT_DEFINED, "server cannot open a transfer port",
                              bucket, dest)
            if origin is not None and self._handoff is not None:
                self._handoff.ended(origin, client, port)
            return
        session = Session(ctx, packet, client, port, local or "", ssock,
                          on_end=functools.partial(self._ended, key))
        self._active[key] = session
        if origin is not None:
            self._origin[key] = origin
        self.stats.active += 1
        self._idle = trio.Event() if self.stats.active == 1 else self._idle
        session.start()

    def _ended(self, key: tuple[str, int], res: SessionResult) -> None:
        """A session is over (called once by it, with or without a task of its own)."""
        del self._active[key]
        self.limits.release(key[0], self._worker)
        origin = self._origin.pop(key, None)
        if origin is not None and self._handoff is not None and not self.limits.stopping:
            # (When stopping, the origin takes no requests and may be gone already.)
            self._handoff.ended(origin, *key)
        self.stats.active -= 1
        if not self.stats.active:
            self._idle.set()
        self._account(res)

    def _abort_sessions(self) -> None:
        """End the sessions no task serves (waiting for their open, or in the pump); the
        others end when the session nursery is cancelled."""
        for session in list(self._active.values()):
            session.abort()

    def _inline_opener(self) -> InlineOpener | None:
        """The inline open (tftpd/inline_open.py), unless switched off or the kernel lacks
        what it needs (then every open goes to the helper, as with it switched off)."""
        if not self.config.inline_open:
            return None
        try:
            return InlineOpener(self._roots)
        except OSError as exc:
            log.info("inline open unavailable (%s): every file is opened by the helper "
                     "process", exc.strerror or exc)
            return None

    def _account(self, res: SessionResult) -> None:
        st = self.stats
        if res.opened_inline:
            st.opened_inline += 1
        counter = _outcome_counter(res.outcome)
        setattr(st, counter, getattr(st, counter) + 1)
        st.bytes_sent += res.bytes_sent
        st.blocks_sent += res.blocks
        st.retransmits += res.retransmits
        st.duplicate_acks += res.duplicate_acks
        if self.on_transfer is not None:
            self.on_transfer(res)
        level = logging.INFO
        if res.outcome in _WARN_OUTCOMES:
            level = logging.WARNING
        elif res.outcome == "error":
            level = logging.ERROR
        if not log.isEnabledFor(level):
            return  # (--log-level WARNING: the line of a good transfer costs nothing)
        rate = res.bytes_sent / res.seconds / 1e6 if res.seconds > 0 else 0.0
        opts = ",".join(f"{k}={v}" for k, v in res.options.items()) or "-"
        log.log(level, "transfer client=%s port=%d file=%s bytes=%d seconds=%.3f MB/s=%.2f "
                "options=%s retransmits=%d dup_acks=%d outcome=%s%s",
                res.client, res.port, quoted(res.filename, _NAME_CHARS), res.bytes_sent,
                res.seconds, rate, opts, res.retransmits, res.duplicate_acks, res.outcome,
                f" detail={quoted(res.detail, 400)}" if res.detail else "")


async def serve(config: ServerConfig, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = (
        trio.TASK_STATUS_IGNORED)) -> None:
    """Run a TFTP server until cancelled (``nursery.start(serve, config)`` returns addresses)."""
    await TftpServer(config).run(task_status=task_status)


def systemd_fds() -> tuple[int, ...]:
    """File descriptors passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return ()
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return ()
    return tuple(range(SYSTEMD_FIRST_FD, SYSTEMD_FIRST_FD + count))
