"""Lossy network, short form (issue 11): the whole matrix (blksize 512/1468 x windowsize
1/16) through 5 % drop + 2 % duplication + 5 % reordering; every transfer ends with the right
sha256, and the counters show the loss was real and was repaired by retransmission."""

from __future__ import annotations

from pathlib import Path

from .lossy_matrix import MATRIX, run_matrix


async def test_lossy_matrix(tmp_path: Path) -> None:
    rows = await run_matrix(tmp_path, 300_000, 1)
    print("\n" + "\n".join(r.line() for r in rows))
    assert [(r.blksize, r.windowsize) for r in rows] == MATRIX
    for r in rows:
        assert (r.ok, r.bad) == (1, 0), r.line()
        assert r.dropped > 0 and r.duplicated + r.reordered > 0, r.line()
        assert r.server_retransmits + r.client_ack_resends > 0, r.line()
