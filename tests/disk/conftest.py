"""Fixtures for client-disk tests: a real partitioned image, a real NBD server, and appliances
shared between tests (each launch costs 25-45 s under TCG here).

pytest-trio runs each async test in its own trio run, and a worker process opened in one run
cannot be used from another; so the shared appliances live in one long trio run on a
background thread (`portal`), and tests that use them are plain functions calling
`portal.run(async_fn, *args)`.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

from .images import LVM_LV, LVM_VG, Image, NbdServer, build_image

os.environ["LIBGUESTFS_BACKEND"] = "direct"
# Nested KVM hangs forever on these machines; TCG is slow but works.  Overridable.
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


def _have_guestfs() -> bool:
    try:
        import guestfs  # noqa: F401
    except ImportError:
        return False
    return shutil.which("nbdkit") is not None and shutil.which("mcopy") is not None


needs_guestfs = pytest.mark.skipif(not _have_guestfs(),
                                   reason="python3-guestfs, nbdkit or mtools missing")


class Portal:
    """One trio run on a thread; tests submit coroutines to it and wait for the result."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        ready: queue.Queue[trio.lowlevel.TrioToken] = queue.Queue()
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None

        async def main() -> None:
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                ready.put(trio.lowlevel.current_trio_token())
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        self._token = ready.get(timeout=10)

    def run(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=60)


@pytest.fixture(scope="session")
def portal() -> Iterator[Portal]:
    p = Portal()
    yield p
    p.close()


@pytest.fixture(scope="session")
def disk_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """The shared image.  After every test, its bytes must be exactly what the tests wrote
    on purpose (nothing written by vfsroot, whatever the NBD server would have allowed)."""
    image = build_image(tmp_path_factory.mktemp("disk") / "client.img", lvm=True)
    yield image  # its one baseline (expected_sha256) was taken when it was built
    assert image.sha256() == image.expected_sha256, "vfsroot wrote to the client's disk"


@pytest.fixture(scope="session")
def nbd_server(disk_image: Image) -> Iterator[NbdServer]:
    server = NbdServer(disk_image.path).start()
    yield server
    server.stop()


def config_text(url: str, tftp_root: str = "/boot", lvm: bool = False) -> str:
    """The test disk's config: p2 (ext4) at /, p1 (FAT) at /boot/efi, and with `lvm` the
    logical volume on p3 at /boot/lvm."""
    mounts = [{"partition": 2, "mountpoint": "/"}, {"partition": 1, "mountpoint": "/boot/efi"}]
    if lvm:
        mounts.append({"lv": f"{LVM_VG}/{LVM_LV}", "mountpoint": "/boot/lvm"})
    return json.dumps({"url": url, "mounts": mounts, "tftp_root": tftp_root})


def write_config(src: pathlib.Path, client: str, url: str,
                 tftp_root: str = "/boot") -> pathlib.Path:
    """Write SRC/<client>.nbd atomically (as an operator's tooling should)."""
    path = src / f"{client}.nbd"
    tmp = src / f".{client}.nbd.tmp"
    tmp.write_text(config_text(url, tftp_root))
    tmp.rename(path)
    return path
