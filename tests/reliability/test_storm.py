"""Boot storm, short form (issue 11; the long form is bench/storm.py): 200 client IPs fetch
the same initrd and each its own config at once through `vfsroot serve` + `vfsroot-tftpd`
with default flags.  Every transfer must arrive, with the right sha256."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import procs
from .storm import BLKSIZE, CONFIG, build_trees, client_ips, storm

pytestmark = pytest.mark.mount

CLIENTS = 200
INITRD_SIZE = 1024 * 1024 + 333  # not a multiple of the block size


async def test_boot_storm_200_clients_default_flags(tmp_path: Path, serve_and_tftpd) -> None:
    ips = client_ips(CLIENTS)
    trees = build_trees(tmp_path / "trees", ips, INITRD_SIZE)
    serve, tftpd = serve_and_tftpd(trees.source)
    assert serve.proc is not None
    with procs.PeakSampler({"vfsroot serve": serve.proc.pid, "vfsroot-tftpd": tftpd.pid}) as peak:
        result = await storm(tftpd.address, "vfsroot", trees, ips)
    print(f"\nboot storm ({CLIENTS} clients, config + {INITRD_SIZE} B initrd, blksize {BLKSIZE} "
          f"lock-step):\n  {result.line()}")
    for name in peak.pids:
        print(f"  peak RSS {name}: {peak.peak_kib[name] / 1024:.1f} MiB (tree, sampled)")
    assert result.failed == [], result.failed[:10]
    assert result.corrupt == [], result.corrupt[:10]
    assert result.transfers == 2 * CLIENTS
    assert sorted(result.client_seconds) == sorted(ips)
    assert result.bytes == CLIENTS * INITRD_SIZE + sum(
        (trees.source / ip / CONFIG).stat().st_size for ip in ips)
    assert tftpd.stop() == 0
    log = tftpd.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
