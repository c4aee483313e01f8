"""The lossy-network matrix of issue 11, shared by tests/tftpd/test_lossy_matrix.py (short
form) and bench/lossy.py (long form): 5 % drop + 2 % duplication + 5 % reordering through
`LossyRelay`, blksize 512 and 1468, windowsize 1 and 16."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio

from tftpd.client import TftpError, TransferTimeout, fetch
from tftpd.session import TransferPolicy

from .helpers import Impairment, LossyRelay, make_file, running

IMPAIRMENT = Impairment(drop=0.05, duplicate=0.02, reorder=0.05)
MATRIX = [(512, 1), (512, 16), (1468, 1), (1468, 16)]
CLIENT = "127.0.0.1"  # the relay forwards from loopback


@dataclass
class Row:
    blksize: int
    windowsize: int
    ok: int = 0
    bad: int = 0
    blocks: int = 0
    server_retransmits: int = 0
    client_ack_resends: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"blksize {self.blksize:>4} windowsize {self.windowsize:>2}: "
                f"{self.ok} ok, {self.bad} bad; {self.blocks} blocks, "
                f"server retransmits {self.server_retransmits}, client ACK re-sends "
                f"{self.client_ack_resends}; relay dropped {self.dropped}, duplicated "
                f"{self.duplicated}, reordered {self.reordered}; {self.seconds:.1f} s")


async def run_matrix(base: Path, size: int, runs: int) -> list[Row]:
    """Every cell of MATRIX `runs` times (a new file and relay seed each run)."""
    rows = []
    policy = TransferPolicy(retransmit_timeout=0.05, retries=20)
    for blksize, windowsize in MATRIX:
        row = Row(blksize, windowsize)
        for run in range(runs):
            seed = blksize * 100 + windowsize * 10 + run
            root = base / f"{blksize}-{windowsize}-{run}"
            want = make_file(root / CLIENT / "file.bin", size, seed=seed)
            async with running(root, policy=policy) as (server, addr), \
                    trio.open_nursery() as nursery:
                relay = LossyRelay(addr, IMPAIRMENT, seed=seed)
                await nursery.start(relay.run)
                t0 = trio.current_time()
                try:
                    with trio.fail_after(300):
                        res = await fetch(relay.address, "file.bin", blksize=blksize,
                                          windowsize=windowsize if windowsize > 1 else None,
                                          retransmit=0.1, retries=20, dally=0.3)
                except (TftpError, TransferTimeout, trio.TooSlowError):
                    row.bad += 1
                else:
                    if res.sha256 == want and res.size == size:
                        row.ok += 1
                    else:
                        row.bad += 1
                    row.blocks += res.blocks
                    row.client_ack_resends += res.acks_resent
                row.seconds += trio.current_time() - t0
                nursery.cancel_scope.cancel()
            row.server_retransmits += server.stats.retransmits
            row.dropped += relay.dropped
            row.duplicated += relay.duplicated
            row.reordered += relay.reordered
        rows.append(row)
    return rows
