"""Hostile packets, long form (issue 11): N malformed datagrams (default 100,000) from
tests/fuzz.py at a running vfsroot-tftpd's listen port and live transfer ports while an
honest client fetches a 3 MiB file again and again; prints what held.

    flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/hostile.py [--count 100000]

The short form runs in CI: tests/security/test_hostile_packets.py (20,000 datagrams).
Exit status 1 if anything did not hold (a bad honest fetch, descriptors not back, RSS growth
over the slack, the server not exiting 0).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.security.hostile import storm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample-every", type=int, default=10_000)
    ap.add_argument("--rss-slack-kib", type=int, default=4096)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vfsroot-hostile-") as tmp:
        base = pathlib.Path(tmp)
        t0 = time.monotonic()
        report = trio.run(storm, base / "root", base / "tftpd.log", args.count, args.seed,
                          args.sample_every)
        print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"run took {time.monotonic() - t0:.1f} s, seed {args.seed}")
        for line in report.lines():
            print(line)
        print("samples (datagrams sent: RSS KiB, fds, threads):")
        for s in report.samples:
            print(f"  {s.sent:>8}: {s.rss_kib} KiB, {s.fds} fds, {s.threads} threads")
        for bad in report.honest_bad[:10]:
            print(f"BAD honest fetch: {bad}")
        assert report.warm is not None
        held = (not report.honest_bad and report.exit_code == 0
                and report.idle_fds[0] == report.idle_fds[1]
                and report.samples[-1].rss_kib - report.warm.rss_kib < args.rss_slack_kib)
        print("held" if held else "DID NOT HOLD")
        return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
