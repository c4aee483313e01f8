"""Many clients, short form (issue 11; the long form is bench/many.py): 1,000 client dirs and
1,000 `.nbd` configs whose NBD server does not exist.  `ls` of the mount, 1,000 config reads
(sha256 each), `vfsroot status` (issue 9: under 1 s with 1,000 configs), and the daemon's
memory, threads and CPU while 1,000 disks fail and back off."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.mount import ServeDaemon

from .many import build_source, disk_clients, measure

pytestmark = pytest.mark.mount

N = 1000


def test_thousand_clients_and_thousand_unreachable_disks(tmp_path: Path) -> None:
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    expected = build_source(source, N)
    mnt.mkdir()
    daemon = ServeDaemon(source, mnt, tmp_path / "vfsroot.log", disks=True).start()
    try:
        assert daemon.proc is not None
        fig = measure(mnt, daemon.proc.pid, expected, N, idle_seconds=5.0)
        print("\nmany clients:\n  " + "\n  ".join(fig.lines()))
        assert fig.reads_bad == []
        # default/ + every client dir + every configured disk client, nothing else
        assert fig.entries == 1 + 2 * N
        assert fig.status_disks == N
        assert fig.states == {"failed": N}, fig.states
        assert fig.qemu == 0
        assert min(fig.status_json) < 1.0, fig.status_json  # issue 9
        assert min(fig.status_text) < 1.0, fig.status_text
        assert fig.idle_cpu < 0.25, "the daemon is busy with 1,000 unreachable disks"
        assert fig.sample is not None and fig.sample.threads < 64, fig.sample
        assert fig.sample.rss_kib < 200 * 1024, fig.sample
        assert sorted(p.name for p in mnt.iterdir() if p.name.startswith("127.89.")) == sorted(
            disk_clients(N))
    finally:
        daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
