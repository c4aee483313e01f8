"""Check-then-use races: the confinement check must be about the object actually opened.

Both checks resolve a *path* and then open (or verify) that path again: whoever can write in
the tree (a provisioning user, a client directory synced from elsewhere) can swap a symlink in
between and have the root daemon hand out a file outside the confinement.  The swap is made
deterministic here by doing it inside ``os.open``, exactly where a real race would land.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from tftpd.roots import ClientRoots, OpenRefused
from vfsroot.layers.local import LocalLayer

OUTSIDE = b"host file outside the confinement\n"
INSIDE = b"the client's own file\n"


def _swap_symlink(link: Path, target: Path | str) -> None:
    tmp = link.with_name(link.name + ".swap")
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic, as an attacker would do it


def test_tftpd_checks_the_opened_descriptor_not_the_path(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    client = tmp_path / "root" / "127.0.0.10"
    client.mkdir(parents=True)
    (client / "kernel").write_bytes(INSIDE)
    (tmp_path / "host-secret").write_bytes(OUTSIDE)
    link = client / "link"
    link.symlink_to("kernel")
    real_open = os.open
    swaps: list[str] = []

    def racing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.fspath(path).endswith("/link"):
            swaps.append(os.fspath(path))
            _swap_symlink(link, tmp_path / "host-secret")
            try:
                return real_open(path, flags, *args, **kwargs)
            finally:
                _swap_symlink(link, "kernel")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    with pytest.raises(OpenRefused) as info:
        ClientRoots(tmp_path / "root").open("127.0.0.10", "link")
    monkeypatch.undo()
    assert swaps == [str(client / "link")], "the race was never staged: os.open not reached"
    assert info.value.code == 2
    assert str(info.value) == "access violation: file is outside the client's directory"
    # the link points inside again, and then it is served: the refusal was about the race
    opened = ClientRoots(tmp_path / "root").open("127.0.0.10", "link")
    try:
        assert os.pread(opened.fd, 4096, 0) == INSIDE
    finally:
        os.close(opened.fd)


async def test_local_layer_open_stays_inside_the_source_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    sub = src / "10.0.0.1" / "sub"
    sub.mkdir(parents=True)
    (sub / "file").write_bytes(INSIDE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(OUTSIDE)
    layer = LocalLayer("client", src / "10.0.0.1", src)
    real_open = os.open
    swapped = []

    def racing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not swapped and os.fspath(path).endswith("/sub/file"):
            swapped.append(True)
            os.rename(sub, sub.with_name("sub.old"))
            sub.symlink_to(outside)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    with caplog.at_level(logging.WARNING, logger="vfsroot.layers.local"), \
            pytest.raises(FileNotFoundError) as info:
        await layer.open(("sub", "file"))
    monkeypatch.undo()
    assert swapped == [True], "the race was never staged: os.open not reached"
    assert os.path.islink(sub) and os.path.realpath(sub / "file") == str(outside / "file")
    assert info.value.errno == errno.ENOENT
    refusals = [r.getMessage() for r in caplog.records
                if "outside the source root while opening" in r.getMessage()]
    assert len(refusals) == 1 and f"opened={outside / 'file'}" in refusals[0], refusals


def test_tftpd_plain_open_without_race_is_refused(tmp_path: Path) -> None:
    """Control: with no race, a link that points outside is refused the same way."""
    client = tmp_path / "root" / "127.0.0.10"
    client.mkdir(parents=True)
    (tmp_path / "host-secret").write_bytes(OUTSIDE)
    (client / "link").symlink_to(tmp_path / "host-secret")
    with pytest.raises(OpenRefused) as info:
        ClientRoots(tmp_path / "root").open("127.0.0.10", "link")
    assert info.value.code == 2 and "outside the client's directory" in str(info.value)
