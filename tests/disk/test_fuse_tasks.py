"""More than 99 lookups held for an attaching disk must not stall anyone else.

pyfuse3 serves at most `max_tasks` requests at once (99 unless told otherwise), and a lookup
under a client whose disk attaches is held up to `--attach-wait`.  A fleet booting during the
start-up launches holds one or two lookups per client: past 99 of them, every other FUSE
request (another client's default/ files included) used to wait until the attach finished.
Here 150 clients each have a lookup held (their disks' NBD handshakes are held by
`AttachGate`, so they stay "attaching" for as long as the test needs) while a default/ file
of another client is read: its bytes must be right and arrive in seconds, with every held
lookup still held.  With `--fuse-tasks 99` (pyfuse3's default) this read hangs until
`--attach-wait` (checked by hand: 100 requests in flight in the kernel's FUSE connection, the
read stuck).  One client per lookup: the kernel sends lookups of one directory to this
filesystem one at a time, so only lookups in different directories pile up in the daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import threading
import time
from collections.abc import Iterator

import pytest

from ..serving import serving
from .conftest import needs_guestfs, write_config
from .gate import AttachGate
from .images import NbdServer
from .test_mount import status

pytestmark = [pytest.mark.disk, pytest.mark.mount, needs_guestfs,
              pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                 reason="needs /dev/fuse and root")]

HELD = 150
CLIENTS = [f"127.0.1.{i}" for i in range(1, HELD + 1)]
OTHER = "127.0.0.62"
ATTACH_WAIT = 120


@pytest.fixture
def gated(tmp_path: pathlib.Path, nbd_server: NbdServer) -> Iterator[tuple[pathlib.Path, bytes]]:
    gate = AttachGate(nbd_server.port)
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    (src / "default").mkdir(parents=True)
    mnt.mkdir()
    payload = hashlib.sha256(b"default file").digest() * 32768  # 1 MiB
    (src / "default" / "kernel.bin").write_bytes(payload)
    for client in CLIENTS:
        write_config(src, client, gate.url)
    try:
        with serving(src, mnt, tmp_path / "serve.log", "--attach-wait", str(ATTACH_WAIT),
                     "--attach-timeout", "240"):
            try:
                yield mnt, payload
            finally:
                gate.close()  # before the stop: the held handshakes fail, the launch ends
    finally:
        gate.close()  # also when the daemon never came up (a second close does nothing)


def test_held_lookups_beyond_99_do_not_stall_others(gated: tuple[pathlib.Path, bytes]) -> None:
    mnt, payload = gated
    assert status(mnt)[CLIENTS[-1]]["state"] == "attaching"
    finished: list[str] = []

    def held(i: int) -> None:
        with contextlib.suppress(OSError):
            os.stat(mnt / CLIENTS[i] / "vmlinuz")
        finished.append(CLIENTS[i])

    for i in range(HELD):
        threading.Thread(target=held, args=(i,), daemon=True).start()
    time.sleep(3)  # every lookup is in the daemon's hands (or the kernel's queue) by now
    assert not finished, f"lookups were answered while the disk attaches: {finished[:5]}"
    got: list[bytes] = []
    t0 = time.monotonic()
    reader = threading.Thread(target=lambda: got.append(
        (mnt / OTHER / "kernel.bin").read_bytes()), daemon=True)
    reader.start()
    reader.join(20)
    elapsed = time.monotonic() - t0
    assert got, f"a default/ file did not arrive within 20 s while {HELD} lookups were held"
    assert hashlib.sha256(got[0]).digest() == hashlib.sha256(payload).digest()
    assert elapsed < 5, f"a default/ file took {elapsed:.1f} s behind {HELD} held lookups"
    assert not finished, "the held lookups must still be held (the disks are still attaching)"
    # (a status read is a FUSE request too: only now, after the bounded read above)
    states = {c: s["state"] for c, s in status(mnt).items() if c in CLIENTS}
    assert set(states.values()) == {"attaching"}, states
