"""libguestfs' temporary directory (where every disk's qcow2 overlay is made) full: the attach
error names that directory and the cause, not the NBD export (`guestfs_worker.
_overlay_dir_error`; the whole fault, through a mount, is tests/security/test_fault_disks.py).
No appliance: the check runs only after `add_drive_opts` failed, on whatever handle says where
its temporary directory is."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import subprocess
from collections.abc import Iterator

import pytest

from vfsroot.guestfs_worker import OVERLAY_ROOM, _overlay_dir_error


class FakeHandle:
    def __init__(self, tmpdir: pathlib.Path) -> None:
        self.tmpdir = tmpdir

    def get_tmpdir(self) -> str:
        return str(self.tmpdir)


@pytest.fixture
def small_tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    where = tmp_path / "overlays"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vfsroot-test", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_overlay_dir_is_named_with_its_cause(small_tmpfs: pathlib.Path) -> None:
    assert _overlay_dir_error(FakeHandle(small_tmpfs)) is None  # room: not the cause
    with open(small_tmpfs / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    assert os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize < OVERLAY_ROOM
    err = _overlay_dir_error(FakeHandle(small_tmpfs))
    assert err is not None and err.errno == errno.ENOSPC
    assert str(err) == (f"cannot write the disk's overlay in {small_tmpfs} "
                        "(LIBGUESTFS_TMPDIR, else TMPDIR): No space left on device")
    assert os.listdir(small_tmpfs) == ["filler"]  # the probe left nothing behind
    (small_tmpfs / "filler").unlink()
    assert _overlay_dir_error(FakeHandle(small_tmpfs)) is None


def test_missing_overlay_dir_is_named(tmp_path: pathlib.Path) -> None:
    err = _overlay_dir_error(FakeHandle(tmp_path / "gone"))
    assert err is not None and err.errno == errno.ENOENT
    assert f"in {tmp_path / 'gone'} " in str(err)
