"""``vfsroot-tftpd``: command line, logging, signals, systemd readiness.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when the server cannot start (address in
use, no permission for port 69, bad systemd socket, a --metrics address that cannot be bound),
2 for command-line mistakes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

import trio

from vfsroot.defaults import DEFAULT_MOUNT
from vfsroot.exporter import MetricsError, MetricsServer, bind_metrics, parse_metrics_address
from vfsroot.systemd import notify

from . import malloc
from .handoff import Handoff
from .limits import SessionLimits
from .metrics import TftpCollector, WorkerMetrics, answer_parent, channel_pair
from .packets import BLKSIZE_MAX, BLKSIZE_MIN, WINDOWSIZE_MAX
from .server import ConfigError, ServerConfig, TftpServer, parse_listen, systemd_fds
from .session import TransferPolicy

log = logging.getLogger(__name__)


def _port_range(text: str) -> tuple[int, int]:
    try:
        lo_text, hi_text = text.split(":")
        lo, hi = int(lo_text), int(hi_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI, got {text!r}") from None
    if not 1 <= lo <= hi <= 65535:
        raise argparse.ArgumentTypeError(f"port range {text!r} must satisfy 1 <= LO <= HI <= 65535")
    return lo, hi


def _bounded(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfsroot-tftpd",
        description="Read-only TFTP server that serves each client from <root>/<client-ip>/.",
    )
    p.add_argument("--root", type=Path, default=DEFAULT_MOUNT,
                   help=f"directory with one sub-directory per client IP (default {DEFAULT_MOUNT})")
    p.add_argument("--flat", action="store_true",
                   help="serve ROOT/<path> to every client (no per-client directories)")
    p.add_argument("--listen", action="append", default=[], metavar="ADDR:PORT",
                   help="address to listen on, repeatable; [V6]:PORT for IPv6; 'systemd' for a "
                        "socket-activated fd (default: [::]:69 dual-stack, IPv4 if no IPv6)")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const="4",
                     help="default listener on IPv4 only (0.0.0.0:69)")
    fam.add_argument("-6", dest="family", action="store_const", const="6",
                     help="default listener on IPv6 only ([::]:69, no IPv4-mapped clients)")
    p.add_argument("--port-range", type=_port_range, metavar="LO:HI",
                   help="local ports for transfers (for firewalls)")
    p.add_argument("--max-sessions", type=_bounded(1, 100000), default=512)
    p.add_argument("--max-sessions-per-ip", type=_bounded(1, 100000), default=16)
    p.add_argument("--blksize-max", type=_bounded(BLKSIZE_MIN, BLKSIZE_MAX), default=1468,
                   help="largest blksize granted (default 1468: one 1500-byte Ethernet frame)")
    p.add_argument("--mtu-clamp", action="store_true",
                   help="also clamp blksize to the route MTU towards the client")
    p.add_argument("--windowsize-max", type=_bounded(1, WINDOWSIZE_MAX), default=64)
    p.add_argument("--timeout-max", type=_bounded(1, 255), default=30,
                   help="largest timeout option (RFC 2349) accepted, seconds; a larger one "
                        "is declined")
    p.add_argument("--retransmit", type=_positive_float, default=1.0, metavar="SECONDS",
                   help="retransmission timeout when the client did not send 'timeout'")
    p.add_argument("--retries", type=_bounded(0, 100), default=5)
    p.add_argument("--read-threads", type=_bounded(1, 1024), default=16,
                   help="concurrent blocking file reads (the FUSE tree may block on a disk)")
    p.add_argument("--read-ahead", type=_bounded(4096, 64 << 20), default=256 * 1024,
                   metavar="BYTES", help="file bytes read per thread call and session")
    p.add_argument("--max-transfer-seconds", type=_positive_float, default=3600.0)
    p.add_argument("--spin-us", type=_bounded(0, 10000), default=200, metavar="MICROSECONDS",
                   help="busy-poll this long for an ACK while only one transfer runs and its "
                        "RTT is shorter (lock-step latency; default 200, 0 = off)")
    p.add_argument("--python-lane", action="store_true",
                   help="answer lock-step ACKs in Python even where the compiled lane "
                        "(tftpd/_lane.c) is built: for comparison and debugging")
    p.add_argument("--no-batch-sends", action="store_true",
                   help="send one send() per answered ACK instead of one io_uring_enter per "
                        "batch (default: batched where the kernel allows io_uring)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, time running transfers get to finish")
    p.add_argument("--follow-outside-symlinks", action="store_true",
                   help="serve symlinks that point outside the client's directory")
    p.add_argument("--no-inline-open", action="store_true",
                   help="open every file in the helper process, even a cached one on a local "
                        "filesystem that could be opened without waiting (default: inline "
                        "where it cannot wait)")
    p.add_argument("--workers", type=_bounded(1, 64), default=None,
                   help="server processes sharing the listen address (SO_REUSEPORT); limits "
                        "apply per worker (default: one per CPU; 1 with --listen systemd)")
    p.add_argument("--metrics", type=parse_metrics_address, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, every worker's "
                        "counts in one endpoint (default: off)")
    p.add_argument("--malloc-policy", choices=["tuned", "glibc"], default="tuned",
                   help="tuned: glibc malloc returns freed buffers to the kernel "
                        "(docs/tftpd.md); glibc: its defaults (default: tuned)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Translate parsed arguments; raises ConfigError for combinations argparse cannot check."""
    listen = []
    fds: tuple[int, ...] = ()
    for text in args.listen:
        if text == "systemd":
            fds = systemd_fds()
            if not fds:
                raise ConfigError("--listen systemd: no socket passed (LISTEN_FDS/LISTEN_PID)")
            continue
        spec = parse_listen(text)
        if args.family == "4" and spec.family == socket.AF_INET6:
            raise ConfigError(f"-4 given but listen address {text!r} is IPv6")
        if args.family == "6" and spec.family == socket.AF_INET:
            raise ConfigError(f"-6 given but listen address {text!r} is IPv4")
        listen.append(spec)
    policy = TransferPolicy(
        blksize_max=args.blksize_max, windowsize_max=args.windowsize_max,
        timeout_max=args.timeout_max,
        mtu_clamp=args.mtu_clamp, retransmit_timeout=args.retransmit, retries=args.retries,
        read_ahead=args.read_ahead, max_transfer_seconds=args.max_transfer_seconds,
        spin_seconds=args.spin_us / 1e6, compiled_lane=not args.python_lane,
        batch_sends=not args.no_batch_sends,
    )
    return ServerConfig(
        root=args.root, flat=args.flat, listen=tuple(listen), family=args.family or "any",
        inherited_fds=fds, port_range=args.port_range, max_sessions=args.max_sessions,
        max_sessions_per_ip=args.max_sessions_per_ip, read_threads=args.read_threads,
        grace=args.grace, follow_outside_symlinks=args.follow_outside_symlinks,
        inline_open=not args.no_inline_open, policy=policy,
    )


async def _run(server: TftpServer, children: tuple[int, ...] = (),
               metrics_channel: socket.socket | None = None) -> None:
    """Serve until SIGTERM/SIGINT: stop accepting, let transfers finish within the grace
    period.  A second SIGINT (Ctrl-C again) ends the transfers at once; a repeated SIGTERM does
    not (systemd signals every process of the unit, and the parent forwards it too)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_server(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                await server.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped: nothing left to watch

            if metrics_channel is not None:  # a worker: the parent asks for its counts
                nursery.start_soon(answer_parent, metrics_channel, WorkerMetrics(server))
            await nursery.start(run_server)
            notify("READY=1")
            stopping = False
            async for signum in signals:
                server.limits.stop()  # before the workers hear of it: no request slips in
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                if not stopping:
                    stopping = True
                    log.info("signal=%s: stopping, grace=%.1fs",
                             signal.Signals(signum).name, server.config.grace)
                    notify("STOPPING=1")
                    server.stop()
                elif signum == signal.SIGINT:
                    log.warning("second interrupt: ending transfers now")
                    nursery.cancel_scope.cancel()


def default_workers(config: ServerConfig, asked: int | None) -> int:
    """``--workers`` as given, else one process per CPU: one Python process uses one CPU, and
    a boot storm is many independent transfers the kernel spreads over the workers.  A
    socket-activated server has one inherited socket, which cannot be shared out: 1."""
    if asked is not None:
        return asked
    if config.inherited_fds:
        return 1
    return max(1, min(64, len(os.sched_getaffinity(0))))


def _start_workers(config: ServerConfig, count: int, metrics: MetricsServer | None = None,
                   ) -> tuple[TftpServer, tuple[int, ...], list[socket.socket]]:
    """Bind every worker's sockets in this process (errors stay one clear line), then fork
    workers 2..count; returns this process's server, the children's pids and (with
    `metrics`, the parent's bound endpoint) the parent's ends of the channels the children
    report their counts on."""
    if count == 1:
        server = TftpServer(config)
        server.bind()  # before trio.run: a busy port is one clear line, not a traceback
        return server, (), []
    if config.inherited_fds:
        raise ConfigError("--workers > 1 needs --listen ADDR:PORT (systemd passes one socket)")
    limits = SessionLimits(config.max_sessions, config.max_sessions_per_ip, shared=True)
    # Each request goes to the worker with the fewest transfers (tftpd/handoff.py).
    inboxes, outboxes = Handoff.pairs(count)
    first = TftpServer(replace(config, reuse_port=True, worker=f"1/{count}"))
    first.share_limits(limits)
    first.bind()
    specs = first.bound_specs()
    others = []
    try:
        for i in range(2, count + 1):
            srv = TftpServer(replace(config, listen=specs, reuse_port=True,
                                     worker=f"{i}/{count}"))
            srv.share_limits(limits)
            srv.bind()
            others.append(srv)
    except BaseException:
        for srv in [first, *others]:
            srv.close()
        for sock in [*inboxes, *outboxes]:
            sock.close()
        raise
    pids = []
    channels: list[socket.socket] = []
    for i, srv in enumerate(others):
        parent_end, child_end = channel_pair() if metrics is not None else (None, None)
        pid = os.fork()
        if pid == 0:  # the child serves only its own sockets
            _die_with_parent()
            for other in [first, *others[:i], *others[i + 1:]]:
                other.close()
            for end in [*channels, parent_end]:
                if end is not None:
                    end.close()
            if metrics is not None:
                metrics.close_socket()
            srv.share_handoff(Handoff.for_worker(i + 1, inboxes, outboxes))
            try:
                trio.run(_run, srv, (), child_end)
                code = 0
            except BaseException:
                log.exception("worker %s failed", srv.config.worker)
                code = 1
            logging.shutdown()
            os._exit(code)
        srv.close()
        pids.append(pid)
        if parent_end is not None and child_end is not None:
            child_end.close()
            channels.append(parent_end)
    first.share_handoff(Handoff.for_worker(0, inboxes, outboxes))
    return first, tuple(pids), channels


def _die_with_parent() -> None:
    """A worker must not outlive the process systemd (or a test) supervises: ask the kernel
    for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        log.warning("cannot tie worker to its parent (prctl unavailable)")


def _reap(children: tuple[int, ...]) -> int:
    """Wait for the workers; 1 if one failed.

    The parent forwards SIGTERM to its workers and sends it once more on the way out (in
    case it stopped for another reason).  That second signal can reach a worker after its
    trio loop has ended and restored the default handler: dying of it is the stop we asked
    for, not a failure.
    """
    status = 0
    for pid in children:
        _, code = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(code) not in (0, -signal.SIGTERM):
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # tftpy logs every packet it encodes at DEBUG; our own lines say what matters.
    logging.getLogger("tftpy").setLevel(max(logging.INFO, logging.getLogger().level))
    if args.malloc_policy == "tuned":  # before any thread or worker exists: all inherit it
        malloc.apply()
    try:
        config = config_from_args(args)
        if not config.root.is_dir():
            log.warning("root is not a directory (yet) root=%s", config.root)
        collector = TftpCollector()
        metrics = None
        if args.metrics is not None:  # bound before any fork: a busy port stops us here
            metrics = bind_metrics(args.metrics, [collector], "vfsroot-tftpd")
        server, children, channels = _start_workers(
            config, default_workers(config, args.workers), metrics)
    except (ConfigError, MetricsError) as exc:
        print(f"vfsroot-tftpd: {exc}", file=sys.stderr)
        return 1
    try:
        if metrics is not None:  # after the fork: the endpoint's thread lives here only
            collector.attach(WorkerMetrics(server), channels)
            metrics.start()
        trio.run(_run, server, children)
    except KeyboardInterrupt:
        pass
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return _reap(children)


if __name__ == "__main__":
    sys.exit(main())
