"""The shared --metrics endpoint: address parsing, IPv6 binding, histogram buckets."""

from __future__ import annotations

import argparse
import socket
import time
import urllib.request

import pytest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from vfsroot.exporter import (
    BucketCounts,
    MetricsAddress,
    bind_metrics,
    histogram_family,
    parse_metrics_address,
)


def test_addresses() -> None:
    assert parse_metrics_address("127.0.0.1:9101") == MetricsAddress("127.0.0.1", 9101)
    assert parse_metrics_address("[::1]:9101") == MetricsAddress("::1", 9101)
    assert parse_metrics_address("localhost:0") == MetricsAddress("localhost", 0)
    assert str(MetricsAddress("::1", 9101)) == "[::1]:9101"
    for bad in ("9101", ":9101", "::1:9101", "[::1:9101", "host:-1", "host:65536", "host:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_metrics_address(bad)


def _have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class One:
    def describe(self):
        return iter(())

    def collect(self):
        yield CounterMetricFamily("vfsroot_test_things", "Things.", value=3)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_endpoint_serves_the_collectors_on_v4_and_v6(host: str) -> None:
    if ":" in host and not _have_ipv6():
        pytest.skip("no IPv6 loopback on this machine")
    server = bind_metrics(MetricsAddress(host, 0), [One()], "test").start()
    try:
        assert server.address.port != 0
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.close()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["vfsroot_test_things_total"] == 3
    assert samples["process_open_fds"] > 0


def test_bucket_counts_merge_across_processes() -> None:
    a, b = BucketCounts((1.0, 5.0)), BucketCounts((1.0, 5.0))
    for v in (0.5, 1.0, 3.0):
        a.observe(v)
    for v in (7.0, 5.0):
        b.observe(v)
    family = histogram_family("x_seconds", "X.", (1.0, 5.0), [a.snapshot(), b.snapshot()])
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("x_seconds_bucket", "1.0")] == 2  # 0.5 and 1.0 (le is inclusive)
    assert got[("x_seconds_bucket", "5.0")] == 4
    assert got[("x_seconds_bucket", "+Inf")] == 5
    assert got[("x_seconds_count", None)] == 5
    assert got[("x_seconds_sum", None)] == 16.5


#: Longer than the endpoint's timeout (10 s), shorter than for ever.
IDLE_DEADLINE = 20.0


def test_metrics_endpoint_drops_a_client_that_never_finishes_its_request() -> None:
    """A client that connects and never ends its request would hold a thread and a
    descriptor of the daemon for ever: it is dropped after a timeout."""
    server = bind_metrics(MetricsAddress("127.0.0.1", 0), [One()], "test").start()
    try:
        with socket.create_connection(("127.0.0.1", server.address.port), timeout=5) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
            c.settimeout(IDLE_DEADLINE)
            started = time.monotonic()
            try:
                data = c.recv(65536)  # b"" (closed) or a 408 once the server gives up
            except TimeoutError:
                data = None
            assert data is not None, (
                f"the endpoint still held a half-sent request after {IDLE_DEADLINE:.0f}s "
                f"(one thread and one descriptor per such client, for ever)")
            assert time.monotonic() - started < IDLE_DEADLINE
    finally:
        server.close()


def test_metrics_endpoint_serves_a_bounded_number_of_connections_at_once() -> None:
    """More idle connections than the bound are closed on arrival, and a scrape still gets
    through once the idle ones time out or go."""
    from vfsroot import exporter
    server = bind_metrics(MetricsAddress("127.0.0.1", 0), [One()], "test").start()
    idle = []
    try:
        for _ in range(exporter.MAX_CONNECTIONS):
            c = socket.create_connection(("127.0.0.1", server.address.port), timeout=5)
            c.sendall(b"GET /metrics HTTP/1.1\r\n")
            idle.append(c)
        time.sleep(0.3)  # the server has taken them all
        extra = socket.create_connection(("127.0.0.1", server.address.port), timeout=5)
        extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert extra.recv(100) == b""  # closed at once: no thread for it
        extra.close()
        for c in idle:
            c.close()
        time.sleep(0.3)
        url = f"http://127.0.0.1:{server.address.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert b"vfsroot_test_things" in r.read()
    finally:
        for c in idle:
            c.close()
        server.close()
