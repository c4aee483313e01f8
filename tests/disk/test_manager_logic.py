"""DiskManager decisions that need no appliance: caps, LRU eviction, names, options."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import trio

from vfsroot.disks import Disk, DiskManager, DiskOptions

from .conftest import write_config


class FakeSession:
    def __init__(self, open_readers: int = 0) -> None:
        self.open_readers = open_readers
        self.alive = True
        self.qemu_pid = None

    def age(self) -> float:
        return 0.0


def disk_with_session(m: DiskManager, client: str, used: float, readers: int = 0) -> Disk:
    d = Disk(m, client)
    d.session_obj = FakeSession(readers)  # type: ignore[assignment]
    d.state = "ready"
    d.used_mono = used
    m.disks[client] = d
    return d


async def test_lru_idle_disk_is_evicted_busy_one_never(tmp_path: pathlib.Path) -> None:
    m = DiskManager(tmp_path, DiskOptions(max_appliances=2))
    old_busy = disk_with_session(m, "10.0.0.1", used=1.0, readers=1)
    old_idle = disk_with_session(m, "10.0.0.2", used=2.0)
    new = Disk(m, "10.0.0.3")
    await m._make_room(new)
    assert old_idle.session_obj is None and old_idle.state == "detached"
    assert old_busy.session_obj is not None and old_busy.state == "ready"


async def test_waits_when_every_appliance_is_busy(tmp_path: pathlib.Path) -> None:
    m = DiskManager(tmp_path, DiskOptions(max_appliances=1))
    busy = disk_with_session(m, "10.0.0.1", used=1.0, readers=1)
    new = Disk(m, "10.0.0.3")
    with trio.move_on_after(1.5) as scope:
        await m._make_room(new)
    assert scope.cancelled_caught
    assert new.message == "waiting for a free appliance slot"
    busy.session_obj.open_readers = 0  # type: ignore[union-attr]
    with trio.fail_after(3):
        await m._make_room(new)
    assert busy.state == "detached"


def test_layer_for_exact_names_only(tmp_path: pathlib.Path) -> None:
    write_config(tmp_path, "10.0.0.10", "nbd://127.0.0.1:1/x")
    (tmp_path / "010.0.0.1.nbd").write_text("{}")
    m = DiskManager(tmp_path, DiskOptions())
    assert m.layer_for("10.0.0.1") is None
    assert m.layer_for("010.0.0.1") is None  # not a canonical name
    assert m.layer_for("../10.0.0.10") is None
    layer = m.layer_for("10.0.0.10")
    assert layer is not None and layer.name == "disk"
    assert m.status()["10.0.0.10"]["state"] == "attaching"  # proactive (queued until run)


def test_options_round_trip_and_validation() -> None:
    parser = argparse.ArgumentParser()
    DiskOptions.add_arguments(parser)
    opts = DiskOptions.from_args(parser.parse_args(
        ["--idle-timeout", "60", "--max-appliances", "2", "--force-tcg",
         "--appliance-memory", "768"]))
    assert (opts.idle_timeout, opts.max_appliances, opts.force_tcg) == (60, 2, True)
    assert opts.attach_options().memsize_mb == 768
    assert opts.attach_options().force_tcg
    assert DiskOptions.from_args(parser.parse_args([])) == DiskOptions()
    with pytest.raises(ValueError, match="max-appliances"):
        DiskOptions.from_args(parser.parse_args(["--max-appliances", "0"]))


async def test_recently_used_disk_is_not_evicted(tmp_path: pathlib.Path) -> None:
    m = DiskManager(tmp_path, DiskOptions(max_appliances=1))
    recent = disk_with_session(m, "10.0.0.1", used=trio.current_time() - 1)
    new = Disk(m, "10.0.0.3")
    with trio.move_on_after(1.5) as scope:
        await m._make_room(new)
    assert scope.cancelled_caught and recent.state == "ready"
    recent.used_mono -= 60  # now it has been idle long enough
    with trio.fail_after(3):
        await m._make_room(new)
    assert recent.state == "detached"
