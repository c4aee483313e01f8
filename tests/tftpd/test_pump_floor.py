"""The bare servers of bench/pump_floor.py serve whole, correct files: a floor that dropped or
garbled blocks would make every figure measured against it meaningless."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.reliability.servers import free_udp_port
from tftpd.client import fetch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["floor-per", "floor-mmsg"])
@pytest.mark.parametrize("size", [100_000, 1428 * 40])  # a short last block; an empty one
def test_floor_servers_send_every_block_to_every_client(tmp_path: Path, mode: str,
                                                        size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "pump_floor.py"), "--serve", mode, str(port),
         str(path), "2"], start_new_session=True)  # two workers, like the benchmark
    try:
        async def main() -> list[str]:
            async def one(ip: str, out: list[str]) -> None:
                res = await fetch(("127.0.0.1", port), "file.bin", blksize=1428, bind=ip,
                                  retransmit=0.3, retries=20)  # covers the server's start
                out.append(res.sha256)

            digests: list[str] = []
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i in range(6):
                        nursery.start_soon(one, f"127.0.0.{10 + i}", digests)
            return digests

        digests = trio.run(main)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert digests == [hashlib.sha256(data).hexdigest()] * 6
