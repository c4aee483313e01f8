"""vfsroot-tftpd's Prometheus metrics: the server's counters, read when Prometheus scrapes.

`TftpServer.stats` already counts everything an operator watches (transfers by outcome, bytes,
blocks, retransmits, duplicate ACKs, busy rejections, malformed datagrams), so the collector
only reads it at scrape time: the per-packet path does no extra work.  The one thing that must
be recorded as it happens is how long each transfer took; `WorkerMetrics` hooks
`TftpServer.on_transfer` (called once per finished transfer) into a bucket counter, and only
when ``--metrics`` is given.

With ``--workers N`` the endpoint lives in the parent process and each forked worker answers
the parent over its own ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair: on every scrape the parent
asks each worker for a snapshot (its counters and its histogram counts, as JSON) and adds them
up.  No shared files, no per-packet cost, and a scrape sees every worker's counts as of that
scrape.  A worker that does not answer within `WORKER_TIMEOUT` is left out of that scrape
(``vfsroot_tftpd_workers_reporting`` says how many answered).
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vfsroot.exporter import BucketCounts, histogram_family

from .server import TftpServer
from .session import SessionResult

log = logging.getLogger(__name__)

#: Transfer durations, seconds: tsize probes end at once, boot files take 0.1-60 s.
TRANSFER_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: How long the parent waits for one worker's snapshot during a scrape.
WORKER_TIMEOUT = 2.0

#: `ServerStats` field -> the ``outcome`` label of ``vfsroot_tftpd_transfers_total``.
OUTCOMES = {
    "completed": "completed",
    "not_found": "not_found",
    "refused": "refused",
    "aborted_by_client": "aborted_by_client",
    "client_gone": "client_gone",
    "timeouts": "timeout",
    "errors": "error",
    "shutdown": "shutdown",
}

#: `ServerStats` field -> (counter name without _total, help).
COUNTERS = {
    "requests": ("vfsroot_tftpd_requests", "Read requests received (before limits)."),
    "bytes_sent": ("vfsroot_tftpd_sent_bytes", "File bytes sent in DATA packets."),
    "blocks_sent": ("vfsroot_tftpd_sent_blocks", "DATA packets sent, retransmissions excluded."),
    "retransmits": ("vfsroot_tftpd_retransmits", "DATA packets sent again after a timeout or "
                    "a duplicate ACK."),
    "duplicate_acks": ("vfsroot_tftpd_duplicate_acks", "ACKs received twice or out of date."),
    "busy_rejections": ("vfsroot_tftpd_busy_rejections", "Requests refused by --max-sessions or "
                        "--max-sessions-per-ip."),
    "duplicate_requests": ("vfsroot_tftpd_duplicate_requests", "Re-sent RRQs of a transfer "
                           "already running (not started twice)."),
    "handed_off": ("vfsroot_tftpd_handed_off_requests", "Requests admitted by one worker "
                   "process and passed to the one with the fewest transfers (--workers)."),
    "opened_inline": ("vfsroot_tftpd_inline_opens", "Opens answered on the event loop (a "
                      "cached name on a local filesystem: the file, or that it is missing) "
                      "rather than by the helper process."),
    "malformed": ("vfsroot_tftpd_malformed_datagrams", "Datagrams on a listen socket that are "
                  "not valid TFTP requests."),
    "stray_datagrams": ("vfsroot_tftpd_stray_datagrams", "Valid TFTP packets that are not "
                        "requests, sent to a listen socket."),
}


class WorkerMetrics:
    """One process's share: its server's counters and its transfer-seconds histogram."""

    def __init__(self, server: TftpServer) -> None:
        self.server = server
        self.seconds = BucketCounts(TRANSFER_SECONDS_BUCKETS)
        server.on_transfer = self._observe

    def _observe(self, result: SessionResult) -> None:
        self.seconds.observe(result.seconds)

    def snapshot(self) -> dict[str, Any]:
        return {"stats": self.server.stats.as_dict(), "seconds": self.seconds.snapshot()}


async def answer_parent(channel: socket.socket, worker: WorkerMetrics) -> None:
    """In a worker process: answer each request of the parent with a snapshot, until the
    parent closes its end."""
    sock = trio.socket.from_stdlib_socket(channel)
    with sock:
        while True:
            try:
                request = await sock.recv(64)
            except OSError:
                return
            if not request:
                return
            reply = {"seq": request.decode(errors="replace"), **worker.snapshot()}
            try:
                await sock.send(json.dumps(reply).encode())
            except OSError:
                return


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(parent end, worker end); made before the fork, each side closes the other end."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class TftpCollector(Collector):
    """Reads this process's counters and asks every worker for theirs, at scrape time."""

    def __init__(self) -> None:
        self.local: WorkerMetrics | None = None
        self.channels: list[socket.socket] = []
        self._lock = threading.Lock()  # scrapes may overlap; one exchange per channel at once
        self._seq = itertools.count()

    def attach(self, local: WorkerMetrics, channels: list[socket.socket] | None = None) -> None:
        """What to read: this process's server, and the channels to the other workers."""
        self.local = local
        self.channels = list(channels or ())

    def _ask(self, channel: socket.socket) -> dict[str, Any] | None:
        seq = str(next(self._seq))
        try:
            channel.settimeout(WORKER_TIMEOUT)
            channel.send(seq.encode())
            while True:  # skip a late answer to an earlier, timed-out request
                reply = json.loads(channel.recv(1 << 16))
                if reply.get("seq") == seq:
                    return reply
        except (OSError, ValueError) as e:
            log.warning("metrics: a worker did not answer error=%r", e)
            return None

    def snapshots(self) -> list[dict[str, Any]]:
        found = [self.local.snapshot()] if self.local is not None else []
        with self._lock:
            for channel in self.channels:
                snap = self._ask(channel)
                if snap is not None:
                    found.append(snap)
        return found

    def describe(self) -> Iterator[Any]:
        return iter(())  # families depend on nothing at registration; skip the test scrape

    def collect(self) -> Iterator[Any]:
        snaps = self.snapshots()
        total: dict[str, int] = {}
        for snap in snaps:
            for key, value in snap["stats"].items():
                total[key] = total.get(key, 0) + int(value)
        transfers = CounterMetricFamily(
            "vfsroot_tftpd_transfers", "Finished transfers by outcome.", labels=["outcome"])
        for field, outcome in OUTCOMES.items():
            transfers.add_metric([outcome], total.get(field, 0))
        yield transfers
        for field, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=total.get(field, 0))
        yield GaugeMetricFamily("vfsroot_tftpd_active_transfers", "Transfers running now.",
                                value=total.get("active", 0))
        yield histogram_family(
            "vfsroot_tftpd_transfer_seconds", "Duration of finished transfers, any outcome.",
            TRANSFER_SECONDS_BUCKETS, (s["seconds"] for s in snaps))
        yield GaugeMetricFamily(
            "vfsroot_tftpd_workers_reporting",
            "Server processes whose counts are in this scrape (less than --workers: a worker "
            "did not answer).", value=len(snaps))
