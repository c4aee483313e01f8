"""`vfsroot serve --metrics`: scrape a running daemon over HTTP, parse the answer with
prometheus_client's parser, and check that FUSE work and disk attaches move the counters they
should.  Plus the collector alone against a fake disk manager (appliances, attach seconds)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from vfsroot.fs import VfsOperations
from vfsroot.metrics import VfsrootCollector
from vfsroot.sources import SourceRoot

from ..scrape import samples_of, scrape
from .conftest import force_unmount, live, mounted, vfsroot_cmd

REPO = Path(__file__).parents[2]


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after
            if k.startswith("vfsroot_") and after[k] != before.get(k, 0.0)}


class MetricsDaemon:
    """`vfsroot serve --metrics 127.0.0.1:0` in a subprocess; the URL comes from its log."""

    def __init__(self, source: Path, mountpoint: Path, log: Path, *extra: str) -> None:
        self.mountpoint = mountpoint
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 (closed in stop)
        env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        self.proc = subprocess.Popen(
            vfsroot_cmd("serve", "--source", str(source), "--mount", str(mountpoint),
                        "--metrics", "127.0.0.1:0", *extra),
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.url = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = re.search(r"metrics endpoint daemon=vfsroot url=(\S+)", self.log())
            if m and mounted(mountpoint) and live(mountpoint):
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"vfsroot serve exited {self.proc.returncode}:\n"
                                     + self.log())
            time.sleep(0.05)
        self.stop()
        raise AssertionError("daemon or metrics endpoint not up:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            return self.proc.returncode
        finally:
            force_unmount(self.mountpoint)
            self._log.close()


@pytest.fixture
def metrics_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "default").mkdir(parents=True)
    (source / "default" / "vmlinuz").write_bytes(os.urandom(5000))
    (source / "10.0.0.5").mkdir()
    (source / "10.0.0.5" / "own.bin").write_bytes(os.urandom(7000))
    (source / "10.0.0.6").mkdir()
    return source


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[MetricsDaemon]]:
    started: list[MetricsDaemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.mount
def test_reads_and_lookups_are_counted_by_layer(metrics_source: Path, tmp_path: Path,
                                                daemons: list[MetricsDaemon]) -> None:
    (metrics_source / "10.0.0.8.nbd").write_text("{}")  # a client by its config alone
    mnt = tmp_path / "mnt"
    d = MetricsDaemon(metrics_source, mnt, tmp_path / "daemon.log", "--no-disks")
    daemons.append(d)
    before = scrape(d.url)
    assert before["vfsroot_clients"] == 3
    assert before["vfsroot_disks{state=ready}"] == 0
    assert before["vfsroot_disk_attach_failures_total"] == 0

    own = mnt / "10.0.0.5" / "own.bin"
    kernel = mnt / "10.0.0.5" / "vmlinuz"
    assert sha256(own) == sha256(metrics_source / "10.0.0.5" / "own.bin")
    assert sha256(kernel) == sha256(metrics_source / "default" / "vmlinuz")
    after = scrape(d.url)
    changed = moved(before, after)
    # every byte read through FUSE is counted once, under the layer that served it
    assert changed["vfsroot_fuse_read_bytes_total{layer=client}"] == 7000
    assert changed["vfsroot_fuse_read_bytes_total{layer=default}"] == 5000
    assert changed["vfsroot_fuse_reads_total{layer=client}"] >= 1
    assert changed["vfsroot_fuse_reads_total{layer=default}"] >= 1
    assert changed["vfsroot_fuse_lookups_total{layer=client}"] >= 1  # own.bin
    assert changed["vfsroot_fuse_lookups_total{layer=default}"] >= 1  # vmlinuz
    assert not [k for k in changed if "errors" in k or "disk" in k], changed
    # a missing file is an answer, not an error
    assert not (mnt / "10.0.0.5" / "nope").exists()
    assert not [k for k in moved(after, scrape(d.url)) if "errors" in k]
    assert d.stop() == 0, d.log()


@pytest.mark.mount
def test_a_failed_attach_is_counted_and_its_eio_blamed_on_the_disk(
        metrics_source: Path, tmp_path: Path, daemons: list[MetricsDaemon]) -> None:
    """A disk whose NBD server is down fails at once (the overlay cannot be made, no appliance
    is launched): the failure, the disk state and the EIO of a lookup are all counted."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    (metrics_source / "10.0.0.9.nbd").write_text(json.dumps(
        {"url": f"nbd://127.0.0.1:{port}/x", "mounts": [{"partition": 1, "mountpoint": "/"}]}))
    mnt = tmp_path / "mnt"
    d = MetricsDaemon(metrics_source, mnt, tmp_path / "daemon.log", "--retry-min", "600")
    daemons.append(d)
    deadline = time.monotonic() + 90
    while (now := scrape(d.url))["vfsroot_disks{state=failed}"] != 1:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.5)
    assert now["vfsroot_disk_attach_failures_total"] == 1
    assert now["vfsroot_disk_attach_seconds_count"] == 0
    assert now["vfsroot_appliances"] == 0
    with pytest.raises(OSError) as caught:
        (mnt / "10.0.0.9" / "vmlinuz").stat()
    assert caught.value.errno == errno.EIO
    changed = moved(now, scrape(d.url))
    assert changed["vfsroot_fuse_errors_total{layer=disk}"] >= 1
    assert not [k for k in changed if "errors" in k and "layer=disk" not in k], changed
    assert d.stop() == 0, d.log()


def test_a_busy_metrics_port_is_one_line_and_exit_7(metrics_source: Path,
                                                    tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        proc = subprocess.run(
            vfsroot_cmd("serve", "--source", str(metrics_source), "--mount",
                        str(tmp_path / "mnt"), "--no-disks", "--metrics", f"127.0.0.1:{port}"),
            capture_output=True, text=True, timeout=30, cwd=REPO)
    finally:
        busy.close()
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"vfsroot: --metrics 127.0.0.1:{port}: cannot listen: Address already in use")
    assert "Traceback" not in proc.stderr
    assert not mounted(tmp_path / "mnt")
    bad = subprocess.run(vfsroot_cmd("serve", "--source", str(metrics_source), "--metrics",
                                     "9101"), capture_output=True, text=True, timeout=30,
                         cwd=REPO)
    assert bad.returncode == 2 and "--metrics wants HOST:PORT" in bad.stderr, bad.stderr


class FakeDisks:
    """The shape `DiskManager.status()` promises, and its attach hook."""

    def __init__(self, status: dict[str, dict[str, Any]]) -> None:
        self._status = status
        self.on_attach_result = None

    def status(self) -> dict[str, dict[str, Any]]:
        return self._status


async def test_collector_reports_disks_appliances_and_attach_seconds(
        metrics_source: Path) -> None:
    disks = FakeDisks({
        "10.0.0.5": {"state": "ready", "appliance_rss_mb": 450.5},
        "10.0.0.6": {"state": "failed", "appliance_rss_mb": None},
        "10.0.0.7": {"state": "attaching", "appliance_rss_mb": None},
        "10.0.0.8": {"state": "ready", "appliance_rss_mb": 300.0},
    })
    source = SourceRoot(metrics_source, None)
    ops = VfsOperations(source, None)
    assert ops.counts is None  # off unless a collector is made
    collector = VfsrootCollector(source, ops, disks, trio.lowlevel.current_trio_token())
    assert ops.counts is collector.counts
    assert disks.on_attach_result == collector.attach_result
    disks.on_attach_result("10.0.0.5", 31.0, None)
    disks.on_attach_result("10.0.0.8", 4.0, None)
    disks.on_attach_result("10.0.0.6", 0.4, "qemu-img exited with error status 1")
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    text = (await trio.to_thread.run_sync(generate_latest, registry)).decode()
    s = samples_of(text)
    assert s["vfsroot_clients"] == 2
    assert s["vfsroot_disks{state=ready}"] == 2
    assert s["vfsroot_disks{state=failed}"] == 1
    assert s["vfsroot_disks{state=attaching}"] == 1
    assert s["vfsroot_disks{state=detached}"] == 0
    assert s["vfsroot_appliances"] == 2
    assert s["vfsroot_appliance_rss_bytes{appliance=10.0.0.5}"] == 450.5 * 1024 * 1024
    assert s["vfsroot_appliance_rss_bytes{appliance=10.0.0.8}"] == 300.0 * 1024 * 1024
    assert s["vfsroot_disk_attach_failures_total"] == 1
    assert s["vfsroot_disk_attach_seconds_count"] == 2
    assert s["vfsroot_disk_attach_seconds_sum"] == 35.0
    assert s["vfsroot_disk_attach_seconds_bucket{le=2.5}"] == 0
    assert s["vfsroot_disk_attach_seconds_bucket{le=5.0}"] == 1
    assert s["vfsroot_disk_attach_seconds_bucket{le=30.0}"] == 1
    assert s["vfsroot_disk_attach_seconds_bucket{le=45.0}"] == 2
    assert s["vfsroot_disk_attach_seconds_bucket{le=+Inf}"] == 2
    for layer in ("client", "disk", "default"):
        assert s[f"vfsroot_fuse_errors_total{{layer={layer}}}"] == 0
