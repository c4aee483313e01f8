"""Lossy network (issue 11): transfers through a UDP relay that drops 5 %, duplicates 2 % and
reorders 5 % of the datagrams in both directions, at blksize 512 and 1468 and windowsize 1 and
16.  Every transfer must end with the right sha256; prints the retransmit counts.

    flock -x /tmp/vfsroot-heavy.lock .venv/bin/python bench/lossy.py [--size-mib 4] [--runs 3]

The short form runs in CI: tests/tftpd/test_lossy_matrix.py (the same matrix, 300 kB, 1 run).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.tftpd.lossy_matrix import MATRIX, run_matrix  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=3, help="transfers per cell (new seed each)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vfsroot-lossy-") as tmp:
        t0 = time.monotonic()
        rows = trio.run(run_matrix, pathlib.Path(tmp), int(args.size_mib * 1024 * 1024),
                        args.runs)
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{len(MATRIX)} cells x {args.runs} transfers of {args.size_mib:g} MiB, "
          f"{time.monotonic() - t0:.1f} s")
    for row in rows:
        print(row.line())
    bad = sum(r.bad for r in rows)
    print("held" if not bad else f"DID NOT HOLD: {bad} transfers with wrong bytes or failed")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
