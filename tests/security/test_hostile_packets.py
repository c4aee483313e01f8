"""Hostile packets, short form (issue 11): 20,000 datagrams from tests/fuzz.py at a running
`vfsroot-tftpd`'s listen port and at live transfer ports while an honest client fetches.

The server never crashes (exits 0 on SIGTERM), its descriptors are back where they were once
its sessions end, its memory stays flat after warm-up, and every honest fetch during the storm
gets the right sha256.  The long form (100,000 and more) is `bench/hostile.py`.
"""

from __future__ import annotations

from pathlib import Path

from tests.fuzz import KINDS

from .hostile import storm

COUNT = 20_000
#: RSS may move by allocator noise, not by the number of datagrams: 4 MiB is ~200 bytes per
#: datagram, far below what keeping any per-datagram state would cost.
RSS_SLACK_KIB = 4096


async def test_hostile_datagrams_leave_the_server_serving_and_flat(tmp_path: Path) -> None:
    report = await storm(tmp_path / "root", tmp_path / "tftpd.log", COUNT)
    print("\n" + "\n".join(report.lines()))
    log = (tmp_path / "tftpd.log").read_text(errors="replace")
    assert report.total == COUNT
    assert set(report.kinds) == set(KINDS), report.kinds
    assert min(report.sent.values()) > COUNT // 10, report.sent  # every target was hit
    assert report.exit_code == 0, log[-3000:]
    assert "Traceback" not in log and "cannot handle request" not in log
    assert report.honest_bad == [], report.honest_bad
    assert report.honest_during >= 1 and report.honest_ok >= report.honest_during + 2
    assert report.pings == COUNT // 50
    assert report.kernel_drops < COUNT // 100, report.kernel_drops  # (they were read)
    first_fds, last_fds = report.idle_fds
    assert last_fds == first_fds, report.idle_fds
    assert report.warm is not None
    assert report.samples[-1].rss_kib - report.warm.rss_kib < RSS_SLACK_KIB, report.samples
