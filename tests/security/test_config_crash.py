"""A malformed disk config must be reported, never take the daemon down."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vfsroot.config import ConfigError, load_config
from vfsroot.disks import DiskManager, DiskOptions

from .mount import ServeDaemon, have_fuse

NESTED = b"[" * 3000  # 3 KB, far below MAX_CONFIG_BYTES



def test_nested_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "10.0.0.9.nbd"
    path.write_bytes(NESTED)
    with pytest.raises(ConfigError):
        load_config(path)


def test_reload_of_a_nested_config_marks_the_disk_failed(tmp_path: Path) -> None:
    (tmp_path / "10.0.0.9.nbd").write_bytes(NESTED)
    m = DiskManager(tmp_path, DiskOptions())
    assert m.layer_for("10.0.0.9") is None
    assert "config error" in m.status()["10.0.0.9"]["message"]


@pytest.mark.mount
@pytest.mark.skipif(not have_fuse(), reason="no /dev/fuse or fusermount3")
def test_running_daemon_survives_a_nested_config(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    (src / "default").mkdir(parents=True)
    (src / "default" / "kernel").write_bytes(b"kernel\n")
    mnt.mkdir()
    with ServeDaemon(src, mnt, tmp_path / "serve.log", disks=True) as daemon:
        assert (mnt / "10.0.0.1" / "kernel").read_bytes() == b"kernel\n"
        tmp = src / ".10.0.0.9.nbd.tmp"
        tmp.write_bytes(NESTED)
        tmp.rename(src / "10.0.0.9.nbd")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and daemon.proc and daemon.proc.poll() is None:
            time.sleep(0.1)
        assert daemon.proc is not None and daemon.proc.poll() is None, (
            "vfsroot serve exited:\n" + daemon.log()[-1500:])
        assert (mnt / "10.0.0.1" / "kernel").read_bytes() == b"kernel\n"
        assert "10.0.0.9.nbd" in daemon.log()  # the operator is told which file
