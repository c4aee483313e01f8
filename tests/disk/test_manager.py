"""DiskManager against real appliances: the life of a disk, failures, caps, status.

Launches are the expensive part (25-45 s each under TCG), so each test walks through several
steps of the life cycle with as few launches as possible.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import time
from collections.abc import Callable

import pytest
import trio

from vfsroot.disks import DiskManager, DiskOptions
from vfsroot.guest_process import _descendants
from vfsroot.layers.base import LayerUnavailable

from .conftest import needs_guestfs, write_config
from .images import HangingServer, Image, NbdServer, build_image, free_port

pytestmark = [pytest.mark.disk, needs_guestfs]

CLIENT = "127.0.0.21"
LAUNCH = 240  # a bound for one launch on a loaded 2-core CI machine under TCG


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def state(m: DiskManager, client: str = CLIENT) -> str:
    return m.status().get(client, {}).get("state", "none")


async def read_file(m: DiskManager, client: str, path: tuple[str, ...]) -> bytes:
    layer = m.layer_for(client)
    assert layer is not None
    node = await layer.lookup(path)
    assert node is not None
    r = await layer.open(path)
    try:
        return await r.read(0, node.size)
    finally:
        await r.close()


def qemu_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_life_of_a_disk(tmp_path: pathlib.Path, nbd_server: NbdServer,
                              disk_image: Image) -> None:
    """proactive attach → lookup → exact-name configs → config change (new disk, never the
    old one) → NBD server killed mid-read (EIO, no hang) → server back (retry succeeds) →
    idle detach → config delete."""
    src = tmp_path / "src"
    src.mkdir()
    image_b = build_image(tmp_path / "b.img", variant="b")
    server_b = NbdServer(image_b.path)
    opts = DiskOptions(attach_timeout=LAUNCH, attach_wait=1.0, call_timeout=20,
                       retry_min=1.0, retry_max=2.0, idle_timeout=3600, config_poll=0.5,
                       max_appliances=2)
    m = DiskManager(src, opts)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        # 1. proactive attach when the config appears (the poll fallback sees it)
        write_config(src, CLIENT, nbd_server.url)
        await wait_for(lambda: state(m) == "attaching", 5, "attach to start without a lookup")
        layer = m.layer_for(CLIENT)
        assert layer is not None and layer.name == "disk"
        with pytest.raises(LayerUnavailable, match="attaching"):
            await layer.lookup(("vmlinuz",))  # waits attach_wait, then a clear error
        await wait_for(lambda: state(m) in ("ready", "failed"), LAUNCH, "attach")
        assert state(m) == "ready", m.status()
        assert await read_file(m, CLIENT, ("only-disk.txt",)) == b"only on disk a\n"
        st = m.status()[CLIENT]
        assert st["last_access"] and st["url"] == nbd_server.url
        assert st["appliance_rss_mb"] and st["appliance_rss_mb"] > 50
        json.dumps(m.status())

        # 2. only the exact name counts: 127.0.0.2 never gets 127.0.0.21's disk
        assert m.layer_for("127.0.0.2") is None
        assert m.layer_for("127.0.0.021") is None

        # 3. config change → the new disk; lookups never answer from the old one meanwhile
        server_b.start()
        old_pid = m.disks[CLIENT].session.qemu_pid
        write_config(src, CLIENT, server_b.url)
        m.notify_config(CLIENT)
        await wait_for(lambda: state(m) == "attaching", 5, "re-attach on config change")
        with pytest.raises(LayerUnavailable):
            await m.layer_for(CLIENT).lookup(("only-disk.txt",))
        await wait_for(lambda: state(m) in ("ready", "failed"), LAUNCH, "re-attach")
        assert state(m) == "ready", m.status()
        assert await read_file(m, CLIENT, ("only-disk.txt",)) == b"only on disk b\n"
        await wait_for(lambda: not qemu_alive(old_pid), 30, "old appliance to go away")

        # 4. the NBD server dies in the middle of a transfer: EIO within the bound, no hang
        layer = m.layer_for(CLIENT)
        reader = await layer.open(("big.bin",))
        assert len(await reader.read(0, 1468)) == 1468
        server_b.stop()
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:  # noqa: PT012
            for off in range(4 << 20, 16 << 20, 1 << 20):
                await reader.read(off, 65536)
        assert e.value.errno in (errno.EIO, errno.ETIMEDOUT), e.value
        assert time.monotonic() - t0 < opts.call_timeout + 15
        await reader.close()
        with pytest.raises(LayerUnavailable):
            await layer.lookup(("only-disk.txt",))
        await wait_for(lambda: state(m) == "failed" and m.status()[CLIENT]["failures"] >= 2,
                       60, "a retry to fail while the server is down")
        assert "attach failed" in m.status()[CLIENT]["message"]

        # 5. the server comes back on the same port: a retry succeeds by itself
        server_b.start()
        await wait_for(lambda: state(m) == "ready", LAUNCH + 30, "retry after server is back")
        assert await read_file(m, CLIENT, ("only-disk.txt",)) == b"only on disk b\n"

        # 6. idle detach
        pid = m.disks[CLIENT].session.qemu_pid
        opts.idle_timeout = 1.0
        await wait_for(lambda: state(m) == "detached", 10, "idle detach")
        await wait_for(lambda: not qemu_alive(pid), 30, "idle appliance to go away")
        opts.idle_timeout = 3600

        # 7. config deleted: no layer, state none, nothing attached; a layer object a view
        #    still holds has nothing (the client falls back to its other layers, no EIO)
        held = m.layer_for(CLIENT)
        assert held is not None
        (src / f"{CLIENT}.nbd").unlink()
        m.notify_config(CLIENT)
        await wait_for(lambda: state(m) == "none", 5, "state none after delete")
        assert m.layer_for(CLIENT) is None
        assert await held.lookup(()) is None
        assert await held.lookup(("only-disk.txt",)) is None
        assert await held.listdir(()) == {}
        nursery.cancel_scope.cancel()
    server_b.stop()
    assert not m.appliances


async def test_failures_are_contained(tmp_path: pathlib.Path) -> None:
    """Malformed configs, an unreachable server and a hanging launch: clear errors in
    status, no layer (or LayerUnavailable), nothing left running."""
    src = tmp_path / "src"
    src.mkdir()
    bad = {
        "127.0.0.31": '{"url": "nbd://127.0.0.1/x", "mounts": [], "tftp_root": "/boot"}',
        "127.0.0.32": '{"url": "http://x/", "mounts": [{"partition": 1, "mountpoint": "/"}]}',
        "127.0.0.33": '{"url": "nbd://127.0.0.1/x", "mounts": [{"partition": 1, '
                      '"mountpoint": "/"}], "tftp_root": "boot"}',
        "127.0.0.34": "{not json",
        "127.0.0.35": '{"url": "nbd://127.0.0.1/x", "mounts": [{"partition": 1, '
                      '"mountpoint": "/"}], "colour": "red"}',
    }
    fields = {"127.0.0.31": "mounts", "127.0.0.32": "url", "127.0.0.33": "tftp_root",
              "127.0.0.34": "JSON", "127.0.0.35": "colour"}
    for client, text in bad.items():
        (src / f"{client}.nbd").write_text(text)
    closed_port = free_port()
    write_config(src, "127.0.0.36", f"nbd://127.0.0.1:{closed_port}/export")
    hang = HangingServer()
    write_config(src, "127.0.0.37", hang.url)
    opts = DiskOptions(attach_timeout=8, attach_wait=0.5, retry_min=600, retry_max=600,
                       max_launches=2, config_poll=0.5)
    m = DiskManager(src, opts)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            for client in bad:
                assert m.layer_for(client) is None
                st = m.status()[client]
                assert st["state"] == "failed"
                assert f"{client}.nbd" in st["message"] and fields[client] in st["message"]
            # unreachable: fails by itself, clearly, and a lookup says so at once
            await wait_for(lambda: state(m, "127.0.0.36") == "failed", 120, "unreachable")
            msg = m.status()["127.0.0.36"]["message"]
            assert f"NBD server 127.0.0.1:{closed_port} unreachable" in msg, msg
            layer = m.layer_for("127.0.0.36")
            assert layer is not None
            t0 = time.monotonic()
            with pytest.raises(LayerUnavailable, match="failed"):
                await layer.lookup(("vmlinuz",))
            assert time.monotonic() - t0 < 1
            assert m.status()["127.0.0.36"]["next_retry_in"] > 0
            # hanging launch: killed at the timeout, with everything it started
            await wait_for(lambda: state(m, "127.0.0.37") == "failed", 60, "launch timeout")
            msg = m.status()["127.0.0.37"]["message"]
            assert "timed out" in msg, msg
            assert not _descendants(os.getpid()) or all(
                "qemu" not in _cmdline(p) for p in _descendants(os.getpid())
            )
            nursery.cancel_scope.cancel()
    finally:
        hang.close()


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
