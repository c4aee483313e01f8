"""`vfsroot serve`'s Prometheus metrics, read from the running daemon at scrape time.

What is read when Prometheus scrapes (nothing is done per request for these):
* known clients: `SourceRoot.clients()` (one directory listing of the source root);
* disks by state, appliances and their memory: `DiskManager.status()`;
* FUSE lookups, reads, bytes read and errors by layer: `VfsOperations.counts`, which exists
  only while metrics are on.

What is recorded as it happens: each finished attach attempt, through
`DiskManager.on_attach_result` (seconds of a successful attach into a histogram, a failure into
a counter).

The scrape runs in the endpoint's thread; the daemon's state lives on the trio loop, so the
collector reads it there (`trio.from_thread.run_sync` with the loop's token) and gets a
consistent copy instead of racing the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .exporter import BucketCounts, histogram_family
from .fs import FsCounters, VfsOperations
from .sources import SourceRoot

log = logging.getLogger(__name__)

#: Attach durations, seconds: KVM attaches take 2-5 s, TCG ones 25-60 s, the timeout 180 s.
ATTACH_SECONDS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0)

#: Always exported (as 0 when empty), so dashboards see every series from the start.
DISK_STATES = ("none", "attaching", "ready", "failed", "detached")
LAYERS = ("client", "disk", "default")


class DiskStatusSource(Protocol):
    """What the collector needs of `vfsroot.disks.DiskManager`."""

    on_attach_result: Any

    def status(self) -> dict[str, dict[str, Any]]: ...


class VfsrootCollector(Collector):
    """Everything `vfsroot serve` exports; see docs/operations.md, "Metrics"."""

    def __init__(self, source: SourceRoot, ops: VfsOperations,
                 disks: DiskStatusSource | None, token: trio.lowlevel.TrioToken) -> None:
        self.source = source
        self.disks = disks
        self.token = token
        self.counts = FsCounters()
        ops.counts = self.counts
        self.attach_seconds = BucketCounts(ATTACH_SECONDS_BUCKETS)
        self.attach_failures = 0
        self._lock = threading.Lock()
        if disks is not None:
            disks.on_attach_result = self.attach_result

    def attach_result(self, client: str, seconds: float, error: str | None) -> None:
        """`DiskManager.on_attach_result`: once per finished attach attempt."""
        if error is None:
            self.attach_seconds.observe(seconds)
        else:
            with self._lock:
                self.attach_failures += 1

    def _on_loop(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]]]:
        """Runs on the trio loop: a copy of the disk status and the FUSE counters."""
        status = self.disks.status() if self.disks is not None else {}
        c = self.counts
        counters = {"lookups": dict(c.lookups), "reads": dict(c.reads),
                    "read_bytes": dict(c.read_bytes), "errors": dict(c.errors)}
        return status, counters

    def describe(self) -> Iterator[Any]:
        return iter(())  # nothing to read before the daemon runs; skip the registration scrape

    def collect(self) -> Iterator[Any]:
        try:
            status, counters = trio.from_thread.run_sync(self._on_loop, trio_token=self.token)
        except trio.RunFinishedError:
            return  # the daemon is stopping
        try:
            clients = len(self.source.clients())
        except OSError as e:
            log.warning("metrics: cannot list the source root error=%r", e)
            clients = 0
        yield GaugeMetricFamily("vfsroot_clients",
                                "Known clients: a directory or a disk config in the source root.",
                                value=clients)
        yield from self._disk_families(status)
        yield from self._fuse_families(counters)

    def _disk_families(self, status: dict[str, dict[str, Any]]) -> Iterator[Any]:
        states = dict.fromkeys(DISK_STATES, 0)
        for entry in status.values():
            state = str(entry.get("state", "none"))
            states[state] = states.get(state, 0) + 1
        disks = GaugeMetricFamily("vfsroot_disks", "Client disks by state.", labels=["state"])
        for state, n in states.items():
            disks.add_metric([state], n)
        yield disks
        yield histogram_family("vfsroot_disk_attach_seconds",
                               "Duration of successful disk attaches (appliance launch and "
                               "mounts).", ATTACH_SECONDS_BUCKETS,
                               [self.attach_seconds.snapshot()])
        with self._lock:
            failures = self.attach_failures
        yield CounterMetricFamily("vfsroot_disk_attach_failures",
                                  "Attach attempts that failed (each is retried with backoff).",
                                  value=failures)
        # One appliance per entry with a live qemu; an entry may name a shared appliance.
        rss: dict[str, float] = {}
        for client, entry in status.items():
            mb = entry.get("appliance_rss_mb")
            if isinstance(mb, (int, float)):
                rss[str(entry.get("appliance", client))] = float(mb) * 1024 * 1024
        yield GaugeMetricFamily("vfsroot_appliances", "Running libguestfs appliances.",
                                value=len(rss))
        memory = GaugeMetricFamily("vfsroot_appliance_rss_bytes",
                                   "Resident memory of each appliance's qemu.",
                                   labels=["appliance"])
        for name, value in sorted(rss.items()):
            memory.add_metric([name], value)
        yield memory

    def _fuse_families(self, counters: dict[str, dict[str, int]]) -> Iterator[Any]:
        for key, name, doc in (
            ("lookups", "vfsroot_fuse_lookups", "FUSE lookups answered, by serving layer."),
            ("reads", "vfsroot_fuse_reads", "FUSE reads answered, by serving layer."),
            ("read_bytes", "vfsroot_fuse_read_bytes", "Bytes returned by FUSE reads, by layer."),
            ("errors", "vfsroot_fuse_errors", "FUSE requests failed by a layer (not 'no such "
             "file'), by layer; 'unknown' when no one layer is to blame."),
        ):
            family = CounterMetricFamily(name, doc, labels=["layer"])
            values = dict.fromkeys(LAYERS, 0) | counters[key]
            for layer, n in sorted(values.items()):
                family.add_metric([layer], n)
            yield family
