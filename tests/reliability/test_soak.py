"""Soak, short form (issue 11; bench/soak.py is the long form): 2 minutes of mixed traffic
(storm rounds, small files, a lossy client, source edits: see soak.py) through
`vfsroot serve` + `vfsroot-tftpd` with default flags, after a warm-up.  Descriptors, threads
and RSS of both daemons, idle before and after, must stay flat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .soak import Soak, build_source, not_flat, report

pytestmark = pytest.mark.mount

STORM_CLIENTS = 40
INITRD_SIZE = 512 * 1024 + 77
#: Long enough for vfsroot-tftpd's RSS to reach its plateau (it was still climbing at 15 s).
WARMUP = float(os.environ.get("VFSROOT_SOAK_WARMUP", "30"))
SECONDS = float(os.environ.get("VFSROOT_SOAK_SECONDS", "120"))


async def test_soak_mixed_traffic_flat(tmp_path: Path, serve_and_tftpd) -> None:
    source, expected = build_source(tmp_path / "trees", STORM_CLIENTS, INITRD_SIZE)
    serve, tftpd = serve_and_tftpd(source)
    assert serve.proc is not None
    soak = Soak(tftpd.address, source, expected,
                {"vfsroot serve": serve.proc.pid, "vfsroot-tftpd": tftpd.pid}, STORM_CLIENTS)
    await soak.traffic(WARMUP)
    first = await soak.idle_sample(0)
    soak.reset()
    await soak.traffic(SECONDS, sample_every=5)  # the trend is taken over ~16 samples
    last = await soak.idle_sample(SECONDS)
    lines = report(soak.result, first, last)
    print(f"\nsoak: {SECONDS:.0f} s of mixed traffic after a {WARMUP:.0f} s warm-up\n  "
          + "\n  ".join(lines))
    assert soak.result.bad == [], soak.result.bad[:10]
    tallies = soak.result.tallies
    assert set(tallies) == {"storm", "small", "lossy", "edits"}, set(tallies)
    minimum = {"storm": 2 * STORM_CLIENTS * 2, "small": 100, "lossy": 2, "edits": 8}
    for name, least in minimum.items():
        assert tallies[name].ok >= least, (name, tallies[name].ok)
    assert not_flat(first, last, soak.result) == []  # slack: soak.py
    assert tftpd.stop() == 0
    assert "Traceback" not in tftpd.log_path.read_text()
