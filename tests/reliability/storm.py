"""A boot storm: N client IPs on loopback fetch the same initrd and each its own small config,
all at once, the way PXE ROMs do it (lock-step, blksize 1428, tsize asked).

Two trees hold the same bytes:

* the vfsroot **source root**: ``default/initrd.img`` (shared) and ``<ip>/pxelinux.cfg/default``
  (each client's own), served through a ``vfsroot serve`` mount;
* a **plain directory** for tftpd-hpa, laid out per client IP (``<ip>/initrd.img`` hard links to
  one file, ``<ip>/pxelinux.cfg/default``) and served through its ``--map-file`` (``r ^ \\i/``),
  so both servers answer the same request names with the same bytes.

Every transfer's sha256 is checked against what that client must get.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.tftpd.helpers import make_file
from tftpd.client import TftpError, TransferTimeout, fetch

INITRD = "initrd.img"
CONFIG = "pxelinux.cfg/default"
#: What PXE ROMs and UEFI ask: a 1500-byte frame's worth, lock-step.
BLKSIZE = 1428


def client_ips(count: int, third: int = 77) -> list[str]:
    """``count`` loopback addresses 127.<third>.x.y, none of them 127.0.0.1."""
    return [f"127.{third}.{i // 250}.{i % 250 + 1}" for i in range(count)]


def config_bytes(ip: str) -> bytes:
    """A PXELINUX config that names its client (so a mix-up changes the sha256)."""
    return (f"DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\n  INITRD {INITRD}\n"
            f"  APPEND ip={ip} root=/dev/nfs\n").encode()


@dataclass
class Trees:
    source: Path
    plain: Path
    expected: dict[tuple[str, str], str]  # (ip, name) -> sha256
    initrd_size: int


def build_trees(work: Path, ips: list[str], initrd_size: int) -> Trees:
    source, plain = work / "source", work / "plain"
    (source / "default").mkdir(parents=True)
    initrd = source / "default" / INITRD
    digest = make_file(initrd, initrd_size, seed=11)
    expected: dict[tuple[str, str], str] = {}
    for ip in ips:
        cfg = config_bytes(ip)
        for root in (source / ip, plain / ip):
            (root / "pxelinux.cfg").mkdir(parents=True)
            (root / CONFIG).write_bytes(cfg)
        os.link(initrd, plain / ip / INITRD)
        expected[(ip, CONFIG)] = hashlib.sha256(cfg).hexdigest()
        expected[(ip, INITRD)] = digest
    return Trees(source, plain, expected, initrd_size)


@dataclass
class StormResult:
    server: str
    clients: int
    transfers: int = 0
    failed: list[str] = field(default_factory=list)  # "ip name: why"
    corrupt: list[str] = field(default_factory=list)
    bytes: int = 0
    wall: float = 0.0
    client_seconds: dict[str, float] = field(default_factory=dict)
    acks_resent: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.corrupt and self.transfers == 2 * self.clients

    @property
    def mbps(self) -> float:
        return self.bytes / self.wall / 1e6 if self.wall else 0.0

    @property
    def slowest(self) -> tuple[str, float]:
        if not self.client_seconds:
            return ("-", math.nan)
        ip = max(self.client_seconds, key=self.client_seconds.__getitem__)
        return ip, self.client_seconds[ip]

    def line(self) -> str:
        ip, secs = self.slowest
        return (f"{self.server}: {self.clients} clients, {self.transfers} transfers, "
                f"{len(self.failed)} failed, {len(self.corrupt)} corrupt; "
                f"{self.bytes / 1e6:.1f} MB in {self.wall:.1f} s = {self.mbps:.1f} MB/s aggregate; "
                f"slowest client {ip} {secs:.1f} s; client ACK re-sends {self.acks_resent}")


async def storm(server: tuple[str, int], name: str, trees: Trees, ips: list[str], *,
                retransmit: float = 1.0, retries: int = 5) -> StormResult:
    """Every client at once: its config, then the initrd (PXELINUX's order is the other way
    round for the files it loads, but both are in flight together across the fleet)."""
    result = StormResult(name, len(ips))
    start = trio.Event()

    async def client(ip: str) -> None:
        await start.wait()
        t0 = time.monotonic()
        for fname in (CONFIG, INITRD):
            try:
                res = await fetch(server, fname, blksize=BLKSIZE, tsize=True, bind=ip,
                                  retransmit=retransmit, retries=retries)
            except (TftpError, TransferTimeout, OSError) as e:
                result.failed.append(f"{ip} {fname}: {e}")
                continue
            result.transfers += 1
            result.acks_resent += res.acks_resent
            if res.sha256 != trees.expected[(ip, fname)]:
                result.corrupt.append(f"{ip} {fname}: sha256 {res.sha256[:16]}")
            else:
                result.bytes += res.size
        result.client_seconds[ip] = time.monotonic() - t0

    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for ip in ips:
            nursery.start_soon(client, ip)
        await trio.sleep(0)
        t0 = time.monotonic()
        start.set()
    result.wall = time.monotonic() - t0
    return result
