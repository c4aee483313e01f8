"""vfsroot-tftpd --metrics: scrape a running server over HTTP, parse the answer with
prometheus_client's own parser, and check that transfers move exactly the counters they should
(also with --workers 2, whose counts must all reach the one endpoint)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tftpd.client import TftpError, fetch

from ..scrape import scrape
from .conftest import CLIENT_A
from .helpers import DaemonProcess, RawClient, file_sha256

PY = sys.executable
BLKSIZE = 1468


async def start(args: list[str]) -> tuple[DaemonProcess, tuple[str, int], str]:
    proc = await trio.lowlevel.open_process(
        [PY, "-c", "import sys; from tftpd.cli import main; sys.exit(main())", *args],
        stderr=subprocess.PIPE)
    d = DaemonProcess(proc)
    try:
        metrics = await d.read_until(rb"metrics endpoint daemon=vfsroot-tftpd url=(\S+)")
        tftp = await d.read_until(rb"listening addresses=[^ ]*:(\d+)")
    except BaseException:
        proc.kill()
        raise
    return d, ("127.0.0.1", int(tftp.group(1))), metrics.group(1).decode()


def moved(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    """The samples under `prefix` whose value changed, and by how much."""
    return {k: after[k] - before.get(k, 0.0) for k in after
            if k.startswith(prefix) and after[k] != before.get(k, 0.0)}


async def test_a_transfer_moves_the_counters_it_should(tree: Path) -> None:
    d, addr, url = await start(["--root", str(tree), "--listen", "127.0.0.1:0", "--workers", "1",
                                "--metrics", "127.0.0.1:0"])
    try:
        before = await trio.to_thread.run_sync(scrape, url)
        assert before["vfsroot_tftpd_transfers_total{outcome=completed}"] == 0
        assert before["vfsroot_tftpd_workers_reporting"] == 1
        assert before["vfsroot_tftpd_active_transfers"] == 0

        size = (tree / CLIENT_A / "secret-a").stat().st_size  # 70000: 47 blocks of 1468
        res = await fetch(addr, "secret-a", blksize=BLKSIZE, bind=CLIENT_A)
        assert res.sha256 == file_sha256(tree / CLIENT_A / "secret-a")
        after = await trio.to_thread.run_sync(scrape, url)
        changed = moved(before, after, "vfsroot_tftpd_")
        buckets = {k: v for k, v in changed.items() if "_bucket{" in k}
        rest = {k: v for k, v in changed.items() if k not in buckets}
        assert rest == {
            "vfsroot_tftpd_requests_total": 1,
            "vfsroot_tftpd_transfers_total{outcome=completed}": 1,
            "vfsroot_tftpd_inline_opens_total": 1,  # (a local tree: tests/tftpd/conftest)
            "vfsroot_tftpd_sent_bytes_total": size,
            "vfsroot_tftpd_sent_blocks_total": size // BLKSIZE + 1,
            "vfsroot_tftpd_transfer_seconds_count": 1,
            "vfsroot_tftpd_transfer_seconds_sum": rest["vfsroot_tftpd_transfer_seconds_sum"],
        }
        took = rest["vfsroot_tftpd_transfer_seconds_sum"]
        assert 0 < took <= res.seconds + 0.5
        # one observation: every bucket from the first one holding `took` up to +Inf moved by 1
        assert set(buckets.values()) == {1}
        assert set(buckets) == {f"vfsroot_tftpd_transfer_seconds_bucket{{le={le}}}"
                                for le in _buckets_at_least(after, took)}
        assert "vfsroot_tftpd_transfer_seconds_bucket{le=+Inf}" in buckets

        # a missing file, a malformed datagram, a stray ACK: each moves its own counter only
        with pytest.raises(TftpError):
            await fetch(addr, "no-such-file", bind=CLIENT_A)
        with RawClient(addr, CLIENT_A) as c:
            c.send_raw(b"\x00\x01no-terminator")
            c.send_raw(b"\x00\x04\x00\x01")  # ACK 1 to a listen socket
            await c.quiet(0.3)
        last = await trio.to_thread.run_sync(scrape, url)
        changed = moved(after, last, "vfsroot_tftpd_")
        assert changed["vfsroot_tftpd_requests_total"] == 1
        assert changed["vfsroot_tftpd_transfers_total{outcome=not_found}"] == 1
        assert changed["vfsroot_tftpd_malformed_datagrams_total"] == 1
        assert changed["vfsroot_tftpd_stray_datagrams_total"] == 1
        assert changed["vfsroot_tftpd_transfer_seconds_count"] == 1
        assert "vfsroot_tftpd_sent_bytes_total" not in changed
        assert "vfsroot_tftpd_transfers_total{outcome=completed}" not in changed
        # the endpoint also has the process's own resource metrics
        assert last["process_resident_memory_bytes"] > 0
        assert await d.stop() == 0, d.log.decode()
    finally:
        d.proc.kill()


def _buckets_at_least(samples: dict[str, float], seconds: float) -> list[str]:
    """The `le` labels of buckets a transfer of `seconds` surely falls in."""
    out = []
    for key in samples:
        m = re.fullmatch(r"vfsroot_tftpd_transfer_seconds_bucket\{le=(.+)\}", key)
        if m and (m.group(1) == "+Inf" or float(m.group(1)) >= seconds):
            out.append(m.group(1))
    return out


async def test_every_workers_counts_reach_the_one_endpoint(tree: Path) -> None:
    """--workers 2: transfers land on both processes (the kernel hashes client ports), and the
    parent's endpoint reports their sum."""
    d, addr, url = await start(["--root", str(tree), "--listen", "127.0.0.1:0", "--workers", "2",
                                "--metrics", "127.0.0.1:0"])
    try:
        await d.read_until(rb"worker=2/2")
        before = await trio.to_thread.run_sync(scrape, url)
        assert before["vfsroot_tftpd_workers_reporting"] == 2
        want = file_sha256(tree / CLIENT_A / "secret-a")
        size = (tree / CLIENT_A / "secret-a").stat().st_size
        for _ in range(12):
            res = await fetch(addr, "secret-a", blksize=BLKSIZE, bind=CLIENT_A)
            assert res.sha256 == want
        after = await trio.to_thread.run_sync(scrape, url)
        changed = moved(before, after, "vfsroot_tftpd_")
        assert changed["vfsroot_tftpd_transfers_total{outcome=completed}"] == 12
        assert changed["vfsroot_tftpd_requests_total"] == 12
        assert changed["vfsroot_tftpd_sent_bytes_total"] == 12 * size
        assert changed["vfsroot_tftpd_sent_blocks_total"] == 12 * (size // BLKSIZE + 1)
        assert changed["vfsroot_tftpd_transfer_seconds_count"] == 12
        assert after["vfsroot_tftpd_workers_reporting"] == 2
        assert await d.stop() == 0, d.log.decode()
        # each worker's own stop line says it served some of them: both really took part
        stopped = re.findall(rb"stopped worker=(\d)/2 stats=requests=(\d+)", d.log)
        assert sorted(w for w, _ in stopped) == [b"1", b"2"], d.log.decode()
        assert all(int(n) > 0 for _, n in stopped), "one worker got no request at all"
        assert sum(int(n) for _, n in stopped) == 12
    finally:
        d.proc.kill()


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-c", "import sys; from tftpd.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, timeout=30)


def test_bad_metrics_addresses_are_one_line_errors(tmp_path: Path) -> None:
    for bad in ("9101", "localhost", "127.0.0.1:http", "127.0.0.1:70000", "::1:9101"):
        proc = run_cli(["--root", str(tmp_path), "--listen", "127.0.0.1:0", "--metrics", bad])
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "--metrics" in proc.stderr and "Traceback" not in proc.stderr
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        for workers in ("1", "2"):
            proc = run_cli(["--root", str(tmp_path), "--listen", "127.0.0.1:0", "--workers",
                            workers, "--metrics", f"127.0.0.1:{port}"])
            assert proc.returncode == 1, proc.stderr
            errors = [line for line in proc.stderr.splitlines()
                      if line.startswith("vfsroot-tftpd:")]
            assert errors == [f"vfsroot-tftpd: --metrics 127.0.0.1:{port}: cannot listen: "
                              "Address already in use"], proc.stderr
            assert "Traceback" not in proc.stderr
    finally:
        busy.close()


async def test_off_by_default_no_endpoint(tree: Path) -> None:
    """Without --metrics nothing listens on TCP and no transfer hook is installed."""
    proc = await trio.lowlevel.open_process(
        [PY, "-c", "import sys; from tftpd.cli import main; sys.exit(main())", "--root",
         str(tree), "--listen", "127.0.0.1:0", "--workers", "1"], stderr=subprocess.PIPE)
    d = DaemonProcess(proc)
    try:
        m = await d.read_until(rb"listening addresses=[^ ]*:(\d+)")
        res = await fetch(("127.0.0.1", int(m.group(1))), "whoami", bind=CLIENT_A)
        assert res.size == len(CLIENT_A) + 1
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True,
                                   check=True).stdout
        assert f"pid={proc.pid}," not in listening
        assert b"metrics endpoint" not in d.log
        assert await d.stop() == 0
    finally:
        proc.kill()
    from tftpd.server import ServerConfig, TftpServer
    assert TftpServer(ServerConfig(root=tree)).on_transfer is None
