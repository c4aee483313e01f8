"""Transfers through a relay that drops, duplicates, reorders and delays datagrams: the bytes
must still arrive exactly, and the retransmission counters must show the loss was real."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tftpd.client import fetch
from tftpd.session import TransferPolicy

from .conftest import LOCAL
from .helpers import Impairment, LossyRelay, file_sha256, make_file, running


@pytest.mark.parametrize(("imp", "blksize", "windowsize", "seed"), [
    (Impairment(drop=0.05), 512, None, 1),
    (Impairment(duplicate=0.1, reorder=0.1), 512, None, 2),
    (Impairment(drop=0.03, duplicate=0.05, reorder=0.05, delay=0.001), 1024, 8, 3),
    (Impairment(drop=0.02, reorder=0.2), 1468, 32, 4),
])
async def test_lossy_transfer(tree: Path, imp: Impairment, blksize: int,
                              windowsize: int | None, seed: int) -> None:
    make_file(tree / LOCAL / "300k.bin", 300_000, seed=seed)
    want = file_sha256(tree / LOCAL / "300k.bin")
    policy = TransferPolicy(retransmit_timeout=0.03, retries=20)
    async with running(tree, policy=policy) as (server, addr), \
            trio.open_nursery() as nursery:
        relay = LossyRelay(addr, imp, seed=seed)
        await nursery.start(relay.run)
        with trio.fail_after(90):
            res = await fetch(relay.address, "300k.bin", blksize=blksize,
                              windowsize=windowsize, tsize=True, retransmit=0.05, retries=20,
                              dally=0.2)
        nursery.cancel_scope.cancel()
    assert res.sha256 == want
    assert relay.dropped + relay.duplicated + relay.reordered > 0
    if imp.drop:
        # Lost DATA or lost ACKs both end in a server retransmission.
        assert server.stats.retransmits > 0
    if imp.duplicate and not imp.drop and windowsize is None:
        assert server.stats.duplicate_acks > 0
        # Duplicated ACKs must not double the traffic (Sorcerer's Apprentice).
        assert server.stats.retransmits < res.blocks * 0.1
    assert server.stats.completed == 1
