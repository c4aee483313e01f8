"""The ``--metrics HOST:PORT`` endpoint both daemons share.

Metrics are off unless ``--metrics`` is given; then the daemon serves prometheus-client's WSGI
app (``make_wsgi_app``) from the standard library's WSGI server in a daemon thread, bound to that
address, with a registry holding the daemon's collector.  Collectors read the daemon's live
counters when Prometheus scrapes, so serving requests costs nothing extra whether metrics are
on or off; only histograms are fed as events happen, and only when metrics are on (see
docs/operations.md, "Metrics").

The exposition format is the library's: collectors yield its metric families, never text.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class MetricsError(Exception):
    """The endpoint cannot start (address in use, no permission): one line for the operator."""


@dataclass(frozen=True)
class MetricsAddress:
    """Where ``/metrics`` listens; port 0 picks a free port (logged)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_metrics_address(text: str) -> MetricsAddress:
    """``HOST:PORT`` or ``[V6]:PORT``; an argparse type, so a mistake is a usage error (exit 2)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(
            f"--metrics wants HOST:PORT (e.g. 127.0.0.1:9101), got {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise argparse.ArgumentTypeError(f"--metrics: missing ']' in {text!r}")
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            f"--metrics: write an IPv6 address in brackets, [ADDR]:PORT, not {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--metrics: bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--metrics: port out of range in {text!r}")
    return MetricsAddress(host, port)


#: Connections served at once; more are closed on arrival.  A scraper needs one; the bound
#: keeps clients that connect and never finish from taking a thread and a descriptor each
#: until the daemon's opens (FUSE, TFTP) fail for lack of descriptors.
MAX_CONNECTIONS = 16
#: Seconds a connection may take to send its request (and to take the answer).
CONNECTION_TIMEOUT = 10.0


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, at most `MAX_CONNECTIONS` at once, none left behind at exit."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("metrics endpoint: %d connections open, closing one from %s",
                        MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is one debug line, not a traceback on stderr
        (socketserver's default) per idle connection."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (TimeoutError, ConnectionError)):
            log.debug("metrics endpoint: %s from %s: connection dropped",
                      type(exc).__name__, client_address[0])
            return
        super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: a scrape every 15 s is not news.  A client that does not send
    its request within `CONNECTION_TIMEOUT` is dropped."""

    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """The endpoint: bound by `bind_metrics`, serving once `start` runs its thread.

    Binding and serving are separate so that a daemon that forks (``vfsroot-tftpd --workers``)
    can fail on a busy address before any worker exists, and start the thread only after the
    fork (threads do not survive a fork; the children close the socket with `close_socket`).
    """

    def __init__(self, httpd: WSGIServer, daemon: str) -> None:
        self._httpd = httpd
        self._daemon = daemon
        self._thread: threading.Thread | None = None
        host, port = httpd.server_address[:2]
        self.address = MetricsAddress(str(host), int(port))

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="metrics")
        self._thread.start()
        log.info("metrics endpoint daemon=%s url=http://%s/metrics", self._daemon, self.address)
        return self

    def close_socket(self) -> None:
        """In a forked child: drop the inherited listening socket, serve nothing."""
        self._httpd.socket.close()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()


def bind_metrics(address: MetricsAddress, collectors: Iterable[Collector],
                 daemon: str) -> MetricsServer:
    """Bind the endpoint for `collectors` (plus this process's CPU, memory and file
    descriptor metrics); raises MetricsError with one line for the operator."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        server_class = type("MetricsHTTPServer", (_ThreadingServer,),
                            {"address_family": infos[0][0]})
        httpd = make_server(address.host, address.port, make_wsgi_app(registry), server_class,
                            handler_class=_QuietHandler)
    except OSError as e:
        raise MetricsError(f"--metrics {address}: cannot listen: {e.strerror or e}") from None
    return MetricsServer(httpd, daemon)


class BucketCounts:
    """A histogram's raw counts, cheap to feed from the event loop and to merge across
    processes: per-bucket (not cumulative) counts, a sum and a lock for the scrape thread."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> dict[str, object]:
        """JSON-able counts: what a worker process sends its parent."""
        with self._lock:
            return {"counts": list(self._counts), "sum": self._sum}


def histogram_family(name: str, documentation: str, bounds: Sequence[float],
                     snapshots: Iterable[dict]) -> HistogramMetricFamily:
    """One histogram from the snapshots of one or more `BucketCounts` with the same bounds."""
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for snap in snapshots:
        for i, n in enumerate(snap["counts"][: len(counts)]):
            counts[i] += int(n)
        total += float(snap["sum"])
    buckets = []
    running = 0
    for bound, n in zip([*map(_bucket_label, bounds), "+Inf"], counts, strict=True):
        running += n
        buckets.append((bound, running))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _bucket_label(bound: float) -> str:
    return repr(float(bound))
