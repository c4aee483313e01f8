"""Check-then-use races: the confinement check must be about the object actually opened.

Both checks resolve a *path* and then open (or verify) that path again: whoever can write in
the tree (a provisioning user, a client directory synced from elsewhere) can swap a symlink in
between and have the root daemon hand out a file outside the confinement.  The swap is made
deterministic here by doing it inside ``os.open``, exactly where a real race would land.
"""

from __future__ import annotations

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

    def racing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.fspath(path).endswith("/link"):
            _swap_symlink(link, tmp_path / "host-secret")
            try:
                return real_open(path, flags, *args, **kwargs)
            finally:
                _swap_symlink(link, "kernel")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    try:
        opened = ClientRoots(tmp_path / "root").open("127.0.0.10", "link")
    except OpenRefused as exc:
        assert exc.code == 2
        return
    try:
        served = os.pread(opened.fd, 4096, 0)
    finally:
        os.close(opened.fd)
    assert served != OUTSIDE, "the file outside the client's directory was opened and passed"


async def test_local_layer_open_stays_inside_the_source_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    try:
        reader = await layer.open(("sub", "file"))
    except OSError:
        return  # refused: fine
    try:
        served = await reader.read(0, 4096)
    finally:
        await reader.close()
    assert served != OUTSIDE, "a file outside the source root was opened"


def test_tftpd_plain_open_without_race_is_refused(tmp_path: Path) -> None:
    """Control for the xfail above: with no race the same link is refused."""
    client = tmp_path / "root" / "127.0.0.10"
    client.mkdir(parents=True)
    (tmp_path / "host-secret").write_bytes(OUTSIDE)
    (client / "link").symlink_to(tmp_path / "host-secret")
    with pytest.raises(OpenRefused) as info:
        ClientRoots(tmp_path / "root").open("127.0.0.10", "link")
    assert info.value.code == 2 and "outside the client's directory" in str(info.value)
