"""The first client to ask does not wait for its whole batch to mount (issue 9, point 1).

Four clients' disks are configured before `vfsroot serve` starts, so all four launch in one
appliance; the client that would be mounted last in queue order asks for its kernel while
the appliance launches.  Its disk must be mounted first: when its kernel has arrived (sha256
checked), at least one of the other three disks of the batch is still attaching, and every
other disk becomes ready after it.  Were a disk's readiness to wait for the batch's other
mounts (~0.5 s each under TCG), all four would be ready by the time its read returned.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
from collections.abc import Iterator

import pytest

from ..serving import serving
from .conftest import needs_guestfs, write_config
from .images import Image, NbdServer
from .test_mount import status, wait_until

pytestmark = [pytest.mark.disk, pytest.mark.mount, needs_guestfs,
              pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                 reason="needs /dev/fuse and root")]

CLIENTS = ["127.0.0.71", "127.0.0.72", "127.0.0.73", "127.0.0.74"]
ASKER = CLIENTS[-1]  # queued last: mounted last unless asking moves it first


@pytest.fixture
def served(tmp_path: pathlib.Path, nbd_server: NbdServer) -> Iterator[pathlib.Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    (src / "default").mkdir(parents=True)
    mnt.mkdir()
    for client in CLIENTS:
        write_config(src, client, nbd_server.url)
    with serving(src, mnt, tmp_path / "serve.log", "--attach-wait", "300",
                 "--attach-timeout", "300", "--idle-timeout", "3600"):
        yield mnt


def test_first_asker_is_mounted_first(served: pathlib.Path, disk_image: Image) -> None:
    mnt = served
    assert {status(mnt)[c]["state"] for c in CLIENTS} == {"attaching"}
    got: list[bytes] = []
    seen_then: list[dict] = []

    def ask() -> None:
        got.append((mnt / ASKER / "vmlinuz").read_bytes())  # held until its disk is ready
        seen_then.append(status(mnt))  # at once: what the batch's other disks are doing

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(320)
    assert got, "the asking client's kernel never arrived"
    assert hashlib.sha256(got[0]).digest() == \
        hashlib.sha256(disk_image.files["/boot/vmlinuz-6.1"]).digest()
    then = seen_then[0]
    assert then[ASKER]["state"] == "ready"
    others_then = {c: then[c]["state"] for c in CLIENTS[:-1]}
    assert "attaching" in others_then.values(), \
        f"every other disk of the batch was ready when the first asker got its file: {then}"

    wait_until(lambda: {status(mnt)[c]["state"] for c in CLIENTS} == {"ready"}, 120,
               "the rest of the batch")
    final = status(mnt)
    assert len({final[c]["appliance"] for c in CLIENTS}) == 1, "one batch, one appliance"
    for c in CLIENTS[:-1]:
        assert final[c]["since"] > final[ASKER]["since"], final
