"""The shared --metrics endpoint: address parsing, IPv6 binding, histogram buckets."""

from __future__ import annotations

import argparse
import socket
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
