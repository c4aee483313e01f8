"""Fixtures of the reliability tests: a `vfsroot serve` mount over a source root, and a
`vfsroot-tftpd` (default flags) over that mount, both as processes of their own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fs.conftest import Daemon as ServeDaemon
from tests.fs.conftest import have_fuse

from .servers import Daemon, vfsroot_tftpd


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = None
    if not have_fuse():
        reason = "no /dev/fuse or fusermount3"
    elif os.geteuid() != 0:
        reason = "needs root (FUSE allow_other, 127.x client addresses)"
    if reason is None:
        return
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def serve_and_tftpd(tmp_path: Path) -> Iterator[Callable[[Path], tuple[ServeDaemon, Daemon]]]:
    """``start(source)`` → (vfsroot serve --no-disks, vfsroot-tftpd over its mount); both are
    stopped (and the mount removed) after the test."""
    started: list[object] = []

    def start(source: Path) -> tuple[ServeDaemon, Daemon]:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        serve = ServeDaemon(source, mnt, tmp_path / "vfsroot.log")
        started.append(serve)
        serve.start()
        tftpd = vfsroot_tftpd(mnt, tmp_path / "tftpd.log")
        started.append(tftpd)
        tftpd.start()
        return serve, tftpd

    try:
        yield start
    finally:
        for d in reversed(started):
            d.stop()  # type: ignore[attr-defined]
