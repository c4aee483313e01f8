"""DiskManager decisions that need no appliance: memory caps, LRU eviction, batches, names,
options, the KVM decision."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import trio

from vfsroot import accel
from vfsroot.disks import Disk, DiskManager, DiskOptions, DiskState

from .conftest import write_config


class FakeAppliance:
    def __init__(self, name: str, memory: float = 600.0) -> None:
        self.id = name
        self.memory = memory
        self.alive = True
        self.members: set[str] = set()

    def memory_mb(self) -> float:
        return self.memory


class FakeSession:
    def __init__(self, appliance: FakeAppliance, open_readers: int = 0) -> None:
        self.appliance = appliance
        self.open_readers = open_readers
        self.alive = True
        self.qemu_pid = None
        self.disk_id = ""

    def age(self) -> float:
        return 0.0


def disk_on(m: DiskManager, client: str, appliance: FakeAppliance, used: float,
            readers: int = 0) -> Disk:
    d = Disk(client, m.source_root / f"{client}.nbd")
    d.session = FakeSession(appliance, readers)  # type: ignore[assignment]
    d.state = DiskState.READY
    d.used_mono = used
    m.disks[client] = d
    m.appliances.add(appliance)  # type: ignore[arg-type]
    appliance.members.add(client)
    return d


def new_disk(m: DiskManager, client: str) -> Disk:
    return Disk(client, m.source_root / f"{client}.nbd")


async def test_lru_idle_appliance_is_evicted_busy_one_never(tmp_path: pathlib.Path) -> None:
    m = DiskManager(tmp_path, DiskOptions(max_memory=1300))
    busy_a, idle_a = FakeAppliance("a1"), FakeAppliance("a2")
    old_busy = disk_on(m, "10.0.0.1", busy_a, used=1.0, readers=1)
    old_idle = disk_on(m, "10.0.0.2", idle_a, used=2.0)
    neighbour = disk_on(m, "10.0.0.4", busy_a, used=0.5)  # idle, but shares busy_a
    await m._make_room([new_disk(m, "10.0.0.3")])
    assert old_idle.session is None and old_idle.state is DiskState.DETACHED
    assert old_busy.session is not None and old_busy.state is DiskState.READY
    assert neighbour.session is not None and neighbour.state is DiskState.READY
    assert idle_a not in m.appliances and busy_a in m.appliances


async def test_memory_not_appliance_count_decides(tmp_path: pathlib.Path) -> None:
    m = DiskManager(tmp_path, DiskOptions(max_memory=4096, max_appliances=16))
    for i in range(3):
        disk_on(m, f"10.0.1.{i}", FakeAppliance(f"a{i}", memory=600), used=1.0)
    with trio.fail_after(1):
        await m._make_room([new_disk(m, "10.0.0.3")])  # 1800 + 480 fits in 4096: no eviction
    assert all(d.state is DiskState.READY for d in m.disks.values())
    m.options.max_memory = 2000
    await m._make_room([new_disk(m, "10.0.0.3")])  # 1800 + 480 does not: one goes
    assert sum(d.state is DiskState.DETACHED for d in m.disks.values()) == 1


async def test_waits_when_every_appliance_is_busy(tmp_path: pathlib.Path) -> None:
    m = DiskManager(tmp_path, DiskOptions(max_memory=600))
    busy = disk_on(m, "10.0.0.1", FakeAppliance("a1"), used=1.0, readers=1)
    new = new_disk(m, "10.0.0.3")
    with trio.move_on_after(1.5) as scope:
        await m._make_room([new])
    assert scope.cancelled_caught
    assert new.message == "waiting for memory (every appliance busy)"
    busy.session.open_readers = 0  # type: ignore[union-attr]
    with trio.fail_after(3):
        await m._make_room([new])
    assert busy.state is DiskState.DETACHED


async def test_recently_used_disk_is_not_evicted(tmp_path: pathlib.Path) -> None:
    m = DiskManager(tmp_path, DiskOptions(max_memory=600))
    recent = disk_on(m, "10.0.0.1", FakeAppliance("a1"), used=trio.current_time() - 1)
    new = new_disk(m, "10.0.0.3")
    with trio.move_on_after(1.5) as scope:
        await m._make_room([new])
    assert scope.cancelled_caught and recent.state is DiskState.READY
    recent.used_mono -= 60  # now it has been idle long enough
    with trio.fail_after(3):
        await m._make_room([new])
    assert recent.state is DiskState.DETACHED


def test_batches_fill_up_to_the_cap_and_lvm_disks_go_alone(tmp_path: pathlib.Path) -> None:
    for i in range(5):
        write_config(tmp_path, f"10.0.2.{i}", "nbd://127.0.0.1:1/x")
    (tmp_path / "10.0.2.9.nbd").write_text(
        '{"url": "nbd://127.0.0.1:1/x", "mounts": [{"lv": "vg/root", "mountpoint": "/"}]}')
    m = DiskManager(tmp_path, DiskOptions(disks_per_appliance=3))
    for c in [f"10.0.2.{i}" for i in range(5)] + ["10.0.2.9"]:
        assert m.layer_for(c) is not None  # proactive: queued
    assert [d.client for d in m._queue] == [*(f"10.0.2.{i}" for i in range(5)), "10.0.2.9"]
    assert [d.client for d in m._take_batch()] == ["10.0.2.0", "10.0.2.1", "10.0.2.2"]
    assert [d.client for d in m._take_batch()] == ["10.0.2.3", "10.0.2.4"]
    assert [d.client for d in m._take_batch()] == ["10.0.2.9"]
    assert m._take_batch() == []
    # memory bounds a batch too: 480 + 10 per further disk
    m2 = DiskManager(tmp_path, DiskOptions(disks_per_appliance=32, max_memory=500))
    for i in range(5):
        m2.layer_for(f"10.0.2.{i}")
    assert len(m2._take_batch()) == 3


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
         "--appliance-memory", "768", "--disks-per-appliance", "8", "--batch-window", "0.5",
         "--max-memory", "2048", "--kvm-timeout", "10"]))
    assert (opts.idle_timeout, opts.max_appliances, opts.force_tcg) == (60, 2, True)
    assert (opts.disks_per_appliance, opts.batch_window, opts.max_memory,
            opts.kvm_timeout) == (8, 0.5, 2048, 10)
    assert opts.attach_options().memsize_mb == 768
    assert opts.attach_options().force_tcg
    assert DiskOptions.from_args(parser.parse_args([])) == DiskOptions()
    with pytest.raises(ValueError, match="max-appliances"):
        DiskOptions.from_args(parser.parse_args(["--max-appliances", "0"]))
    with pytest.raises(ValueError, match="disks-per-appliance"):
        DiskOptions.from_args(parser.parse_args(["--disks-per-appliance", "0"]))
    with pytest.raises(ValueError, match="max-memory"):
        DiskOptions.from_args(parser.parse_args(["--max-memory", "100"]))


def test_disks_module_has_no_argparse() -> None:
    import vfsroot.disks

    source = pathlib.Path(vfsroot.disks.__file__).read_text()
    assert "argparse" not in source


async def test_kvm_probe_decides_once_and_falls_back(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "")
    monkeypatch.setattr(accel.os.path, "exists", lambda p: True)
    monkeypatch.setattr(accel.os, "access", lambda p, m: True)
    calls: list[float] = []

    async def hangs(timeout: float, memsize: int) -> None:
        calls.append(timeout)
        raise OSError(110, f"appliance launch timed out after {timeout:g} s; appliance killed")

    acc = await accel.choose(False, 7.0, 512, probe=hangs)
    assert (acc.name, acc.force_tcg, calls) == ("tcg", True, [7.0])
    assert "timed out" in acc.reason and "using TCG" in acc.reason
    assert sum("accelerator=tcg" in r.getMessage() for r in caplog.records) == 1

    async def works(timeout: float, memsize: int) -> None:
        calls.append(timeout)

    assert (await accel.choose(False, 7.0, 512, probe=works)).name == "kvm"
    # the operator's choice is never probed
    calls.clear()
    assert (await accel.choose(True, 7.0, 512, probe=works)).reason == "forced by --force-tcg"
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    assert "LIBGUESTFS_BACKEND_SETTINGS" in (await accel.choose(False, 7.0, 512,
                                                                 probe=works)).reason
    assert calls == []


async def test_eio_on_a_disk_fails_it_at_once_not_at_the_next_lookup(
        tmp_path: pathlib.Path) -> None:
    """A read that got EIO (the disk's NBD connection broke) marks the session; the sweeper
    turns that into `failed` with the error and an immediate retry within half a second, so
    the status says so before anyone looks the disk up again (tests/security/
    test_fault_disks.py shows it with a killed NBD server)."""
    m = DiskManager(tmp_path, DiskOptions())
    a = FakeAppliance("a1")
    a.launched_at = 1.0  # type: ignore[attr-defined]
    d = disk_on(m, "10.0.0.1", a, used=trio.current_time())
    other = disk_on(m, "10.0.0.2", a, used=trio.current_time())
    d.session.io_error = "pread: Input/output error"  # type: ignore[union-attr]
    d.session.alive = False  # type: ignore[union-attr]
    other.session.io_error = None  # type: ignore[union-attr]
    with trio.move_on_after(0.8):
        await m._sweeper()
    assert d.state is DiskState.FAILED and d.session is None
    assert d.message == "disk failed: pread: Input/output error"
    assert d.next_retry is not None and d.next_retry <= trio.current_time()
    assert other.state is DiskState.READY and other.session is not None  # its neighbour stays


def test_a_killed_appliance_names_the_call_that_timed_out() -> None:
    """The status of an appliance's disks says why it died: a call that timed out (a frozen
    NBD server hangs qemu's reads) is named, not "worker or qemu exited"."""
    from vfsroot.appliance import Appliance
    from vfsroot.guest_process import AttachOptions

    a = Appliance(AttachOptions())
    assert a.death == "appliance died (worker or qemu exited)"
    a.process._dead = "remount timed out after 30 s"
    assert a.death == "appliance killed: remount timed out after 30 s"
    a.process._dead = "closed"
    assert a.death == "appliance died (worker or qemu exited)"
